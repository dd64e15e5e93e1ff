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


def unpatchify(tokens: jax.Array, frames: int, grid_h: int, grid_w: int, patch_size: tuple[int, int, int]) -> jax.Array:
    """tokens [B, F*h*w, ph*pw*C] -> [B, F, h*ph, w*pw, C] (Wan's `fhwpqrc->cfphqwr`, channels last)."""
    _, ph, pw = patch_size
    return rearrange(tokens, "b (f h w) (p q c) -> b f (h p) (w q) c", f=frames, h=grid_h, w=grid_w, p=ph, q=pw)


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


# PyTorch layout -> einops pattern of its last axes; any leading axes (batch, or none) pass through.
TORCH_LAYOUTS = {"bfchw": "f c h w", "bcfhw": "c f h w"}


def _layout_pattern(layout: str, x) -> str:
    if layout not in TORCH_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(TORCH_LAYOUTS)}")
    if x.ndim < 4:
        raise ValueError(f"a {layout!r} tensor needs at least 4 axes (frames, channels, height, width), got {x.shape}")
    return TORCH_LAYOUTS[layout]


def from_torch_layout(x, layout: str = "bfchw"):
    """PyTorch latents to channels-last [..., F, H, W, C]: layout 'bfchw' (Self-Forcing's pipeline,
    [..., F, C, H, W]) or 'bcfhw' (Wan's model input, [..., C, F, H, W]); leading axes (a batch, a
    batch of steps, or none) are kept."""
    x = jnp.asarray(x)
    return rearrange(x, f"... {_layout_pattern(layout, x)} -> ... f h w c")


def to_torch_layout(x, layout: str = "bfchw"):
    """Channels-last [..., F, H, W, C] to PyTorch latents in `layout` ('bfchw' or 'bcfhw'); leading axes kept."""
    x = jnp.asarray(x)
    return rearrange(x, f"... f h w c -> ... {_layout_pattern(layout, x)}")
