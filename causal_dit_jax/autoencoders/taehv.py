"""The tiny TAEHV-style decoder for Wan2.1 latents (public `taew2_1` weights), channels-last, streaming.

A preview decoder: ~1/100 of the Wan VAE's FLOPs, the same latent space (the DiT's normalised latents go
in unchanged) and the same frame counts (T latents -> 1 + 4 (T - 1) frames). Video tensors are
[B, T, H, W, C]; all convs are 2D (per frame); time mixing happens only in the memory blocks, which
see the previous frame's input, and in the time-grow 1x1 convs, which turn one frame into `stride`.

Layers (the PyTorch `decoder` Sequential indices in brackets, used by `convert/taehv_convert.py`):
    clamp: tanh(z / 3) * 3; conv_in [1] 3x3 z -> c0; ReLU
    stage s = 0, 1, 2 (base index 3 + 6 s):
        mem0..mem2 [base..base+2]: relu(conv3x3 . relu . conv3x3 . relu . conv3x3(cat[x, past]) + x)
        nearest x2 upsample (if space_upscale[s]); tgrow [base+4]: 1x1 conv c -> c * stride, split into
        `stride` frames (stride 2 if time_upscale[s]); proj [base+5]: 3x3 conv c_s -> c_{s+1}, no bias
    ReLU; conv_out [22]: 3x3 c3 -> 3 * patch^2; pixel shuffle; clamp to [0, 1]; we return 2 x - 1.

Streaming: each memory block keeps its last input frame in a `TAEHVDecodeCache` (zeros at the start),
so decoding a video in chunks gives exactly the one-pass result. The first `time_factor - 1` output
frames of a video are dropped (TAEHV's causal alignment with the Wan VAE: latent 0 gives 1 frame).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import struct

from causal_dit_jax.autoencoders.chunked_decode import ChunkedDecode
from causal_dit_jax.model.config import ConfigFields, dtype_from_name, lookup_preset

Params = dict[str, Any]
MEM_BLOCKS = 3  # memory blocks per stage


@dataclasses.dataclass(frozen=True)
class TAEHVConfig(ConfigFields):
    """Shapes and precision of the TAEHV decoder. `channels` are the widths of stages 0-2 and of the
    output conv's input; dtype is the compute dtype, param_dtype how weights are stored."""

    latent_channels: int = 16
    channels: tuple[int, ...] = (256, 128, 64, 64)
    time_upscale: tuple[bool, ...] = (False, True, True)
    space_upscale: tuple[bool, ...] = (True, True, True)
    patch_size: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    # the encoder half (`TAEHVEncoder`): its one width, and which of its 3 stages halve time
    encoder_width: int = 64
    encoder_time_downscale: tuple[bool, ...] = (True, True, False)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "time_upscale", tuple(bool(t) for t in self.time_upscale))
        object.__setattr__(self, "space_upscale", tuple(bool(s) for s in self.space_upscale))
        object.__setattr__(self, "encoder_time_downscale", tuple(bool(t) for t in self.encoder_time_downscale))
        if (
            len(self.channels) != 4
            or len(self.time_upscale) != 3
            or len(self.space_upscale) != 3
            or len(self.encoder_time_downscale) != 3
        ):
            raise ValueError(
                "TAEHV has 3 stages: channels needs 4 entries, time_upscale, space_upscale and "
                f"encoder_time_downscale 3, got {self.channels}, {self.time_upscale}, {self.space_upscale}, "
                f"{self.encoder_time_downscale}"
            )
        dtype_from_name(self.dtype)
        dtype_from_name(self.param_dtype)

    @property
    def time_factor(self) -> int:
        return 2 ** sum(self.time_upscale)

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame (4), as `VAEConfig.temporal_factor`."""
        return self.time_factor

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent row or column (8), as `VAEConfig.spatial_factor`."""
        return 2 ** sum(self.space_upscale) * self.patch_size

    def num_frames(self, latent_frames: int, first_chunk: bool = True) -> int:
        """Video frames from `latent_frames` latents: 1 + 4 (T - 1) for a video's start, else 4 T."""
        f = self.time_factor
        return 1 + f * (latent_frames - 1) if first_chunk else f * latent_frames


TAEHV_PRESETS: dict[str, TAEHVConfig] = {
    "taew2.1": TAEHVConfig(),  # taew2_1.pth: Wan2.1's 16-channel latents, x4 time, x8 space
    "tiny": TAEHVConfig(channels=(16, 12, 8, 8), encoder_width=8),  # tests and the embedded demo
}


def get_taehv_preset(name: str) -> TAEHVConfig:
    return lookup_preset(TAEHV_PRESETS, name, "TAEHV preset")


@struct.dataclass
class TAEHVDecodeCache:
    """Per memory block, its last input frame [B, 1, H_s, W_s, C_s] (zeros before the video starts),
    and how many leading frames the next call drops (static: the first call compiles once more)."""

    memory: dict
    frames_to_trim: int = struct.field(pytree_node=False, default=0)


