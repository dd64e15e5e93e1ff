"""The tiny TAEHV encoder (the `encoder.*` half of `taew2_1.pth`): frames -> Wan2.1 latents, fast and
approximate, channels-last, whole clip at once.

The latents are in the space the DiT and our `TAEHVDecoder` read (TAEHV is trained to match the Wan
VAE's normalised latents directly; no scale or shift is applied). About 1/100 of the Wan VAE
encoder's cost, and an approximation of it: use it for previews, video-to-video drafts and tests,
the Wan VAE encoder (`WanVAEEncoder`) where fidelity matters.

Layers (the PyTorch `encoder` Sequential indices in brackets, used by `convert/taehv_convert.py`);
every conv is 2D (per frame), widths are all `encoder_width` (64):
    frames [-1, 1] -> [0, 1]; pixel unshuffle (patch_size > 1)
    conv_in [0] 3x3 3 patch^2 -> e; ReLU [1]
    stage s = 0, 1, 2 (base index 2 + 5 s):
        tpool [base]: `stride` consecutive frames stacked on channels (frame k -> channel group k),
            1x1 conv stride e -> e, no bias (stride 2 if encoder_time_downscale[s], else 1)
        down [base+1]: 3x3 conv e -> e, spatial stride 2, no bias
        mem0..mem2 [base+2..base+4]: relu(conv3x3 . relu . conv3x3 . relu . conv3x3(cat[x, past]) + x),
            past = the previous frame's input to the block (zeros before the first)
    conv_out [17] 3x3 e -> latent_channels (no clamp: the decoder's tanh clamp reads them)

Frame-count rule (the published `TAEHV.encode_video`): T frames are padded AT THE END, by repeating
the last frame, to a multiple of 4 (the encoder time factor), so T' = ceil(T / 4) latents. Wan's
convention T = 1 + 4k gives T' = k + 1, the Wan VAE's own count, and our TAEHV decoder turns those
k + 1 latents back into 1 + 4k frames; any other T works too. Spatially H, W -> H / 8, W / 8 (times
patch_size), so H and W must be multiples of 8 * patch_size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from causal_dit_jax.autoencoders.taehv import MEM_BLOCKS, Params, TAEHVConfig, conv2d, memory_block, random_conv
from causal_dit_jax.model.config import dtype_from_name

ENCODER_STAGES = 3


def encoder_time_factor(config: TAEHVConfig) -> int:
    """Video frames per latent frame of the encoder (4 for taew2_1)."""
    return 2 ** sum(config.encoder_time_downscale)


def encoder_spatial_factor(config: TAEHVConfig) -> int:
    """Pixels per latent row or column of the encoder (8: three stride-2 convs, times patch_size)."""
    return 2**ENCODER_STAGES * config.patch_size


def encoded_frames(config: TAEHVConfig, num_frames: int) -> int:
    """Latent frames from `num_frames` video frames: ceil(T / 4) (1 + 4k -> 1 + k)."""
    return -(-num_frames // encoder_time_factor(config))


def pixel_unshuffle(x: jax.Array, patch: int) -> jax.Array:
    """PyTorch's pixel_unshuffle, channels-last: [.., H p, W p, C] -> [.., H, W, C p p]."""
    if patch == 1:
        return x
    return rearrange(x, "b t (h i) (w j) c -> b t h w (c i j)", i=patch, j=patch)


def time_pool(p: Params, x: jax.Array, stride: int, dtype) -> jax.Array:
    """`stride` consecutive frames -> one: stack them on channels (frame k -> group k), 1x1 conv."""
    return conv2d(p, rearrange(x, "b (t k) h w c -> b t h w (k c)", k=stride), dtype)


