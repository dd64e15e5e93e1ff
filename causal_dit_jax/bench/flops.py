"""Analytic FLOP count of one DiT chunk forward (for MFU), stated from the config's shapes.

Per layer, with L chunk tokens attending to S keys (the chunk included) and K text tokens, C width,
H FFN width: linear layers 2 L (3C^2 [qkv] + C^2 [o] + 2C^2 [cross q, o] + 2 C H [ffn]); self-attention
4 L S C (q k^T and p v); cross-attention 4 L K C. The text K/V projection runs once per prompt and
is not counted; patch embedding, time MLPs and head are under 0.1% and are left out. At 480x832
(L = 4680, K = 512) this gives 16.18 TF + 0.8626 GF per cached token.
"""

from __future__ import annotations

from causal_dit_jax.model.config import ModelConfig


def chunk_forward_flops_parts(
    config: ModelConfig, chunk_tokens: int, attended_tokens: int, text_tokens: int | None = None
) -> dict[str, float]:
    """One chunk forward's FLOPs by kind: {'linear', 'self_attention', 'cross_attention'}."""
    c, h, L = config.dim, config.ffn_dim, chunk_tokens
    k = config.text_len if text_tokens is None else text_tokens
    n = config.num_layers
    return {
        "linear": float(n * 2 * L * (3 * c * c + c * c + 2 * c * c + 2 * c * h)),
        "self_attention": float(n * 4 * L * attended_tokens * c),
        "cross_attention": float(n * 4 * L * k * c),
    }


def chunk_forward_flops(config: ModelConfig, chunk_tokens: int, attended_tokens: int, text_tokens: int | None = None) -> float:
    return sum(chunk_forward_flops_parts(config, chunk_tokens, attended_tokens, text_tokens).values())


def attended_frames(num_chunks: int, frames_per_chunk: int, window_frames: int | None = None) -> list[int]:
    """Latent frames of keys each chunk attends to: min(E, window) for the chunk ending at frame E
    (Self-Forcing's sink plus most recent frames add up to the window once it is full)."""
    ends = [(j + 1) * frames_per_chunk for j in range(num_chunks)]
    return ends if window_frames is None or window_frames == -1 else [min(e, window_frames) for e in ends]


def rollout_flops_parts(
    config: ModelConfig,
    chunk_tokens: int,
    num_chunks: int,
    forwards_per_chunk: int,
    text_tokens: int | None = None,
    *,
    window_frames: int | None = None,
    frames_per_chunk: int = 3,
) -> dict[str, float]:
    """All forwards of a rollout by kind (`chunk_forward_flops_parts`): chunk j attends to
    min((j + 1) c, window) frames of keys (c = frames_per_chunk frames of chunk_tokens / c tokens each).

    window_frames: Self-Forcing's local_attn_size in latent frames (None or -1: the whole history).
    Only the attended keys count: the frames a part-chunk window masks out are not FLOPs of the model.
    """
    total = {"linear": 0.0, "self_attention": 0.0, "cross_attention": 0.0}
    for seen in attended_frames(num_chunks, frames_per_chunk, window_frames):
        attended = seen * chunk_tokens // frames_per_chunk
        for kind, f in chunk_forward_flops_parts(config, chunk_tokens, attended, text_tokens).items():
            total[kind] += forwards_per_chunk * f
    return total


def rollout_flops(config: ModelConfig, chunk_tokens: int, num_chunks: int, forwards_per_chunk: int, **kw) -> float:
    """All forwards of a rollout (`rollout_flops_parts`'s arguments), summed over the kinds."""
    return sum(rollout_flops_parts(config, chunk_tokens, num_chunks, forwards_per_chunk, **kw).values())
