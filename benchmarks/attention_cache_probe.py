"""GPU probe: the cached self-attention of one chunk over all 30 layers, as the DiT's layer loop runs it.

Compares reading each layer's K/V out of the stacked cache (a slice that XLA copies before the cuDNN
call) with cuDNN paged attention reading the stacked cache in place (`attention.paged_cache_attention`),
for several page sizes; checks they agree; and reports whether XLA fused the FFN's GELU into the GEMM
epilogue. Real Wan2.1-1.3B shapes at 480x832: 4680 tokens per chunk, 12 heads x 128, 7 cache slots.

    python benchmarks/attention_cache_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from causal_dit_jax.bench import median_ms, write_json
from causal_dit_jax.model.attention import dot_product_attention, paged_cache_attention
from causal_dit_jax.model.kv_cache import LayerCache

LAYERS, TOKENS, SLOTS, HEADS, HEAD_DIM = 30, 4680, 7, 12, 128


def timed(fn, state: dict, q, k_new, v_new, valid, repeats: int = 10) -> tuple[float, jax.Array]:
    """Median ms of fn with the cache donated and handed back each call (as the sampler runs it),
    and the last call's output."""

    def call():
        state["out"], state["k"], state["v"] = fn(q, k_new, v_new, state["k"], state["v"], valid)
        return state["out"]

    return median_ms(call, repeats=repeats), state["out"]


def layer_loop(page_tokens: int | None):
    """30 layers: write the chunk's k/v into slot `valid - 1`, attend over the valid slots."""

    def run(q, k_new, v_new, cache_k, cache_v, valid):
        def body(carry, layer):
            ck, cv = carry
            idx = (layer, 0, (valid - 1) * TOKENS, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, k_new[None], idx)
            cv = jax.lax.dynamic_update_slice(cv, v_new[None], idx)
            kv_len = valid * TOKENS
            if page_tokens is None:
                out = dot_product_attention(q, ck[layer], cv[layer], kv_length=kv_len, implementation="cudnn")
            else:
                out = paged_cache_attention(q, LayerCache(ck, cv, layer), kv_len, page_tokens)
            return (ck, cv), out[0, :8, 0, :8]

        (ck, cv), outs = jax.lax.scan(body, (cache_k, cache_v), jnp.arange(LAYERS, dtype=jnp.int32))
        return outs, ck, cv

    return jax.jit(run, donate_argnums=(3, 4))


def gelu_epilogue_fused() -> dict:
    """Does XLA put the tanh-GELU of fc1 into the cuBLAS GEMM epilogue? (several spellings, and ms)"""
    x = jnp.ones((4680, 1536), jnp.bfloat16)
    w = jnp.ones((1536, 8960), jnp.bfloat16) * 0.01
    b = jnp.zeros((8960,), jnp.bfloat16)
    f32 = jnp.float32
    c = 0.7978845608028654

    variants = {
        "jax_gelu_bf16": lambda x, w, b: jax.nn.gelu(x @ w + b, approximate=True),
        "jax_gelu_f32": lambda x, w, b: jax.nn.gelu(
            jnp.dot(x, w, preferred_element_type=f32) + b.astype(f32), approximate=True
        ).astype(jnp.bfloat16),
        "manual_bf16": lambda x, w, b: (lambda h: 0.5 * h * (1 + jnp.tanh(c * (h + 0.044715 * h * h * h))))(x @ w + b),
        "plain_matmul": lambda x, w, b: x @ w + b,
    }
    out = {}
    for name, fn in variants.items():
        compiled = jax.jit(fn).lower(x, w, b).compile()
        hlo = compiled.as_text()
        out[name] = {
            "gelu_in_epilogue": "GELU" in hlo,
            "bias_in_epilogue": "BIAS" in hlo,
            "fusions": hlo.count(" fusion("),
            "ms": median_ms(compiled, x, w, b),
        }
    return out


def taehv_decode_ms() -> dict:
    """The tiny decoder at 480x832 (60x104 latents), bf16, 1 and 3 latents per call."""
    from causal_dit_jax.autoencoders.taehv import TAEHVDecoder, get_taehv_preset, taehv_flops
    from causal_dit_jax.model.random_params import random_params

    dec = TAEHVDecoder(get_taehv_preset("taew2.1").replace(dtype="bfloat16", param_dtype="bfloat16"))
    params = random_params(dec.abstract_params(), 0)
    step = jax.jit(dec.decode_chunk)
    out = {}
    for n in (1, 3):
        z = jax.random.normal(jax.random.key(n), (1, n, 60, 104, 16), jnp.float32)
        cache = dec.init_decode_cache(1, 60, 104, wan_first_frame=False)
        ms = median_ms(step, params, z, cache, repeats=10)
        out[f"{n}_latents_ms"] = ms
        out[f"{n}_latents_tflops"] = taehv_flops(dec.config, n, 60, 104) / ms / 1e9
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    key = jax.random.key(0)
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (1, TOKENS, HEADS, HEAD_DIM), jnp.bfloat16)
    k_new = jax.random.normal(ks[1], (1, TOKENS, HEADS, HEAD_DIM), jnp.bfloat16)
    v_new = jax.random.normal(ks[4], (1, TOKENS, HEADS, HEAD_DIM), jnp.bfloat16)
    shape = (LAYERS, 1, 32768, HEADS, HEAD_DIM)  # 7 x 4680 = 32760 keys, aligned up for whole pages
    state = {"k": jax.random.normal(ks[2], shape, jnp.bfloat16), "v": jax.random.normal(ks[3], shape, jnp.bfloat16)}
    result = {"gemm": gelu_epilogue_fused(), "taehv": taehv_decode_ms(), "loops": {}}
    print(result, flush=True)
    for valid in (1, 4, 7):
        ms, ref = timed(layer_loop(None), state, q, k_new, v_new, valid)
        row = {"slice_ms": ms}
        for page in (64, 128, 256, 512, 1024):
            try:
                ms, out = timed(layer_loop(page), state, q, k_new, v_new, valid)
                row[f"paged{page}_ms"] = ms
                row[f"paged{page}_maxdiff"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            except Exception as e:  # noqa: BLE001 - a probe: report what cuDNN refuses
                row[f"paged{page}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        result["loops"][f"valid_slots_{valid}"] = row
        print(valid, row, flush=True)
    if args.json:
        write_json(args.json, **result)


if __name__ == "__main__":
    main()
