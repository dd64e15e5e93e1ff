"""GPU probe: the DiT's largest attention (one chunk of 4680 queries over the full 32,760-key cache,
12 heads x 128, bf16) with cuDNN flash attention and with JAX's Pallas Mosaic-GPU flash attention
(`jax.experimental.pallas.ops.gpu.attention_mgpu`, which has no key-length mask: lengths are padded
to its blocks here, for the timing only). The Mosaic kernel's shared-memory buffers are float16 in
this JAX, so it runs on float16 copies of the inputs; cuDNN is timed in both dtypes. Reports ms and
TFLOP/s per kernel, dtype and tiling.

    python benchmarks/attention_kernel_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from causal_dit_jax.bench import median_ms, write_json

HEADS, HEAD_DIM = 12, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    rows = []
    for q_len, kv_len in ((4736, 32768), (4736, 4864)):
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (1, q_len, HEADS, HEAD_DIM), jnp.bfloat16)
        k = jax.random.normal(ks[1], (1, kv_len, HEADS, HEAD_DIM), jnp.bfloat16)
        v = jax.random.normal(ks[2], (1, kv_len, HEADS, HEAD_DIM), jnp.bfloat16)
        flops = 4 * q_len * kv_len * HEADS * HEAD_DIM
        ref = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
        expected = ref(q, k, v).astype(jnp.float32)
        for dtype in (jnp.bfloat16, jnp.float16):
            qc, kc, vc = (x.astype(dtype) for x in (q, k, v))
            name = jnp.dtype(dtype).name
            ms = median_ms(ref, qc, kc, vc)
            rows.append({"kernel": "cudnn", "dtype": name, "q": q_len, "kv": kv_len, "ms": ms, "tflops": flops / ms / 1e9})
            print(rows[-1], flush=True)
            for block_q, block_kv, steps in ((64, 64, 2), (64, 128, 2), (64, 128, 3), (64, 128, 4)):
                label = f"pallas mgpu bq{block_q} bkv{block_kv} steps{steps}"
                try:
                    cfg = mgpu.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=steps)
                    fn = jax.jit(lambda q, k, v, cfg=cfg: mgpu.attention(q, k, v, cfg))
                    ms = median_ms(fn, qc, kc, vc)
                    err = float(jnp.max(jnp.abs(fn(qc, kc, vc).astype(jnp.float32) - expected)))
                    rows.append(
                        {
                            "kernel": label,
                            "dtype": name,
                            "q": q_len,
                            "kv": kv_len,
                            "ms": ms,
                            "tflops": flops / ms / 1e9,
                            "max_abs_vs_cudnn_bf16": err,
                        }
                    )
                except Exception as e:  # a dtype or tiling the kernel refuses, reported as such
                    rows.append(
                        {
                            "kernel": label,
                            "dtype": name,
                            "q": q_len,
                            "kv": kv_len,
                            "error": f"{type(e).__name__}: {str(e)[:200]}",
                        }
                    )
                print(rows[-1], flush=True)
    if args.json:
        write_json(args.json, rows=rows)


if __name__ == "__main__":
    main()
