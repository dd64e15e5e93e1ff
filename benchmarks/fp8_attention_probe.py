"""GPU probe: cuDNN's FP8 (e4m3) flash attention for one layer of the DiT's chunk attention (4680
queries, 12 heads x 128) against the bf16 cuDNN attention the model runs, at the first and the last
chunk's cache lengths.

cuDNN's FP8 attention in this JAX (`jax._src.cudnn.fused_attention_stablehlo`, private) takes one
scale per tensor and no key-length mask, so a cached stream would call it on a static slice of the
filled cache. Timed here, per layer:
- "bf16 cudnn": what the model runs (the whole 32,760-slot buffer, `key_value_seq_lengths` = filled);
- "fp8 attention only": q, k, v already e4m3;
- "fp8 with quantisation": the filled slice of the bf16 cache: per-tensor amax, scale, e4m3, attend.
Accuracy: relative L2 of each output to a float32 reference, inputs shaped like the model's (q, k
RMS-normalised, v standard normal).

    python benchmarks/fp8_attention_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from causal_dit_jax.bench import median_ms, write_json
from causal_dit_jax.model.fp8_linear import AMAX_FLOOR, F8, F8_MAX

HEADS, HEAD_DIM, QUERIES, SLOTS = 12, 128, 4680, 32760


def fp8_params(dq, dk, dv, s_scale):
    """The 17 scalars cuDNN's FP8 call takes ([1, 1, 1, 1] float32): descales of q, k, v; P is
    quantised with scale_s = s_scale (and descaled by 1 / s_scale); the output is left unscaled."""
    one = jnp.ones((1, 1, 1, 1), jnp.float32)
    params = {
        name: one
        for name in (
            "amax_dQ",
            "amax_dK",
            "amax_dV",
            "amax_dP",
            "descale_o",
            "descale_dO",
            "descale_dP",
            "scale_dQ",
            "scale_dK",
            "scale_dV",
            "scale_dP",
            "scale_o",
        )
    }
    params.update(descale_q=dq * one, descale_k=dk * one, descale_v=dv * one, descale_s=one / s_scale, scale_s=one * s_scale)
    return params


def to_e4m3(x):
    """Per-tensor (the library quantises per row): x / scale in e4m3 with amax(x) -> 448, and the descale."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
    scale = jnp.maximum(amax, AMAX_FLOOR) / F8_MAX
    return (x.astype(jnp.float32) / scale).astype(F8), scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # JAX's private API, the subject here

    sm_scale = HEAD_DIM**-0.5
    ks = jax.random.split(jax.random.key(0), 3)

    def rms(x):
        return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6)

    q = rms(jax.random.normal(ks[0], (1, QUERIES, HEADS, HEAD_DIM), jnp.float32)).astype(jnp.bfloat16)
    cache_k = rms(jax.random.normal(ks[1], (1, SLOTS, HEADS, HEAD_DIM), jnp.float32)).astype(jnp.bfloat16)
    cache_v = jax.random.normal(ks[2], (1, SLOTS, HEADS, HEAD_DIM), jnp.bfloat16)

    def bf16_attention(q, k, v, filled):
        lengths = jnp.full((1,), filled, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, implementation="cudnn", key_value_seq_lengths=lengths)

    def fp8_core(q8, k8, v8, dq, dk, dv):
        out, _, _ = cudnn_fa.dot_product_attention(
            q8, k8, v8, fp8_params=fp8_params(dq, dk, dv, F8_MAX), scale=sm_scale, use_fp8=True, qkv_layout="BTNH"
        )
        return out

    def fp8_attention(q, k, v, filled):
        q8, dq = to_e4m3(q)
        k8, dk = to_e4m3(k[:, :filled])
        v8, dv = to_e4m3(v[:, :filled])
        return fp8_core(q8, k8, v8, dq, dk, dv).astype(jnp.float32)

    rows = []
    for filled in (4680, 32760):
        flops = 4 * QUERIES * filled * HEADS * HEAD_DIM
        k, v = cache_k[:, :filled], cache_v[:, :filled]
        ref = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), scale=sm_scale)

        def rel(out, ref=ref):
            out = out.astype(jnp.float32)
            return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))

        def row(kernel, fn, *args, filled=filled, flops=flops, **extra):
            """Time fn(*args), and its error against the float32 reference."""
            ms = median_ms(fn, *args, repeats=30)
            out = fn(*args)
            rows.append({"kernel": kernel, "keys": filled, "ms": ms, "tflops": flops / ms / 1e9, "rel_l2": rel(out), **extra})
            print(rows[-1], flush=True)
            return out

        row("bf16 cudnn", jax.jit(bf16_attention, static_argnums=3), q, cache_k, cache_v, filled)
        try:
            q8, dq = to_e4m3(q)
            k8, dk = to_e4m3(k)
            v8, dv = to_e4m3(v)
            out = row("fp8 attention only", jax.jit(fp8_core), q8, k8, v8, dq, dk, dv)
            rows[-1]["out_dtype"] = str(out.dtype)
            row("fp8 with quantisation", jax.jit(fp8_attention, static_argnums=3), q, cache_k, cache_v, filled)
        except Exception as e:  # what the private API refuses, reported as such
            rows.append({"kernel": "fp8", "keys": filled, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(rows[-1], flush=True)
    if args.json:
        write_json(args.json, rows=rows)


if __name__ == "__main__":
    main()
