"""Analytic FLOP count of one DiT chunk forward (for MFU), stated from the config's shapes.

Per layer, with L chunk tokens attending to S keys (the chunk included) and K text tokens, C width,
H FFN width: linear layers 2 L (3C^2 [qkv] + C^2 [o] + 2C^2 [cross q, o] + 2 C H [ffn]); self-attention
4 L S C (q k^T and p v); cross-attention 4 L K C. The text K/V projection runs once per prompt and
is not counted; patch embedding, time MLPs and head are under 0.1% and are left out. At 480x832
(L = 4680, K = 512) this gives 16.18 TF + 0.8626 GF per cached token, the figure of
shared/reference/gpu_baseline.md.
"""

from __future__ import annotations

from causal_dit_jax.config import ModelConfig


def chunk_forward_flops(config: ModelConfig, chunk_tokens: int, attended_tokens: int,
                        text_tokens: int | None = None) -> float:
    c, h, L = config.dim, config.ffn_dim, chunk_tokens
    k = config.text_len if text_tokens is None else text_tokens
    linear = 2 * L * (3 * c * c + c * c + 2 * c * c + 2 * c * h)
    self_attn = 4 * L * attended_tokens * c
    cross_attn = 4 * L * k * c
    return float(config.num_layers * (linear + self_attn + cross_attn))


def rollout_flops(config: ModelConfig, chunk_tokens: int, num_chunks: int, forwards_per_chunk: int,
                  window_chunks: int | None = None, text_tokens: int | None = None) -> float:
    """All forwards of a rollout: chunk j attends to min(j + 1, window) chunks of keys."""
    total = 0.0
    for j in range(num_chunks):
        seen = j + 1 if window_chunks is None else min(j + 1, window_chunks)
        total += forwards_per_chunk * chunk_forward_flops(config, chunk_tokens, seen * chunk_tokens, text_tokens)
    return total