# ------------------------------------------------------------------------------------------ layers
def random_conv(rng: jax.Array, param_dtype):
    """conv(c_in, c_out, k=3, bias=True) -> {'kernel' [k, k, c_in, c_out] fan-in normal, 'bias' zeros}, each call
    with a fresh key split off `rng` (the random `init` of the TAEHV encoder and decoder)."""
    keys = iter(jax.random.split(rng, 64))

    def conv(c_in: int, c_out: int, k: int = 3, bias: bool = True) -> Params:
        w = jax.random.normal(next(keys), (k, k, c_in, c_out), jnp.float32) * (k * k * c_in) ** -0.5
        p = {"kernel": w.astype(param_dtype)}
        if bias:
            p["bias"] = jnp.zeros((c_out,), param_dtype)
        return p

    return conv


def conv2d(p: Params, x: jax.Array, dtype, stride: int = 1) -> jax.Array:
    """Per-frame conv in `dtype`: x [B, T, H, W, C_in], kernel [kh, kw, C_in, C_out] (+ bias), padded
    k // 2 on every side as PyTorch's `padding=1` (so stride 2 maps H to ceil(H / 2), window centred
    as PyTorch's, not XLA's 'SAME' which pads only the bottom/right). 1x1 kernels at stride 1 run as a
    matmul over channels; float32 runs at full precision (no TF32)."""
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    kernel = p["kernel"].astype(dtype)
    x = x.astype(dtype)
    if kernel.shape[:2] == (1, 1) and stride == 1:
        y = jnp.einsum("bthwi,io->bthwo", x, kernel[0, 0], precision=precision)
    else:
        b, t = x.shape[:2]
        kh, kw = kernel.shape[:2]
        frames = rearrange(x, "b t h w c -> (b t) h w c")
        y = jax.lax.conv_general_dilated(
            frames,
            kernel,
            (stride, stride),
            [(kh // 2, kh // 2), (kw // 2, kw // 2)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        )
        y = rearrange(y, "(b t) h w c -> b t h w c", b=b, t=t)
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def memory_block(p: Params, x: jax.Array, last: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """x [B, T, H, W, C]; `last` [B, 1, H, W, C] is the frame before x[:, 0]. Frame t sees x[t - 1]."""
    past = jnp.concatenate([last.astype(x.dtype), x[:, :-1]], axis=1)
    h = jax.nn.relu(conv2d(p["conv0"], jnp.concatenate([x, past], axis=-1), dtype))
    h = jax.nn.relu(conv2d(p["conv1"], h, dtype))
    h = conv2d(p["conv2"], h, dtype)
    return jax.nn.relu(h + x), x[:, -1:]  # the decoder's blocks keep their width: identity skip


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, T, H, W, C] -> [B, T, 2H, 2W, C], nearest neighbour."""
    return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)


def time_grow(p: Params, x: jax.Array, stride: int, dtype) -> jax.Array:
    """1x1 conv C -> stride * C, then each frame becomes `stride` frames (channel group k -> frame k)."""
    y = conv2d(p, x, dtype)  # b t h w (k c)
    return rearrange(y, "b t h w (k c) -> b (t k) h w c", k=stride)


def pixel_shuffle(x: jax.Array, patch: int) -> jax.Array:
    """PyTorch's pixel_shuffle, channels-last: [.., H, W, C p p] -> [.., H p, W p, C]."""
    if patch == 1:
        return x
    return rearrange(x, "b t h w (c i j) -> b t (h i) (w j) c", i=patch, j=patch)


# --------------------------------------------------------------------------------------------- API
class TAEHVDecoder(ChunkedDecode):
    """The TAEHV decoder as pure functions of (params, inputs), with the same streaming interface as
    `WanVAE` (`init_decode_cache`, `decode_chunk`, and `decode` from `ChunkedDecode`). Params from `init` or
    `convert.taehv_convert.load_taehv_params`."""

    def __init__(self, config: TAEHVConfig):
        self.config = config

    # ------------------------------------------------------------------ params
    def init(self, rng: jax.Array) -> Params:
        """Random parameters (fan-in normal kernels, zero biases) of the tree documented above."""
        cfg = self.config
        conv = random_conv(rng, dtype_from_name(cfg.param_dtype))
        c = cfg.channels
        params: Params = {"conv_in": conv(cfg.latent_channels, c[0])}
        for s in range(3):
            stage = {
                f"mem{j}": {"conv0": conv(2 * c[s], c[s]), "conv1": conv(c[s], c[s]), "conv2": conv(c[s], c[s])}
                for j in range(MEM_BLOCKS)
            }
            stride = 2 if cfg.time_upscale[s] else 1
            stage["tgrow"] = conv(c[s], c[s] * stride, k=1, bias=False)
            stage["proj"] = conv(c[s], c[s + 1], bias=False)
            params[f"stage{s}"] = stage
        params["conv_out"] = conv(c[3], 3 * cfg.patch_size**2)
        return params

    def abstract_params(self) -> Params:
        """ShapeDtypeStructs of the parameter tree (no memory)."""
        return jax.eval_shape(self.init, jax.random.key(0))

    # ------------------------------------------------------------------ decoding
    def stage_shapes(self, latent_height: int, latent_width: int) -> list[tuple[int, int, int]]:
        """(H, W, C) seen by each stage's memory blocks."""
        cfg = self.config
        h, w, out = latent_height, latent_width, []
        for s in range(3):
            out.append((h, w, cfg.channels[s]))
            if cfg.space_upscale[s]:
                h, w = 2 * h, 2 * w
        return out

    def init_decode_cache(
        self, batch: int, latent_height: int, latent_width: int, wan_first_frame: bool = True
    ) -> TAEHVDecodeCache:
        """Zero memories for a new video. wan_first_frame=True drops the first time_factor - 1 frames
        (latent 0 gives 1 frame, as Wan's VAE); False keeps them (every latent gives time_factor)."""
        dtype = dtype_from_name(self.config.dtype)
        memory = {
            f"stage{s}": {f"mem{j}": jnp.zeros((batch, 1, h, w, c), dtype) for j in range(MEM_BLOCKS)}
            for s, (h, w, c) in enumerate(self.stage_shapes(latent_height, latent_width))
        }
        return TAEHVDecodeCache(memory, self.config.time_factor - 1 if wan_first_frame else 0)

    def decode_chunk(self, params: Params, z: jax.Array, cache: TAEHVDecodeCache) -> tuple[jax.Array, TAEHVDecodeCache]:
        """Normalised latents z [B, T, h, w, C_lat] (following those already in `cache`) ->
        (frames [B, T', 8h, 8w, 3] float32 in [-1, 1], the updated cache); T' = 4 T, less the dropped
        leading frames on a video's first call. Pure and jittable."""
        cfg = self.config
        if z.ndim != 5 or z.shape[-1] != cfg.latent_channels:
            raise ValueError(
                f"latents must be [batch, frames, height, width, {cfg.latent_channels}] (channels-last), got {z.shape}"
            )
        want = self.stage_shapes(z.shape[2], z.shape[3])[0]
        have = cache.memory["stage0"]["mem0"].shape
        if have[0] != z.shape[0] or have[2:] != want:
            raise ValueError(f"decode cache was made for batch {have[0]} at {have[2]}x{have[3]} latents, got latents {z.shape}")
        dtype = dtype_from_name(cfg.dtype)
        x = jnp.tanh(z.astype(jnp.float32) / 3.0) * 3.0
        x = jax.nn.relu(conv2d(params["conv_in"], x, dtype))
        memory = {}
        for s in range(3):
            stage, mem = params[f"stage{s}"], {}
            for j in range(MEM_BLOCKS):
                x, mem[f"mem{j}"] = memory_block(stage[f"mem{j}"], x, cache.memory[f"stage{s}"][f"mem{j}"], dtype)
            memory[f"stage{s}"] = mem
            if cfg.space_upscale[s]:
                x = upsample_nearest(x)
            x = time_grow(stage["tgrow"], x, 2 if cfg.time_upscale[s] else 1, dtype)
            x = conv2d(stage["proj"], x, dtype)
        x = conv2d(params["conv_out"], jax.nn.relu(x), dtype)
        x = pixel_shuffle(x.astype(jnp.float32), cfg.patch_size)
        x = x[:, cache.frames_to_trim :]
        return jnp.clip(x, 0.0, 1.0) * 2.0 - 1.0, TAEHVDecodeCache(memory, 0)


def taehv_flops(config: TAEHVConfig, latent_frames: int, latent_height: int, latent_width: int) -> float:
    """Conv FLOPs (2 x MACs) of decoding `latent_frames` latents (no trimming), for the benchmark."""
    c = config.channels
    frames, h, w, total = latent_frames, latent_height, latent_width, 0.0
    total += 2 * 9 * config.latent_channels * c[0] * frames * h * w
    for s in range(3):
        total += MEM_BLOCKS * 2 * 9 * (2 * c[s] * c[s] + 2 * c[s] * c[s]) * frames * h * w
        if config.space_upscale[s]:
            h, w = 2 * h, 2 * w
        stride = 2 if config.time_upscale[s] else 1
        total += 2 * c[s] * c[s] * stride * frames * h * w
        frames *= stride
        total += 2 * 9 * c[s] * c[s + 1] * frames * h * w
    total += 2 * 9 * c[3] * 3 * config.patch_size**2 * frames * h * w
    return total


__all__ = ["TAEHVConfig", "TAEHV_PRESETS", "get_taehv_preset", "TAEHVDecodeCache", "TAEHVDecoder", "taehv_flops"]
