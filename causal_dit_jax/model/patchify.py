"""Latents <-> tokens. Latent layout is channels-last: [B, F, H, W, C].

PyTorch's Wan model takes [B, C, F, H, W] and Self-Forcing's pipeline [B, F, C, H, W]; use
`from_torch_layout` / `to_torch_layout` to move between them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange


def patchify(x: jax.Array, patch_size: tuple[int, int, int]) -> jax.Array:
    """[B, F, H, W, C] -> tokens [B, F*(H/ph)*(W/pw), ph*pw*C], order (frame, row, col); c fastest."""
    _, ph, pw = patch_size
    return rearrange(x, "b f (h p) (w q) c -> b (f h w) (p q c)", p=ph, q=pw)


def unpatchify(tokens: jax.Array, frames: int, grid_h: int, grid_w: int,
               patch_size: tuple[int, int, int]) -> jax.Array:
    """tokens [B, F*h*w, ph*pw*C] -> [B, F, h*ph, w*pw, C] (Wan's `fhwpqrc->cfphqwr`, channels last)."""
    _, ph, pw = patch_size
    return rearrange(tokens, "b (f h w) (p q c) -> b f (h p) (w q) c", f=frames, h=grid_h, w=grid_w,
                     p=ph, q=pw)


def latents_to_tokens(config, x: jax.Array, t: jax.Array) -> tuple[jax.Array, tuple[int, int, int]]:
    """Check a latent chunk x [B, F, H, W, C_in] and its timesteps t [B, F]; return its patch tokens
    [B, F*h*w, ph*pw*C_in] and the token grid (F, h, w). `config` is the model's `ModelConfig`."""
    b, f, h, w, c = x.shape
    if c != config.in_dim:
        raise ValueError(f"latents must have {config.in_dim} channels (channels-last), got shape {x.shape}")
    if t.shape != (b, f):
        raise ValueError(f"timesteps must be [batch, frames] = {(b, f)}, got {t.shape}")
    config.tokens_per_frame(h, w)
    _, ph, pw = config.patch_size
    return patchify(x, config.patch_size), (f, h // ph, w // pw)


def tokens_to_latents(config, tokens: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
    """Output tokens [B, F*h*w, ph*pw*C_out] on the grid (F, h, w) -> latents [B, F, H, W, C_out]."""
    return unpatchify(tokens, *grid, config.patch_size)


def from_torch_layout(x, layout: str = "bfchw"):
    """PyTorch latents to [B, F, H, W, C]: layout 'bfchw' (Self-Forcing pipeline) or 'bcfhw' (Wan model)."""
    if layout == "bfchw":
        return jnp.transpose(jnp.asarray(x), (0, 1, 3, 4, 2))
    if layout == "bcfhw":
        return jnp.transpose(jnp.asarray(x), (0, 2, 3, 4, 1))
    raise ValueError(f"unknown layout {layout!r}; expected 'bfchw' or 'bcfhw'")


def to_torch_layout(x, layout: str = "bfchw"):
    """[B, F, H, W, C] to PyTorch latents in `layout` ('bfchw' or 'bcfhw')."""
    if layout == "bfchw":
        return jnp.transpose(jnp.asarray(x), (0, 1, 4, 2, 3))
    if layout == "bcfhw":
        return jnp.transpose(jnp.asarray(x), (0, 4, 1, 2, 3))
    raise ValueError(f"unknown layout {layout!r}; expected 'bfchw' or 'bcfhw'")