class TAEHVEncoder:
    """The TAEHV encoder as pure functions of (params, frames). Params from `init` or
    `convert.taehv_convert.load_taehv_encoder_params`; config is the decoder's `TAEHVConfig` (its
    latent_channels, patch_size, encoder_width, encoder_time_downscale and dtypes)."""

    def __init__(self, config: TAEHVConfig):
        self.config = config

    @property
    def temporal_factor(self) -> int:
        return encoder_time_factor(self.config)

    @property
    def spatial_factor(self) -> int:
        return encoder_spatial_factor(self.config)

    def num_latents(self, num_frames: int) -> int:
        return encoded_frames(self.config, num_frames)

    # ------------------------------------------------------------------ params
    def init(self, rng: jax.Array) -> Params:
        """Random parameters (fan-in normal kernels, zero biases) of the tree documented above."""
        cfg = self.config
        conv = random_conv(rng, dtype_from_name(cfg.param_dtype))

        e = cfg.encoder_width
        params: Params = {"conv_in": conv(3 * cfg.patch_size**2, e)}
        for s in range(ENCODER_STAGES):
            stride = 2 if cfg.encoder_time_downscale[s] else 1
            stage = {"tpool": conv(e * stride, e, k=1, bias=False), "down": conv(e, e, bias=False)}
            for j in range(MEM_BLOCKS):
                stage[f"mem{j}"] = {"conv0": conv(2 * e, e), "conv1": conv(e, e), "conv2": conv(e, e)}
            params[f"stage{s}"] = stage
        params["conv_out"] = conv(e, cfg.latent_channels)
        return params

    def abstract_params(self) -> Params:
        """ShapeDtypeStructs of the parameter tree (no memory)."""
        return jax.eval_shape(self.init, jax.random.key(0))

    # ------------------------------------------------------------------ encoding
    def check_frames(self, frames) -> None:
        """Name a bad frames shape before any compute."""
        shape = tuple(frames.shape)
        if len(shape) != 5 or shape[-1] != 3:
            raise ValueError(f"frames must be [batch, frames, height, width, 3] (channels-last RGB), got {shape}")
        if shape[1] < 1:
            raise ValueError(f"frames need at least 1 frame, got a frame count of {shape[1]} (shape {shape})")
        f = self.spatial_factor
        if shape[2] % f or shape[3] % f:
            raise ValueError(f"frame height and width must be multiples of {f}, got {shape[2]}x{shape[3]} (shape {shape})")

    def encode(self, params: Params, frames: jax.Array) -> jax.Array:
        """frames [B, T, H, W, 3] in [-1, 1] -> latents [B, ceil(T / 4), H / 8, W / 8, latent_channels]
        float32, in the DiT's latent space. T is padded at the end with copies of the last frame (the
        published `encode_video`). Pure and jittable (shapes are static)."""
        self.check_frames(frames)
        cfg = self.config
        dtype = dtype_from_name(cfg.dtype)
        x = (frames.astype(jnp.float32) + 1.0) * 0.5
        x = pixel_unshuffle(x, cfg.patch_size)
        pad = -x.shape[1] % self.temporal_factor
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[:, -1:], pad, axis=1)], axis=1)
        x = jax.nn.relu(conv2d(params["conv_in"], x, dtype))
        for s in range(ENCODER_STAGES):
            stage = params[f"stage{s}"]
            x = time_pool(stage["tpool"], x, 2 if cfg.encoder_time_downscale[s] else 1, dtype)
            x = conv2d(stage["down"], x, dtype, stride=2)
            zeros = jnp.zeros_like(x[:, :1])
            for j in range(MEM_BLOCKS):
                x, _ = memory_block(stage[f"mem{j}"], x, zeros, dtype)
        return conv2d(params["conv_out"], x, dtype).astype(jnp.float32)

    def jit_encode(self, params: Params, frames: jax.Array) -> jax.Array:
        """`encode` under one jit (compiled once per frames shape)."""
        if not hasattr(self, "_jit_encode"):
            self._jit_encode = jax.jit(self.encode)
        return self._jit_encode(params, frames)


__all__ = ["TAEHVEncoder", "encoded_frames", "encoder_spatial_factor", "encoder_time_factor"]
