"""Shared builders for DiT tests: a small PyTorch reference with random weights, saved as real files."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from torch_reference.causal_wan import CausalWanModel, randomize_parameters_

from causal_dit_jax.model.config import ModelConfig

# 12 heads like Wan, head_dim 16 (RoPE split 4/2/2 pairs), 2 layers; a non-square 4x6 token grid.
SMALL = ModelConfig(
    dim=192,
    ffn_dim=256,
    num_heads=12,
    num_layers=2,
    text_dim=32,
    text_len=8,
    freq_dim=32,
    param_dtype="float32",
    dtype="float32",
    residual_dtype="float32",
)
LATENT_H, LATENT_W = 8, 12


def torch_model(config: ModelConfig = SMALL, seed: int = 0, local_attn_size: int = -1, sink_size: int = 0) -> CausalWanModel:
    model = CausalWanModel(
        dim=config.dim,
        ffn_dim=config.ffn_dim,
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        in_dim=config.in_dim,
        out_dim=config.out_dim,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        eps=config.eps,
        patch_size=config.patch_size,
        local_attn_size=local_attn_size,
        sink_size=sink_size,
    )
    randomize_parameters_(model, seed=seed, std=0.05)
    return model.eval()


def save_self_forcing_pt(model: torch.nn.Module, path: pathlib.Path, prefix: str = "model.") -> pathlib.Path:
    """The Self-Forcing layout: {'generator': sd, 'generator_ema': sd} with `model.`-prefixed keys."""
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"generator": sd, "generator_ema": sd}, path)
    return path


def save_safetensors(model: torch.nn.Module, path: pathlib.Path) -> pathlib.Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (Frobenius norms over the whole tensor)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def two_chunk_forwards(dit, latent_h: int, latent_w: int, prepare=None):
    """Random params (key 0) and text (key 1) for `dit`; a cache-filling forward of a 3-frame chunk at
    t = 0 from frame 0, then the next chunk (the same noise, halved) at t = 937.5 from frame 3 over
    that cache. Returns the second chunk's flow and the cache (the path every attention kernel and
    q/k norm implementation is compared on). prepare: applied to the params first."""
    import jax
    import jax.numpy as jnp

    from causal_dit_jax import InferenceConfig

    cfg = dit.config
    params = dit.init(jax.random.key(0))
    if prepare is not None:
        params = prepare(params)
    text = dit.encode_text(params, jax.random.normal(jax.random.key(1), (1, cfg.text_len, cfg.text_dim)))
    cache = dit.init_cache(InferenceConfig(), 1, 6, latent_h, latent_w)
    rope = dit.rope_tables(6, latent_h, latent_w)
    x = jax.random.normal(jax.random.key(2), (1, 3, latent_h, latent_w, cfg.in_dim))
    fwd = jax.jit(dit.forward)
    _, cache = fwd(params, x, jnp.zeros((1, 3)), text, cache, 0, rope)
    return fwd(params, 0.5 * x, jnp.full((1, 3), 937.5), text, cache, 3, rope)
