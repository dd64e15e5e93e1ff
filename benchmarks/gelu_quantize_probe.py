"""GPU probe: the float8 FFN's GELU + quantise pass (`fp8_linear.gelu_quantize_rows`) at the real size
([4680, 8960]: fc1's raw e4m3 product in bf16, its row and column scales and bias -> fc2's e4m3 input
and row scales), per Triton warp count, against XLA's two passes. Reports ms per call (one layer)
and the HBM bandwidth it reaches (bytes read and written once / time). Each figure is the median
time of LAYERS calls in one executable (`lax.map` over stacked inputs) / LAYERS: one call alone is
shorter than its dispatch.

    python benchmarks/gelu_quantize_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from causal_dit_jax.bench import median_ms, write_json
from causal_dit_jax.model.fp8_linear import AMAX_FLOOR, F8, F8_MAX, gelu_quantize_pallas, gelu_quantize_rows

TOKENS, FFN, LAYERS = 4680, 8960, 20


def per_call_ms(fn, h, rs, cs, b) -> float:
    """ms per call of fn(h, rs, cs, b), from LAYERS calls over the stacked h [LAYERS, T, K]."""
    many = jax.jit(lambda h, rs, cs, b: jax.lax.map(lambda x: fn(x, rs, cs, b), h))
    return median_ms(many, h, rs, cs, b, repeats=10) / LAYERS


def pallas_pass(num_warps: int):
    """The library's row kernel with `num_warps` warps per row (the library uses 8)."""
    return jax.jit(functools.partial(gelu_quantize_pallas, num_warps=num_warps))


def _packed_rows(h_ref, rs_ref, cs_ref, b_ref, q_ref, s_ref, *, k: int, r: int):
    """The library's row kernel (`gelu_quantize_pallas`: one token row per program) written for r
    consecutive token rows packed into one program's row of r * k: the variant measured against it."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    lane = jnp.arange(pl.next_power_of_2(k))
    valid = lane < k
    cs = plgpu.load(cs_ref.at[lane], mask=valid, other=0.0)
    b = plgpu.load(b_ref.at[lane], mask=valid, other=0.0)
    for j in range(r):
        idx = j * k + lane
        h = plgpu.load(h_ref.at[idx], mask=valid, other=0.0).astype(jnp.float32)
        g = jax.nn.gelu(h * plgpu.load(rs_ref.at[jnp.arange(j, j + 1)]) * cs + b, approximate=True)
        scale = jnp.maximum(jnp.max(jnp.abs(g)), AMAX_FLOOR) / F8_MAX
        plgpu.store(q_ref.at[idx], jnp.clip(g / scale, -F8_MAX, F8_MAX).astype(q_ref.dtype), mask=valid)
        plgpu.store(s_ref.at[jnp.arange(j, j + 1)], jnp.full((1,), scale, jnp.float32))


def packed_pass(rows_per_program: int, num_warps: int):
    """r token rows per program (fewer, longer programs): [T, K] viewed as [T / r, r * K]."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    r = rows_per_program

    def run(h, rs, cs, b):
        t, k = h.shape
        q, s = pl.pallas_call(
            functools.partial(_packed_rows, k=k, r=r),
            grid=(t // r,),
            in_specs=[
                pl.BlockSpec((None, r * k), lambda i: (i, 0)),
                pl.BlockSpec((None, r), lambda i: (i, 0)),
                pl.BlockSpec((k,), lambda i: (0,)),
                pl.BlockSpec((k,), lambda i: (0,)),
            ],
            out_specs=[pl.BlockSpec((None, r * k), lambda i: (i, 0)), pl.BlockSpec((None, r), lambda i: (i, 0))],
            out_shape=[jax.ShapeDtypeStruct((t // r, r * k), F8), jax.ShapeDtypeStruct((t // r, r), jnp.float32)],
            compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        )(h.reshape(t // r, r * k), rs.reshape(t // r, r), cs, b)  # t k -> (t/r) (r k)
        return q.reshape(t, k), s.reshape(t, 1)

    return jax.jit(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ks = jax.random.split(jax.random.key(0), 4)
    hs = jax.random.normal(ks[0], (LAYERS, TOKENS, FFN), jnp.bfloat16)
    h = hs[0]
    rs = jax.random.uniform(ks[1], (TOKENS, 1), jnp.float32, 1e-3, 2e-3)
    cs = jax.random.uniform(ks[2], (FFN,), jnp.float32, 1e-3, 2e-3)
    b = jax.random.normal(ks[3], (FFN,), jnp.float32)
    moved = TOKENS * FFN * (2 + 1) + TOKENS * 8 + FFN * 8  # bf16 in, e4m3 out, the scales
    ref = jax.jit(functools.partial(gelu_quantize_rows, implementation="xla"))
    rq, rsc = ref(h, b, row_scale=rs, col_scale=cs)
    rows = []
    ms = per_call_ms(lambda h, rs, cs, b: ref(h, b, row_scale=rs, col_scale=cs), hs, rs, cs, b)
    rows.append({"kernel": "xla (two passes)", "ms": ms, "gb_per_s": moved / ms / 1e6})
    print(rows[-1], flush=True)
    variants = [(f"pallas row, {w} warps", pallas_pass(w)) for w in (4, 8, 16)]
    variants += [(f"pallas {r} rows per program, {w} warps", packed_pass(r, w)) for r in (2, 4) for w in (8, 16)]
    for name, fn in variants:
        try:
            ms = per_call_ms(fn, hs, rs, cs, b)
            q, s = fn(h, rs, cs, b)
            diff = float(jnp.mean((q.astype(jnp.float32) != rq.astype(jnp.float32)).astype(jnp.float32)))
            rows.append(
                {
                    "kernel": name,
                    "ms": ms,
                    "gb_per_s": moved / ms / 1e6,
                    "values_differing_from_xla": diff,
                    "scale_max_rel": float(jnp.max(jnp.abs(s / rsc - 1))),
                }
            )
        except Exception as e:  # a variant Triton refuses
            rows.append({"kernel": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(rows[-1], flush=True)
    if args.json:
        write_json(args.json, rows=rows)


if __name__ == "__main__":
    main()
