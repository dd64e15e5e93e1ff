"""GPU probe: does a layer loop copy each layer's weights out of the stacked parameters before its
GEMM (the `memcpy128` kernels of the DiT profile)? 30 layers of x [4680, 1536] @ W[l] [1536, 8960]
@ V[l] [8960, 1536] (the FFN's shapes), weights stacked [30, ...], run as:
  scan        lax.scan over the stacked weights (the DiT's loop)
  fori        lax.fori_loop indexing the stacked weights with dynamic_index_in_dim
  unrolled    lax.scan(unroll=30): static slices
  per-layer   a Python loop over 30 separate weight arrays (no stacking)
Prints each variant's kernel time per call: GEMMs, copies, other.

    python benchmarks/weight_slice_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from causal_dit_jax.bench import profile_breakdown, write_json

LAYERS, TOKENS, DIM, HIDDEN = 30, 4680, 1536, 8960


def layer(x, w, v):
    return x + jax.nn.gelu(x @ w, approximate=True) @ v  # [T, D] @ [D, H] @ [H, D]


def variants():
    def scan(x, ws, vs):
        return jax.lax.scan(lambda h, wv: (layer(h, *wv), None), x, (ws, vs))[0]

    def fori(x, ws, vs):
        return jax.lax.fori_loop(
            0,
            LAYERS,
            lambda i, h: layer(
                h, jax.lax.dynamic_index_in_dim(ws, i, keepdims=False), jax.lax.dynamic_index_in_dim(vs, i, keepdims=False)
            ),
            x,
        )

    def unrolled(x, ws, vs):
        return jax.lax.scan(lambda h, wv: (layer(h, *wv), None), x, (ws, vs), unroll=LAYERS)[0]

    def per_layer(x, ws, vs):
        for w, v in zip(ws, vs):
            x = layer(x, w, v)
        return x

    return {"scan": (scan, False), "fori": (fori, False), "unrolled": (unrolled, False), "per-layer": (per_layer, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    key = jax.random.key(0)
    x = jax.random.normal(key, (TOKENS, DIM), jnp.bfloat16)
    ws = jax.random.normal(jax.random.fold_in(key, 1), (LAYERS, DIM, HIDDEN), jnp.bfloat16) * DIM**-0.5
    vs = jax.random.normal(jax.random.fold_in(key, 2), (LAYERS, HIDDEN, DIM), jnp.bfloat16) * HIDDEN**-0.5
    rows = {}
    for name, (fn, split) in variants().items():
        w_in, v_in = (list(ws), list(vs)) if split else (ws, vs)
        f = jax.jit(fn)
        jax.block_until_ready(f(x, w_in, v_in))
        b = profile_breakdown(lambda f=f, w_in=w_in, v_in=v_in: f(x, w_in, v_in))
        copies = sum(ms for k, ms in b["top_kernels"].items() if "memcpy" in k.lower() or "copy" in k.lower())
        rows[name] = {
            "matmul_ms": b["matmul"],
            "copy_ms": copies,
            "other_ms": b["other"] - copies,
            "total_ms": b["total"],
            "top_kernels": dict(list(b["top_kernels"].items())[:6]),
        }
        times = "  ".join(f"{k[:-3]} {v:.2f} ms" for k, v in rows[name].items() if k.endswith("_ms"))
        print(f"{name:10s} {times}", flush=True)
    if args.json:
        write_json(args.json, variants=rows)


if __name__ == "__main__":
    main()
