"""GPU probe: what FP8 (e4m3) GEMMs save on the DiT's linear layers of one chunk (4680 tokens), and
which JAX spelling XLA actually runs as an FP8 GEMM.

For each linear of a block (self-attn qkv and o, cross-attn q and o, FFN fc1 and fc2), 30 layers
of it (each layer its own input, so XLA cannot merge the GEMMs), as:
  bf16          x [T, K] bf16 @ w [K, N] bf16 (the model today)
  fp8_dq        e4m3 x and w dequantised to bf16 right before the dot (the "FP8 -> DQ -> dot"
                pattern of XLA's GEMM rewriter), w stored [K, N]
  fp8_direct    an e4m3 x e4m3 dot_general with a bf16 result, w stored [N, K] (both operands
                contract their minor axis), the per-tensor scales multiplied after
  fp8_rowwise   what `fp8_linear.fp8_matmul` runs in the model: x quantised per row inside the
                call, w per output channel
Prints kernel time per 30 layers, whether the compiled HLO holds an e4m3 GEMM, and the relative
error against float32.

    python benchmarks/fp8_gemm_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp

from causal_dit_jax.bench import profile_breakdown, write_json
from causal_dit_jax.model.fp8_linear import AMAX_FLOOR, F8, F8_MAX, fp8_matmul, quantize_kernel

LAYERS, TOKENS = 30, 4680
SHAPES = {
    "qkv": (1536, 4608),
    "self_o": (1536, 1536),
    "cross_q": (1536, 1536),
    "cross_o": (1536, 1536),
    "fc1": (1536, 8960),
    "fc2": (8960, 1536),
}


def quantize_tensor(a):
    """a -> (e4m3 values, float32 scale) with a ~= values * scale (one scale for the tensor)."""
    scale = jnp.maximum(jnp.max(jnp.abs(a)).astype(jnp.float32), AMAX_FLOOR) / F8_MAX
    return jnp.clip(a.astype(jnp.float32) / scale, -F8_MAX, F8_MAX).astype(F8), scale


def dq_dot(xq, xs, wq, ws):
    x = xq.astype(jnp.bfloat16) * xs.astype(jnp.bfloat16)
    w = wq.astype(jnp.bfloat16) * ws.astype(jnp.bfloat16)
    return jnp.dot(x, w, preferred_element_type=jnp.bfloat16)


def direct_dot(xq, xs, wq_t, ws):
    y = jax.lax.dot_general(xq, wq_t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)
    return y * (xs * ws).astype(jnp.bfloat16)


def has_f8_gemm(hlo: str) -> bool:
    """cuBLASLt's FP8 GEMM, or a GEMM fusion whose dot reads e4m3 parameters."""
    fused = any(" dot(" in c and re.search(r"= f8e4m3fn\[[^\n]*parameter\(", c) for c in hlo.split("\n}\n"))
    return fused or "__cublas$lt$matmul$f8" in hlo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    key = jax.random.key(0)
    rows = {}
    for name, (k, n) in SHAPES.items():
        xs = [jax.random.normal(jax.random.fold_in(key, 100 + i), (TOKENS, k), jnp.bfloat16) for i in range(LAYERS)]
        ws = [jax.random.normal(jax.random.fold_in(key, 10 + i), (k, n), jnp.bfloat16) * k**-0.5 for i in range(LAYERS)]
        xq = [quantize_tensor(x) for x in xs]
        wq = [quantize_tensor(w) for w in ws]
        wq_t = [(jnp.transpose(q), s) for q, s in wq]
        wc = [quantize_kernel(w) for w in ws]  # per output channel, [N, K]
        variants = {
            "bf16": (lambda xs, ws: [x @ w for x, w in zip(xs, ws)], (xs, ws)),
            "fp8_dq": (lambda xq, wq: [dq_dot(*a, *b) for a, b in zip(xq, wq)], (xq, wq)),
            "fp8_direct": (lambda xq, wq: [direct_dot(*a, *b) for a, b in zip(xq, wq)], (xq, wq_t)),
            "fp8_rowwise": (lambda xs, wc: [fp8_matmul(x, *c) for x, c in zip(xs, wc)], (xs, wc)),
        }
        row = {}
        ref = xs[0].astype(jnp.float32) @ ws[0].astype(jnp.float32)
        for label, (fn, inputs) in variants.items():
            f = jax.jit(fn)
            hlo = f.lower(*inputs).compile().as_text()
            out = jax.block_until_ready(f(*inputs))
            b = profile_breakdown(lambda f=f, inputs=inputs: f(*inputs))
            err = jnp.linalg.norm(out[0].astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
            row[label] = {
                "total_ms": b["total"],
                "matmul_ms": b["matmul"],
                "other_ms": b["other"],
                "tflops": 2 * TOKENS * k * n * LAYERS / b["total"] / 1e9,
                "f8_gemm": has_f8_gemm(hlo),
                "rel_l2_vs_f32": float(err),
                "top_kernels": dict(list(b["top_kernels"].items())[:4]),
            }
        rows[name] = row
        print(
            f"{name:8s} "
            + "  ".join(
                f"{lb} {r['total_ms']:.2f} ms ({r['tflops']:.0f} TF/s, f8 {r['f8_gemm']}, err {r['rel_l2_vs_f32']:.4f})"
                for lb, r in row.items()
            ),
            flush=True,
        )
    total = {label: sum(r[label]["total_ms"] for r in rows.values()) for label in next(iter(rows.values()))}
    print("all linears of a forward (ms):", {k: round(v, 2) for k, v in total.items()}, flush=True)
    if args.json:
        write_json(args.json, shapes=rows, total_ms=total)


if __name__ == "__main__":
    main()
