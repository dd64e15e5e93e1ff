"""GPU probe: what FP8 (e4m3) GEMMs save on the DiT's linear layers of one chunk (4680 tokens).

For each linear of a block (self-attn qkv and o, cross-attn q and o, FFN fc1 and fc2), 30 layers
of it, as:
  bf16        x [T, K] bf16 @ w [K, N] bf16 (the model today)
  fp8         x and w already e4m3 with per-tensor scales, dequantised into the dot (the pattern
              XLA rewrites to a cuBLASLt FP8 GEMM): the GEMM alone
  fp8+quant   x bf16 quantised inside the call (amax -> scale -> e4m3), w pre-quantised: what a
              model layer would pay
Prints kernel time per 30 layers and whether the compiled HLO holds an f8 GEMM, and the relative
error of the fp8 output against float32.

    python benchmarks/fp8_gemm_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from causal_dit_jax.bench import write_probe_json
from causal_dit_jax.profile_breakdown import profile_breakdown

LAYERS, TOKENS = 30, 4680
SHAPES = {"qkv": (1536, 4608), "self_o": (1536, 1536), "cross_q": (1536, 1536), "cross_o": (1536, 1536),
          "fc1": (1536, 8960), "fc2": (8960, 1536)}
F8 = jnp.float8_e4m3fn
F8_MAX = float(jnp.finfo(F8).max)


def quantize(a):
    """a -> (e4m3 values, float32 scale) with a ~= values * scale (per-tensor amax scaling)."""
    scale = jnp.maximum(jnp.max(jnp.abs(a)).astype(jnp.float32), 1e-12) / F8_MAX
    return jnp.clip(a.astype(jnp.float32) / scale, -F8_MAX, F8_MAX).astype(F8), scale


def fp8_dot(xq, xs, wq, ws):
    """Dequantise-into-dot: XLA's gemm rewriter turns this into one FP8 cuBLASLt call."""
    x = xq.astype(jnp.bfloat16) * xs.astype(jnp.bfloat16)
    w = wq.astype(jnp.bfloat16) * ws.astype(jnp.bfloat16)
    return jnp.dot(x, w, preferred_element_type=jnp.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    key = jax.random.key(0)
    rows = {}
    for name, (k, n) in SHAPES.items():
        x = jax.random.normal(jax.random.fold_in(key, 1), (TOKENS, k), jnp.bfloat16)
        ws = [jax.random.normal(jax.random.fold_in(key, 10 + i), (k, n), jnp.bfloat16) * k ** -0.5
              for i in range(LAYERS)]
        wq = [quantize(w) for w in ws]
        xq, xs = quantize(x)

        def bf16(x, ws):
            return [x @ w for w in ws]

        def fp8(xq, xs, wq):
            return [fp8_dot(xq, xs, q, s) for q, s in wq]

        def fp8_quant(x, wq):
            out = []
            for q, s in wq:  # a fresh activation per layer, as in the model
                xq, xs = quantize(x)
                out.append(fp8_dot(xq, xs, q, s))
                x = x + 1
            return out

        row = {}
        for label, fn, inputs in (("bf16", bf16, (x, ws)), ("fp8", fp8, (xq, xs, wq)),
                                  ("fp8+quant", fp8_quant, (x, wq))):
            f = jax.jit(fn)
            hlo = f.lower(*inputs).compile().as_text()
            jax.block_until_ready(f(*inputs))
            b = profile_breakdown(lambda: f(*inputs))
            row[label] = {"total_ms": b["total"], "matmul_ms": b["matmul"], "other_ms": b["other"],
                          "f8_gemm_in_hlo": "f8e4m3" in hlo and "cublas" in hlo,
                          "top_kernels": dict(list(b["top_kernels"].items())[:4])}
        ref = x.astype(jnp.float32) @ ws[0].astype(jnp.float32)
        got = fp8_dot(xq, xs, *wq[0]).astype(jnp.float32)
        row["fp8_rel_l2"] = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        got16 = (x @ ws[0]).astype(jnp.float32)
        row["bf16_rel_l2"] = float(jnp.linalg.norm(got16 - ref) / jnp.linalg.norm(ref))
        flops = 2 * TOKENS * k * n * LAYERS
        for label in ("bf16", "fp8", "fp8+quant"):
            row[label]["tflops"] = flops / row[label]["total_ms"] / 1e9
        rows[name] = row
        print(f"{name:8s} bf16 {row['bf16']['total_ms']:.2f} ms ({row['bf16']['tflops']:.0f} TF/s)  "
              f"fp8 {row['fp8']['total_ms']:.2f} ms ({row['fp8']['tflops']:.0f}, f8 gemm {row['fp8']['f8_gemm_in_hlo']})  "
              f"fp8+quant {row['fp8+quant']['total_ms']:.2f} ms  rel err fp8 {row['fp8_rel_l2']:.4f} "
              f"bf16 {row['bf16_rel_l2']:.4f}", flush=True)
        print("   fp8+quant kernels:", row["fp8+quant"]["top_kernels"], flush=True)
    total = {label: sum(r[label]["total_ms"] for r in rows.values()) for label in ("bf16", "fp8", "fp8+quant")}
    print("all linears of a forward (ms):", total, flush=True)
    if args.json:
        write_probe_json(args.json, shapes=rows, total_ms=total)


if __name__ == "__main__":
    main()
