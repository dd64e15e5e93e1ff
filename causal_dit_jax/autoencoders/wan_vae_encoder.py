"""The Wan2.1 VAE encoder in Flax NNX, channels-last, streaming with explicit causal-conv caches.

Frames [B, T, H, W, 3] in [-1, 1] -> normalised latents [B, T', H/8, W/8, z_dim] ((mu - mean) / std with
the config's latent statistics). Built from the decoder's blocks (`wan_vae.py`: Conv, causal_conv,
RMSNorm, ResidualBlock, Middle, Head). Parameters are a plain pytree (see `WanVAEEncoder.init`):

    {'conv1': {kernel [1,1,1,2z,2z], bias},
     'encoder': {'conv1', 'stage0'..'stage3': {'res0', 'res1', 'downsample'?: {'resample', 'time_conv'?}},
                 'middle': {'res0', 'attn', 'res1'}, 'head': {'norm', 'conv'}}}

Wan's `Encoder3d`: conv1 (3 -> dim, 3x3x3 causal); per stage `num_res_blocks` residual blocks, then
(except after the last stage) a downsample: 'downsample2d' (zero-pad right and bottom by 1, a 3x3
conv of stride 2, per frame) or 'downsample3d' (the same, then a (3, 1, 1) time conv of stride 2);
middle (residual, per-frame attention, residual); head (norm, SiLU, causal conv to 2 z_dim). Then
the VAE's conv1 (1x1x1, 2z -> 2z); mu is its first z_dim channels (the log-variance is unused).

Streaming: Wan's `encode` runs frame 0 alone, then chunks of 4 frames, every cache carried. Here each
causal 3x3x3 conv keeps the last CACHE_T = 2 frames of its input (zeros at a video's start, which is
exactly the zero padding Wan's first call sees), and each downsample3d time conv keeps the last frame
of its input: the next chunk's time conv reads [that frame, the chunk's frames] with stride 2. A
video's first frame passes a downsample3d unchanged (and is its time conv's first history frame), so
1 + 4k frames give 1 + k latents. A chunk is 1 + 4k frames for a video's start and 4k frames after
that, in any split: the latents are those of one pass (and of Wan's 1, 4, 4, ... order).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx, struct

from causal_dit_jax.autoencoders.wan_vae import (
    CACHE_T,
    Conv,
    Head,
    Middle,
    Params,
    PureModule,
    ResidualBlock,
    VAEConfig,
    causal_conv,
    stage_cache,
    zeros_cache,
)
from causal_dit_jax.model.config import dtype_from_name


@struct.dataclass
class VAEEncodeCache:
    """Causal-conv caches of the encoder: a dict tree (mirroring the encoder's modules) of
    [B, CACHE_T, H_l, W_l, C_l] arrays, one per cached 3x3x3 conv, and [B, 1, H_l, W_l, C_l] for each
    downsample3d time conv (22 + 2 for Wan2.1).

    first_chunk (static): the next chunk starts the video (1 + 4k frames; the caches are zeros and a
    downsample3d passes frame 0 through). False after the first call.
    """

    convs: dict
    first_chunk: bool = struct.field(pytree_node=False, default=True)


class Downsample(nnx.Module):
    """Wan's Resample 'downsample2d' (ZeroPad2d((0, 1, 0, 1)), then a 3x3 conv C -> C of stride 2, per
    frame: H x W -> H/2 x W/2) or 'downsample3d' (then a (3, 1, 1) time conv C -> C of stride 2 over
    [the last frame before the chunk, the chunk]: 2m frames -> m). Cache: {'time_conv'} (one frame)."""

    def __init__(self, dim: int, temporal: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dim = dim
        self.resample = Conv(dim, dim, (3, 3), stride=(2, 2), padding=((0, 1), (0, 1)), **kw)
        self.time_conv = Conv(dim, dim, (3, 1, 1), stride=(2, 1, 1), **kw) if temporal else None

    def __call__(self, x: jax.Array, cache: dict, first_chunk: bool) -> tuple[jax.Array, dict]:
        x = self.resample(x)
        if self.time_conv is None:
            return x, {}
        if first_chunk:
            # Wan's first call: frame 0 passes through, and is the history of the frames after it.
            y = x[:, :1] if x.shape[1] == 1 else jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)
        else:
            y = self.time_conv(jnp.concatenate([cache["time_conv"].astype(x.dtype), x], axis=1))
        return y, {"time_conv": x[:, -1:]}

    def init_cache(self, batch: int, height: int, width: int, dtype) -> dict:
        """height x width: this downsample's input (its time conv runs at half of it)."""
        if self.time_conv is None:
            return {}
        return {"time_conv": jnp.zeros((batch, 1, height // 2, width // 2, self.dim), dtype)}


class EncoderStage(nnx.Module):
    """num_res_blocks residual blocks (res0, res1, ...) and, except in the last stage, a downsample."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, downsample: str | None, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_blocks = num_blocks
        for j in range(num_blocks):
            setattr(self, f"res{j}", ResidualBlock(c_in if j == 0 else c_out, c_out, **kw))
        self.downsample = Downsample(c_out, downsample == "3d", **kw) if downsample else None

    def blocks(self) -> list[tuple[str, ResidualBlock]]:
        return [(f"res{j}", getattr(self, f"res{j}")) for j in range(self.num_blocks)]

    def __call__(self, x: jax.Array, cache: dict, first_chunk: bool) -> tuple[jax.Array, dict]:
        new_cache = {}
        for name, block in self.blocks():
            x, new_cache[name] = block(x, cache[name], zero_cache=first_chunk)
        if self.downsample is not None:
            x, new_cache["downsample"] = self.downsample(x, cache["downsample"], first_chunk)
        return x, new_cache

    def init_cache(self, batch: int, height: int, width: int, dtype) -> dict:
        return stage_cache(self.blocks(), {"downsample": self.downsample}, batch, height, width, dtype)


class Encoder3d(nnx.Module):
    """conv1 (3 -> dims[0]), stage0..stage{n-1}, middle, head (-> 2 z_dim). Input/output [B, T, H, W, C]."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtype_from_name(config.dtype), dtype_from_name(config.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype, rngs=rngs)
        dims = config.encoder_dims
        self.num_stages = len(config.dim_mult)
        self.conv1 = Conv(3, dims[0], (3, 3, 3), **kw)
        for i in range(self.num_stages):
            down = None if i == self.num_stages - 1 else ("3d" if config.temporal_downsample[i] else "2d")
            setattr(self, f"stage{i}", EncoderStage(dims[i], dims[i + 1], config.num_res_blocks, down, **kw))
        self.middle = Middle(dims[-1], **kw)
        self.head = Head(dims[-1], c_out=2 * config.z_dim, **kw)

    def stages(self) -> list[tuple[str, EncoderStage]]:
        return [(f"stage{i}", getattr(self, f"stage{i}")) for i in range(self.num_stages)]

    def __call__(self, x: jax.Array, cache: dict, first_chunk: bool) -> tuple[jax.Array, dict]:
        new_cache = {}
        x, new_cache["conv1"] = causal_conv(self.conv1, x, cache["conv1"], zero_cache=first_chunk)
        for name, stage in self.stages():
            x, new_cache[name] = stage(x, cache[name], first_chunk)
        x, new_cache["middle"] = self.middle(x, cache["middle"], zero_cache=first_chunk)
        x, new_cache["head"] = self.head(x, cache["head"], zero_cache=first_chunk)
        return x, new_cache

    def init_cache(self, batch: int, height: int, width: int, dtype) -> dict:
        """Zero caches for frames of height x width; each downsample halves the resolution after it."""
        cache = {"conv1": zeros_cache(batch, height, width, 3, dtype)}
        for name, stage in self.stages():
            cache[name] = stage.init_cache(batch, height, width, dtype)
            if stage.downsample is not None:
                height, width = height // 2, width // 2
        cache["middle"] = self.middle.init_cache(batch, height, width, dtype)
        cache["head"] = zeros_cache(batch, height, width, self.head.dim, dtype)
        return cache


class WanVAEEncoderModule(nnx.Module):
    """The encoder followed by Wan's `conv1` (1x1x1 on its 2 z_dim channels: mu, then the log-variance)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        pdtype = dtype_from_name(config.param_dtype)
        self.encoder = Encoder3d(config, rngs=rngs)
        # conv1 runs in float32 on the head's output (cast to float32), as the decoder's conv2 does.
        z2 = 2 * config.z_dim
        self.conv1 = Conv(z2, z2, (1, 1, 1), dtype=jnp.float32, param_dtype=pdtype, rngs=rngs)


class WanVAEEncoder(PureModule):
    """The Wan2.1 VAE encoder as pure functions of (params, inputs). Build from a `VAEConfig` (the
    decoder's: one config for both halves); params come from `init` or
    `convert.vae_convert.load_vae_encoder_params`.

    size_multiple: frame heights and widths must be multiples of it, 16: the latents (H/8 x W/8) then
    tile the DiT's 2x2 patches, the rule `app.pipeline.video_spec` applies to generated videos.
    """

    module = WanVAEEncoderModule  # params {'conv1', 'encoder'}

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        self.size_multiple = 2 * config.spatial_factor

    def init_encode_cache(self, batch: int, height: int, width: int) -> VAEEncodeCache:
        """Zero caches for a new video of frames height x width (pixels)."""
        self._check_size(height, width)
        dtype = dtype_from_name(self.config.dtype)
        return VAEEncodeCache(convs=self._abstract.encoder.init_cache(batch, height, width, dtype))

    def num_latents(self, frames: int, first_chunk: bool = True) -> int:
        """Latent frames from `frames` frames: 1 + (T - 1) / 4 for a video's start, else T / 4."""
        f = self.config.temporal_factor
        return 1 + (frames - 1) // f if first_chunk else frames // f

    # ------------------------------------------------------------------ checks (shapes only: before any compute)
    def _check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(
                f"frame height and width must be positive multiples of {m} (x{self.config.spatial_factor} "
                f"encoder, latents in 2x2 DiT patches), got {height}x{width}"
            )

    def check_frames(self, shape: tuple[int, ...], first_chunk: bool) -> None:
        """A ValueError naming what is wrong with frames of `shape` for a chunk (the video's first when
        `first_chunk`): the layout, the size, the frame count."""
        if len(shape) != 5 or shape[-1] != 3:
            raise ValueError(
                f"frames must be [batch, frames, height, width, 3] (channels-last RGB in [-1, 1]), got {tuple(shape)}"
            )
        _, t, h, w, _ = shape
        self._check_size(h, w)
        f = self.config.temporal_factor
        if first_chunk and (t < 1 or (t - 1) % f):
            raise ValueError(
                f"a video's first chunk must be 1 or 1 + {f}k frames (frame 0 gives one latent, then every "
                f"{f} frames one more), got {t}"
            )
        if not first_chunk and (t == 0 or t % f):
            raise ValueError(
                f"after a video's first chunk, chunks must be a positive multiple of {f} frames (one latent per {f}), got {t}"
            )

    def _check_cache(self, shape: tuple[int, ...], cache: VAEEncodeCache) -> None:
        b, _, h, w, _ = shape
        cb, _, ch, cw, _ = cache.convs["conv1"].shape
        if (b, h, w) != (cb, ch, cw):
            raise ValueError(
                f"the cache holds a video of batch {cb} at {ch}x{cw} (init_encode_cache), but the frames are "
                f"batch {b} at {h}x{w}"
            )

    # ------------------------------------------------------------------ encoding
    def encode_chunk(self, params: Params, frames: jax.Array, cache: VAEEncodeCache) -> tuple[jax.Array, VAEEncodeCache]:
        """Frames [B, T, H, W, 3] in [-1, 1] (the chunk after those already in `cache`) -> (normalised
        latents [B, T', H/8, W/8, z_dim] float32, the updated cache).

        T = 1 + 4k for a video's first chunk (T' = 1 + k), 4k after it (T' = k). Pure and jittable (the
        cache's `first_chunk` flag is static: the first chunk compiles once more). Frame counts, sizes
        and a cache of another size are refused with a ValueError at trace time, before any compute.
        """
        cfg = self.config
        self.check_frames(frames.shape, cache.first_chunk)
        self._check_cache(frames.shape, cache)
        model = nnx.merge(self._graphdef, params)
        x, convs = model.encoder(frames.astype(dtype_from_name(cfg.dtype)), cache.convs, cache.first_chunk)
        mu = model.conv1(x.astype(jnp.float32))[..., : cfg.z_dim]
        mean = jnp.asarray(cfg.latent_mean, jnp.float32)
        std = jnp.asarray(cfg.latent_std, jnp.float32)
        return (mu - mean) / std, VAEEncodeCache(convs=convs, first_chunk=False)

    def moments(self, params: Params, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
        """A whole clip [B, 1 + 4k, H, W, 3] in [-1, 1], in one pass -> the posterior's raw mean and
        log-variance [B, 1 + k, H/8, W/8, z_dim] float32 each (no latent statistics applied): what
        training an autoencoder differentiates."""
        self.check_frames(frames.shape, first_chunk=True)
        b, _, h, w, _ = frames.shape
        cache = self.init_encode_cache(b, h, w)
        model = nnx.merge(self._graphdef, params)
        x, _ = model.encoder(frames.astype(dtype_from_name(self.config.dtype)), cache.convs, True)
        moments = model.conv1(x.astype(jnp.float32))
        return moments[..., : self.config.z_dim], moments[..., self.config.z_dim :]

    @functools.cached_property
    def jit_encode_chunk(self):
        """`encode_chunk` under `jax.jit`, kept on the instance (one compile per chunk shape and flag)."""
        return jax.jit(self.encode_chunk)

    def encode(self, params: Params, frames: jax.Array, latents_per_chunk: int | None = 1) -> jax.Array:
        """A whole clip [B, 1 + 4k, H, W, 3] in [-1, 1] -> normalised latents [B, 1 + k, H/8, W/8, z_dim].

        latents_per_chunk: latents per call, the caches carried: 1 is Wan's order (frame 0 alone, then 4
        frames at a time; the least memory), n gives 1 + 4 (n - 1) frames, then 4 n per call; None
        encodes in one pass. The same latents however the clip is split.
        """
        self.check_frames(frames.shape, first_chunk=True)
        if latents_per_chunk is not None and latents_per_chunk < 1:
            raise ValueError(f"latents_per_chunk must be >= 1 or None, got {latents_per_chunk}")
        b, t, h, w, _ = frames.shape
        cache = self.init_encode_cache(b, h, w)
        if latents_per_chunk is None:
            return self.jit_encode_chunk(params, frames, cache)[0]
        f = self.config.temporal_factor
        start, size, outs = 0, 1 + f * (latents_per_chunk - 1), []
        while start < t:
            size = min(size, t - start)
            latents, cache = self.jit_encode_chunk(params, frames[:, start : start + size], cache)
            outs.append(latents)
            start, size = start + size, f * latents_per_chunk
        return jnp.concatenate(outs, axis=1)


def load_vae_encoder(
    ckpt_dir: str | pathlib.Path, sharding: jax.sharding.Sharding | None = None
) -> tuple[WanVAEEncoder, Params]:
    """The encoder and its params from a converted checkpoint folder (its 'vae_encoder' component,
    written by `causal-dit convert --wan-dir` when the VAE file has its encoder half)."""
    from causal_dit_jax.checkpoint import read_checkpoint_config, restore_component

    meta = read_checkpoint_config(ckpt_dir)
    if "vae_encoder" not in meta.get("components", []):
        raise ValueError(
            f"checkpoint {ckpt_dir} has no VAE encoder (it has {meta.get('components')}); convert with "
            "`causal-dit convert --wan-dir ...` from a Wan2.1_VAE.pth that has its encoder.* keys"
        )
    encoder = WanVAEEncoder(VAEConfig.from_dict(meta["vae_encoder"]))
    return encoder, restore_component(ckpt_dir, "vae_encoder", encoder.abstract_params(), sharding)


__all__ = ["CACHE_T", "VAEEncodeCache", "WanVAEEncoder", "load_vae_encoder"]
