"""The Wan2.1 VAE decoder in Flax NNX, channels-last, with functional causal-conv caches (the encoder,
built from the same blocks, is in `wan_vae_encoder.py`).

Video tensors are [B, T, H, W, C]. Parameters are a plain pytree (see `WanVAE.init`):

    {'conv2': {kernel [1,1,1,z,z], bias},
     'decoder': {'conv1', 'middle': {'res0', 'attn', 'res1'}, 'stage0'..'stage3': {'res0'..'res2',
                 'upsample'?: {'resample', 'time_conv'?}}, 'head': {'norm', 'conv'}}}

Conv3d kernels are [t, h, w, C_in, C_out], Conv2d kernels [h, w, C_in, C_out], norm scales [C].

Streaming: every causal 3x3x3 conv (and each upsample3d time conv) keeps the last CACHE_T = 2 frames
of its input in a `VAEDecodeCache` (static shapes, zeros at the start). A chunk of latent frames is
decoded in one pass with each conv's cache prepended, which is exactly Wan's one-latent-at-a-time
decode. With `wan_first_frame=True` (Wan's `decode`), the first chunk skips the time conv for the
video's first frame ('Rep'), so T latents give 1 + 4 (T - 1) frames (21 -> 81) and chunks of 3 give
9, 12, 12, ... frames. With `wan_first_frame=False` (Self-Forcing `demo_utils/vae_block3.py`) every
latent gives 4 frames and the caller drops the first 3 frames of the video.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx, struct

from causal_dit_jax.autoencoders.chunked_decode import ChunkedDecode
from causal_dit_jax.model.config import ConfigFields, dtype_from_name, lookup_preset

Params = dict[str, Any]
CACHE_T = 2  # input frames kept per cached causal conv (= time kernel 3 - 1)
MAX_UNROLLED_FRAMES = 12  # per-frame stages unroll up to one 3-latent chunk's frames, then scan

# Wan2.1 VAE latent statistics (the defaults of VAEConfig.latent_mean / latent_std): z_raw = z * std + mean.
# fmt: off
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# fmt: on


UPSAMPLE_CONVS = ("phases", "repeat")


@dataclasses.dataclass(frozen=True)
class VAEConfig(ConfigFields):
    """Shapes, precision and latent statistics of the Wan VAE, decoder and encoder (names follow Wan's
    `WanVAE_` arguments; the encoder's temporal_downsample is temporal_upsample reversed).

    dtype: compute dtype of convs and activations (norms and softmax run in float32 regardless);
    param_dtype: how weights are stored.
    latent_mean / latent_std: per-channel statistics of the raw latent, z_dim entries each: the encoder
    gives (mu - mean) / std, the decoder takes z * std + mean. Wan2.1's by default; a VAE of one's own
    carries its own (saved with the checkpoint's config).
    """

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_upsample: tuple[bool, ...] = (True, True, False)
    dtype: str = "float32"
    param_dtype: str = "float32"
    # The last `per_frame_stages` stages, the space half of the upsample feeding them and the head run
    # one frame at a time (unrolled; caches carried): the same frames, with the activations of the two
    # largest resolutions held for one frame instead of 4 per latent. 0: all frames at once.
    per_frame_stages: int = 2
    # How the upsample's "nearest x2, then 3x3 conv" runs: 'phases' computes each of the 4 output
    # phases as a 2x2 conv of the low-resolution frame (the weights summed where the repeated pixels
    # meet one tap), then interleaves them: the x2 input is never made, and 16/36 of the MACs.
    # 'repeat': Wan's order, literally (the x2 frame, then the 3x3 conv). Same function.
    upsample_conv: str = "phases"
    latent_mean: tuple[float, ...] = LATENT_MEAN
    latent_std: tuple[float, ...] = LATENT_STD

    def __post_init__(self):
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "latent_mean", tuple(float(m) for m in self.latent_mean))
        object.__setattr__(self, "latent_std", tuple(float(s) for s in self.latent_std))
        object.__setattr__(self, "temporal_upsample", tuple(bool(t) for t in self.temporal_upsample))
        if len(self.temporal_upsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_upsample needs {len(self.dim_mult) - 1} entries (one per upsample), got {self.temporal_upsample}"
            )
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(
                f"latent_mean and latent_std need z_dim={self.z_dim} entries each (one per latent channel), "
                f"got {len(self.latent_mean)} and {len(self.latent_std)}"
            )
        if not all(s > 0 for s in self.latent_std):
            raise ValueError(f"latent_std must be positive, got {self.latent_std}")
        dtype_from_name(self.dtype)
        dtype_from_name(self.param_dtype)
        if self.upsample_conv not in UPSAMPLE_CONVS:
            raise ValueError(f"upsample_conv must be one of {UPSAMPLE_CONVS}, got {self.upsample_conv!r}")
        stages = len(self.dim_mult)
        if not 0 <= self.per_frame_stages <= stages:
            raise ValueError(f"per_frame_stages must be in [0, {stages}], got {self.per_frame_stages}")
        timed = [i for i in range(stages - self.per_frame_stages, stages - 1) if self.temporal_upsample[i]]
        if timed:
            raise ValueError(
                f"per_frame_stages={self.per_frame_stages} includes stage {timed[0]}, whose temporal "
                "upsample makes 2 frames of each: only stages that keep the frame count run per frame"
            )

    @property
    def decoder_dims(self) -> tuple[int, ...]:
        """Channels entering each decoder stage, then the output width: (384, 384, 384, 192, 96) for Wan."""
        return tuple(self.dim * m for m in (self.dim_mult[-1],) + self.dim_mult[::-1])

    @property
    def encoder_dims(self) -> tuple[int, ...]:
        """Channels after the encoder's conv1, then after each stage: (96, 96, 192, 384, 384) for Wan."""
        return tuple(self.dim * m for m in (1,) + self.dim_mult)

    @property
    def temporal_downsample(self) -> tuple[bool, ...]:
        """The encoder's downsamples that halve the frames: (False, True, True) for Wan."""
        return self.temporal_upsample[::-1]

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_upsample)

    def num_frames(self, latent_frames: int, first_chunk: bool = True) -> int:
        """Video frames from `latent_frames` latents: 1 + 4 (T - 1) for a video's start, else 4 T."""
        f = self.temporal_factor
        return 1 + f * (latent_frames - 1) if first_chunk else f * latent_frames


VAE_PRESETS: dict[str, VAEConfig] = {
    "wan2.1": VAEConfig(),  # Wan2.1_VAE.pth; Wan decodes in float32
    "tiny": VAEConfig(dim=8),  # same structure at 1/12 of the width, for tests and the CPU demo
}


def get_vae_preset(name: str) -> VAEConfig:
    return lookup_preset(VAE_PRESETS, name, "VAE preset")


@struct.dataclass
class VAEDecodeCache:
    """Causal-conv caches of the decoder: a dict tree (mirroring the decoder's modules) of
    [B, CACHE_T, H_l, W_l, C_l] arrays, one per cached conv (32 for Wan2.1).

    first_chunk (static): the next chunk starts the video and gets Wan's first-frame rule; its caches
    are `init_decode_cache`'s zeros, and a conv over one frame skips their time taps.
    tail_newest (static): in the caches of the per-frame stages and the head, the slot (0 or 1) that
    holds the newer frame; each frame overwrites the older slot in place. Every other cache keeps the
    older frame in slot 0. A chunk of an odd number of frames (a video's first) flips it.
    """

    convs: dict
    first_chunk: bool = struct.field(pytree_node=False, default=True)
    tail_newest: int = struct.field(pytree_node=False, default=1)


# --------------------------------------------------------------------------------------------- layers
def _precision(dtype):
    """Full float32 convs for float32 (no TF32 on GPU); the default for bf16."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _fan_in_normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> nnx.Param:
    fan_in = math.prod(shape[:-1])
    return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) / fan_in**0.5).astype(dtype))


class Conv(nnx.Module):
    """A convolution over the trailing axes before C: kernel [*window, C_in, C_out].

    Conv3d layers (window (t, h, w)) see [B, T, H, W, C] with no time padding (the caller prepends
    the cache); Conv2d layers (window (h, w)) run per frame. Space is zero-padded by k // 2 unless
    `padding` ((top, bottom), (left, right)) says otherwise; `stride` (one per window axis, default 1)
    is used by the encoder's downsamples (time stride 2, space stride 2). rows (static, None here): a
    function `causal_conv` applies to the input first; a banded decode (`sharding/decode_bands.py`)
    sets it to add the neighbouring bands' rows, which the conv (padding columns only) then consumes.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        window: tuple[int, ...],
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        stride: tuple[int, ...] | None = None,
        padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
    ):
        self.window = tuple(window)
        self.stride = tuple(stride) if stride is not None else (1,) * len(self.window)
        if len(self.stride) != len(self.window):
            raise ValueError(f"stride {self.stride} needs one entry per window axis {self.window}")
        self.padding = None if padding is None else tuple(tuple(p) for p in padding)
        self.rows = None
        self.dtype = dtype
        self.kernel = _fan_in_normal(rngs, (*window, c_in, c_out), param_dtype)
        self.bias = nnx.Param(jnp.zeros((c_out,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if len(self.window) == 3:
            # A time-valid 3D conv as one 2D conv per output frame, its kt time taps stacked on the
            # channels: out[t] = sum_j conv2d(x[t + j], W[j]). XLA gives rank-5 convs the NCDHW layout
            # on GPUs (transposes around every conv: 40% of the decode time); rank-4 ones stay NHWC.
            kt, st = self.window[0], self.stride[0]
            t_out = (x.shape[1] - kt) // st + 1  # out[t] reads frames st t .. st t + kt - 1
            x = jnp.concatenate([x[:, j : j + st * (t_out - 1) + 1 : st] for j in range(kt)], axis=-1)  # b t h w (kt c)
            kernel = rearrange(kernel, "kt kh kw i o -> kh kw (kt i) o")
        return self._frames_2d(x, kernel)

    def last_tap(self, x: jax.Array) -> jax.Array:
        """A 3D conv over [zeros x (kt - 1), x] for one frame x [B, 1, H, W, C_in]: only the kernel's
        last time tap meets non-zero input -> [B, 1, H, W, C_out], at 1 / kt of the work."""
        return self._frames_2d(x.astype(self.dtype), self.kernel[...][-1].astype(self.dtype))  # kernel kh kw i o

    def one_frame(self, frames: list[jax.Array]) -> jax.Array:
        """A 3D conv's output for one frame from its kt input frames, oldest first, each [B, H, W, C_in]
        -> [B, 1, H, W, C_out]: the frames stacked on the channels for one 2D conv (as `__call__`)."""
        kernel2d = rearrange(self.kernel[...].astype(self.dtype), "kt kh kw i o -> kh kw (kt i) o")
        taps = jnp.concatenate([f.astype(self.dtype) for f in frames], axis=-1)[:, None]  # b 1 h w (kt c)
        return self._frames_2d(taps, kernel2d)

    def _frames_2d(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """Every frame of x [B, T, H, W, C_in] through a 2D kernel [kh, kw, C_in, C_out] (space padded by
        k // 2 or `padding`, strided by `stride`; 1x1: a matmul over channels), plus the bias ->
        [B, T, H', W', C_out]."""
        kh, kw = kernel.shape[:2]
        strides = self.stride[-2:]
        if kh == kw == 1 and strides == (1, 1) and self.padding is None:
            y = jnp.einsum("bthwi,io->bthwo", x, kernel[0, 0], precision=_precision(self.dtype))
        else:
            y = jax.lax.conv_general_dilated(
                rearrange(x, "b t h w c -> (b t) h w c"),
                kernel,
                strides,
                self.padding or [(kh // 2, kh // 2), (kw // 2, kw // 2)],
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=_precision(self.dtype),
            )
            y = rearrange(y, "(b t) h w c -> b t h w c", b=x.shape[0])
        return y + self.bias[...].astype(self.dtype)


def causal_conv(
    conv: Conv, x: jax.Array, cache: jax.Array, newest: int | None = None, zero_cache: bool = False
) -> tuple[jax.Array, jax.Array]:
    """x [B, T, H, W, C] with the last CACHE_T input frames before it -> (conv output [B, T, ...],
    the new cache: the last CACHE_T frames of [cache, x], the older in slot 0).

    zero_cache (static): the cache holds zeros (a video's start); with one frame, only the kernel's
    last time tap is computed.

    newest (0 or 1; one frame, T = 1): the cache is a ring whose slot `newest` holds the newer frame.
    The frame is written in place over the older one after the conv has read it, so the new cache
    is the donated buffer itself (its newer frame is now in slot 1 - newest), not a new 2-frame copy."""
    if conv.rows is not None:  # a band of rows: add its neighbours' (the cache keeps them too)
        x = conv.rows(x)
    skip_taps = zero_cache and x.shape[1] == 1 and len(conv.window) == 3
    if newest is None:
        xin = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # b (2 + t) h w c
        return conv.last_tap(x) if skip_taps else conv(xin), xin[:, -CACHE_T:]
    if x.shape[1] != 1:
        raise ValueError(f"a ring cache takes one frame at a time, got {x.shape[1]}")
    older = 1 - newest
    y = conv.last_tap(x) if skip_taps else conv.one_frame([cache[:, older], cache[:, newest], x[:, 0]])
    # The write must wait for the conv's read of the slot it overwrites, or XLA keeps a copy of the cache.
    slot = older + zero_after(y)
    return y, jax.lax.dynamic_update_slice_in_dim(cache, x.astype(cache.dtype), slot, axis=1)


def zero_after(y: jax.Array) -> jax.Array:
    """An int32 0 that XLA can only compute once `y` exists: used as (part of) an index, it orders the
    op that takes it after y's producer. XLA drops `optimization_barrier` before its copy analysis and
    scheduling, but keeps data dependencies: 0 * a float is not folded away (NaN * 0 is NaN), and a
    dynamic (update) slice clamps its index into range."""
    return (y.reshape(-1)[0] * 0).astype(jnp.int32)


class RMSNorm(nnx.Module):
    """Wan's RMS_norm: x / max(||x||_2 over C, 1e-12) * sqrt(C) * scale, in float32."""

    def __init__(self, dim: int, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * math.sqrt(x.shape[-1]) * self.scale[...].astype(jnp.float32)
        return y.astype(x.dtype)


def zeros_cache(batch: int, height: int, width: int, channels: int, dtype) -> jax.Array:
    return jnp.zeros((batch, CACHE_T, height, width, channels), dtype)


# --------------------------------------------------------------------------------------------- blocks
class ResidualBlock(nnx.Module):
    """norm1, SiLU, conv1 (3x3x3 causal), norm2, SiLU, conv2 (3x3x3 causal), plus a 1x1x1 shortcut
    when the width changes. Dropout is inference-off. Cache: {'conv1', 'conv2'}."""

    def __init__(self, c_in: int, c_out: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_in, self.c_out = c_in, c_out
        self.norm1 = RMSNorm(c_in, param_dtype)
        self.conv1 = Conv(c_in, c_out, (3, 3, 3), **kw)
        self.norm2 = RMSNorm(c_out, param_dtype)
        self.conv2 = Conv(c_out, c_out, (3, 3, 3), **kw)
        self.shortcut = Conv(c_in, c_out, (1, 1, 1), **kw) if c_in != c_out else None

    def __call__(
        self, x: jax.Array, cache: dict, newest: int | None = None, zero_cache: bool = False
    ) -> tuple[jax.Array, dict]:
        h, c1 = causal_conv(self.conv1, jax.nn.silu(self.norm1(x)), cache["conv1"], newest, zero_cache)
        h, c2 = causal_conv(self.conv2, jax.nn.silu(self.norm2(h)), cache["conv2"], newest, zero_cache)
        skip = self.shortcut(x) if self.shortcut is not None else x
        return skip + h, {"conv1": c1, "conv2": c2}

    def init_cache(self, batch: int, height: int, width: int, dtype) -> dict:
        return {
            "conv1": zeros_cache(batch, height, width, self.c_in, dtype),
            "conv2": zeros_cache(batch, height, width, self.c_out, dtype),
        }


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame (Wan's middle block); no cache.
    whole_frame (static, None here): (gather, keep), for a band of rows: the whole frame is gathered,
    attended, and the band's rows kept (`sharding/decode_bands.py`)."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm(dim, param_dtype)
        self.to_qkv = Conv(dim, 3 * dim, (1, 1), **kw)
        self.proj = Conv(dim, dim, (1, 1), **kw)
        self.whole_frame = None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.whole_frame is not None:
            gather, keep = self.whole_frame
            return keep(self._attend(gather(x)))
        return self._attend(x)

    def _attend(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c)  # b t h w 3c -> (b t) (h w) 3c
        q, k, v = jnp.split(qkv, 3, axis=-1)  # each [(b t), (h w), c]
        logits = jnp.einsum(
            "bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32, precision=_precision(q.dtype)
        ) / math.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v, precision=_precision(v.dtype))
        return x + self.proj(out.reshape(b, t, h, w, c))  # (b t) (h w) c -> b t h w c


class Upsample(nnx.Module):
    """Wan's Resample 'upsample3d' (time_conv C -> 2C making 2 frames per frame, then spatial) or
    'upsample2d' (spatial only): nearest x2 in H and W, then a 3x3 Conv2d C -> C/2 per frame."""

    def __init__(self, dim: int, temporal: bool, *, dtype, param_dtype, rngs: nnx.Rngs, upsample_conv: str = "phases"):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dim = dim
        self.upsample_conv = upsample_conv
        self.resample = Conv(dim, dim // 2, (3, 3), **kw)
        self.time_conv = Conv(dim, 2 * dim, (3, 1, 1), **kw) if temporal else None
        self.rows = None

    def temporal(self, x: jax.Array, cache: dict, first_chunk: bool) -> tuple[jax.Array, dict]:
        """The time half: 'upsample3d' doubles the frames (after the first), 'upsample2d' is the identity."""
        new_cache = {}
        if self.time_conv is not None:
            b, t, h, w, c = x.shape
            # Wan's 'Rep': the video's first frame skips the time conv and is never in its history.
            x_in = x.at[:, 0].set(0) if first_chunk else x
            y, new_cache["time_conv"] = causal_conv(self.time_conv, x_in, cache["time_conv"])  # b t h w (2 c)
            # b t h w (2 c) -> b t 2 h w c -> b (t 2) h w c: the two halves become consecutive frames
            y = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
            x = jnp.concatenate([x[:, :1].astype(y.dtype), y[:, 2:]], axis=1) if first_chunk else y
        return x, new_cache

    def spatial(self, x: jax.Array) -> jax.Array:
        """The space half, frame by frame: nearest x2, then the 3x3 conv C -> C/2 (VAEConfig.upsample_conv).
        rows (static, None here): (before, after) around it, for a band of rows (`sharding/decode_bands.py`)."""
        if self.rows is not None:
            before, after = self.rows
            return after(self._spatial(before(x)))
        return self._spatial(x)

    def _spatial(self, x: jax.Array) -> jax.Array:
        if self.upsample_conv == "repeat":
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest x2: b t (h 2) (w 2) c
            return self.resample(x)
        return upsample_conv_phases(self.resample, x)

    def init_cache(self, batch: int, height: int, width: int, dtype) -> dict:
        if self.time_conv is None:
            return {}
        return {"time_conv": zeros_cache(batch, height, width, self.dim, dtype)}


# Output row 2i + a of "nearest x2, then a 3x3 conv" reads low-resolution rows i - 1 + a and i + a:
# tap rows of the 3x3 kernel that land on the same low-resolution row add up. PHASE_TAPS[a][t, k]: how
# much of kernel row k reaches the phase-a 2x2 kernel's row t (the same for columns).
PHASE_TAPS = (
    ((1, 0, 0), (0, 1, 1)),  # a = 0: rows i - 1 (tap 0), i (taps 1 + 2)
    ((1, 1, 0), (0, 0, 1)),  # a = 1: rows i (taps 0 + 1), i + 1 (tap 2)
)


def upsample_conv_phases(conv: Conv, x: jax.Array) -> jax.Array:
    """conv(nearest_x2(x)) for a 3x3 `conv` and x [B, T, H, W, C_in] -> [B, T, 2H, 2W, C_out], as four
    2x2 convs of x (one per output phase (a, b): its rows 2i + a, columns 2j + b) interleaved. Zero
    padding matches: the x2 frame's border row -1 is low-resolution row -1."""
    taps = jnp.asarray(PHASE_TAPS, jnp.float32)  # a t k
    # the four phases' 2x2 kernels at once: kh kw i o -> a c 2 2 i o
    k4 = jnp.einsum("ayk,cxl,klio->acyxio", taps, taps, conv.kernel[...].astype(jnp.float32)).astype(conv.dtype)
    b, t, h, w, _ = x.shape
    frames = rearrange(x.astype(conv.dtype), "b t h w c -> (b t) h w c")
    phases = []
    for a in (0, 1):
        for c in (0, 1):
            y = jax.lax.conv_general_dilated(
                frames,
                k4[a, c],
                (1, 1),
                [(1 - a, a), (1 - c, c)],
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=_precision(conv.dtype),
            )
            phases.append(y)  # (b t) h w o: rows 2i + a, columns 2j + c
    y = jnp.stack(phases).reshape(2, 2, *phases[0].shape)  # (a c) n h w o -> a c n h w o
    y = rearrange(y, "a c (b t) h w o -> b t (h a) (w c) o", b=b, t=t)
    return y + conv.bias[...].astype(conv.dtype)


def stage_cache(blocks, resamplers: dict, batch: int, height: int, width: int, dtype) -> dict:
    """Zero caches of a stage: each residual block's, and its resampler's (when it has one) under its name."""
    cache = {name: blk.init_cache(batch, height, width, dtype) for name, blk in blocks}
    for name, resampler in resamplers.items():
        if resampler is not None:
            cache[name] = resampler.init_cache(batch, height, width, dtype)
    return cache


class Stage(nnx.Module):
    """num_res_blocks + 1 residual blocks (res0, res1, ...) and, except in the last stage, an upsample."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        num_blocks: int,
        upsample: str | None,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        upsample_conv: str = "phases",
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_blocks = num_blocks
        for j in range(num_blocks):
            setattr(self, f"res{j}", ResidualBlock(c_in if j == 0 else c_out, c_out, **kw))
        self.upsample = Upsample(c_out, upsample == "3d", upsample_conv=upsample_conv, **kw) if upsample else None

    def blocks(self) -> list[tuple[str, ResidualBlock]]:
        return [(f"res{j}", getattr(self, f"res{j}")) for j in range(self.num_blocks)]

    def __call__(
        self, x: jax.Array, cache: dict, first_chunk: bool, spatial_upsample: bool = True, newest: int | None = None
    ) -> tuple[jax.Array, dict]:
        """spatial_upsample=False stops before the space half of the upsample (the caller runs
        `self.upsample.spatial` itself, frame by frame). newest: one frame through ring caches
        (`causal_conv`). first_chunk: the video's start (zero caches, Wan's first-frame rule)."""
        new_cache = {}
        for name, block in self.blocks():
            x, new_cache[name] = block(x, cache[name], newest, first_chunk)
        if self.upsample is not None:
            x, new_cache["upsample"] = self.upsample.temporal(x, cache["upsample"], first_chunk)
            if spatial_upsample:
                x = self.upsample.spatial(x)
        return x, new_cache

    def init_cache(self, batch: int, height: int, width: int, dtype) -> dict:
        return stage_cache(self.blocks(), {"upsample": self.upsample}, batch, height, width, dtype)


class Middle(nnx.Module):
    """Residual block, per-frame attention, residual block at the latent resolution."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.res0 = ResidualBlock(dim, dim, **kw)
        self.attn = AttentionBlock(dim, **kw)
        self.res1 = ResidualBlock(dim, dim, **kw)

    def __call__(self, x: jax.Array, cache: dict, zero_cache: bool = False) -> tuple[jax.Array, dict]:
        x, c0 = self.res0(x, cache["res0"], zero_cache=zero_cache)
        x, c1 = self.res1(self.attn(x), cache["res1"], zero_cache=zero_cache)
        return x, {"res0": c0, "res1": c1}

    def init_cache(self, batch: int, height: int, width: int, dtype) -> dict:
        return {
            "res0": self.res0.init_cache(batch, height, width, dtype),
            "res1": self.res1.init_cache(batch, height, width, dtype),
        }


class Head(nnx.Module):
    """RMS norm, SiLU, causal 3x3x3 conv to RGB (the decoder's) or to 2 z_dim channels (the encoder's)."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, c_out: int = 3):
        self.dim = dim
        self.norm = RMSNorm(dim, param_dtype)
        self.conv = Conv(dim, c_out, (3, 3, 3), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, cache: jax.Array, newest: int | None = None, zero_cache: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        return causal_conv(self.conv, jax.nn.silu(self.norm(x)), cache, newest, zero_cache)


class Decoder3d(nnx.Module):
    """conv1 (z -> dims[0]), middle, stage0..stage{n-1}, head. Input/output [B, T, H, W, C]."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtype_from_name(config.dtype), dtype_from_name(config.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype, rngs=rngs)
        dims = config.decoder_dims
        self.z_dim = config.z_dim
        self.num_stages = len(config.dim_mult)
        self.conv1 = Conv(config.z_dim, dims[0], (3, 3, 3), **kw)
        self.middle = Middle(dims[0], **kw)
        for i in range(self.num_stages):
            c_in = dims[i] if i == 0 else dims[i] // 2  # every upsample halves the width
            up = None if i == self.num_stages - 1 else ("3d" if config.temporal_upsample[i] else "2d")
            setattr(
                self,
                f"stage{i}",
                Stage(c_in, dims[i + 1], config.num_res_blocks + 1, up, upsample_conv=config.upsample_conv, **kw),
            )
        self.head = Head(dims[-1], **kw)
        self.per_frame_stages = config.per_frame_stages

    def stages(self) -> list[tuple[str, Stage]]:
        return [(f"stage{i}", getattr(self, f"stage{i}")) for i in range(self.num_stages)]

    def __call__(self, x: jax.Array, cache: dict, first_chunk: bool, tail_newest: int = 1) -> tuple[jax.Array, dict, int]:
        """x [B, T, h, w, C] -> (frames, new caches, the new `VAEDecodeCache.tail_newest`)."""
        new_cache = {}
        x, new_cache["conv1"] = causal_conv(self.conv1, x, cache["conv1"], zero_cache=first_chunk)
        x, new_cache["middle"] = self.middle(x, cache["middle"], zero_cache=first_chunk)
        split = self.num_stages - self.per_frame_stages
        lead_stages, tail = self.stages()[:split], self.stages()[split:]
        for k, (name, stage) in enumerate(lead_stages):  # the last one leaves its spatial upsample to the tail
            x, new_cache[name] = stage(x, cache[name], first_chunk, spatial_upsample=not (tail and k == len(lead_stages) - 1))
        tail_cache = {name: cache[name] for name, _ in tail} | {"head": cache["head"]}
        if tail:  # one frame at a time
            feed = lead_stages[-1][1].upsample if lead_stages else None

            def one_frame(c, y, newest=None, start=False):  # y [B, 1, h, w, C] -> one output frame
                c = dict(c)  # the caches carried; start: the video's first frame (zero caches)
                if feed is not None:
                    y = feed.spatial(y)
                for name, stage in tail:  # no time upsample here
                    y, c[name] = stage(y, c[name], first_chunk=start, newest=newest)
                y, c["head"] = self.head(y, c["head"], newest, zero_cache=start)
                return c, y

            if x.shape[1] <= MAX_UNROLLED_FRAMES:  # unrolled, ring caches: the least memory, the fastest
                frames = []
                for t in range(x.shape[1]):
                    # frame t starts after frame t - 1 ends, so one frame's activations are alive at a time
                    at = t if t == 0 else t + zero_after(frames[-1])
                    y = jax.lax.dynamic_slice_in_dim(x, at, 1, axis=1)  # b 1 h w c
                    tail_cache, y = one_frame(tail_cache, y, tail_newest, start=first_chunk and t == 0)
                    tail_newest = 1 - tail_newest  # the frame just written is the newer one
                    frames.append(y)
                x = jnp.concatenate(frames, axis=1)  # t x [b 1 h w c] -> b t h w c
            else:  # long chunks (a whole video in one call): a scan keeps the program small
                tail_cache, tail_newest = _older_first(tail_cache, tail_newest), 1
                tail_cache, frames = jax.lax.scan(one_frame, tail_cache, jnp.moveaxis(x[:, :, None], 1, 0))
                x = jnp.moveaxis(frames[:, :, 0], 0, 1)  # t b 1 h w c -> b t h w c
        else:
            tail_cache, tail_newest = _older_first(tail_cache, tail_newest), 1
            x, tail_cache["head"] = self.head(x, tail_cache["head"], zero_cache=first_chunk)
        return x, new_cache | tail_cache, tail_newest

    def init_cache(self, batch: int, height: int, width: int, dtype) -> dict:
        """Zero caches for latents of height x width; each upsample doubles the resolution after it."""
        cache = {
            "conv1": zeros_cache(batch, height, width, self.z_dim, dtype),
            "middle": self.middle.init_cache(batch, height, width, dtype),
        }
        for name, stage in self.stages():
            cache[name] = stage.init_cache(batch, height, width, dtype)
            if stage.upsample is not None:
                height, width = 2 * height, 2 * width
        cache["head"] = zeros_cache(batch, height, width, self.head.dim, dtype)
        return cache


def _older_first(caches: dict, newest: int) -> dict:
    """Ring caches whose newer frame is in slot `newest` -> the older frame in slot 0."""
    return caches if newest == 1 else jax.tree.map(lambda c: c[:, ::-1], caches)


class WanVAEDecoder(nnx.Module):
    """Wan's `conv2` (1x1x1 on the un-normalised latent) followed by the decoder."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        pdtype = dtype_from_name(config.param_dtype)
        # conv2 runs in float32 on the float32 latent, before the cast to the compute dtype.
        self.conv2 = Conv(config.z_dim, config.z_dim, (1, 1, 1), dtype=jnp.float32, param_dtype=pdtype, rngs=rngs)
        self.decoder = Decoder3d(config, rngs=rngs)


class PureModule:
    """A Flax NNX module built from a `VAEConfig`, held as its graph definition: its params are a plain
    pytree (`init`: fan-in normal kernels, zero biases, unit scales), every call a pure function."""

    module: type  # the nnx.Module class, built as module(config, rngs=...)

    def __init__(self, config: VAEConfig):
        self.config = config
        self._abstract = nnx.eval_shape(lambda: self.module(config, rngs=nnx.Rngs(0)))  # shapes only
        self._graphdef = nnx.graphdef(self._abstract)

    def init(self, rng: jax.Array) -> Params:
        """Random parameters."""
        return nnx.to_pure_dict(nnx.state(self.module(self.config, rngs=nnx.Rngs(rng))))

    def abstract_params(self) -> Params:
        """ShapeDtypeStructs of the parameter tree (no memory)."""
        return jax.eval_shape(self.init, jax.random.key(0))


class WanVAE(PureModule, ChunkedDecode):
    """The Wan2.1 VAE decoder as pure functions of (params, inputs). Build from a `VAEConfig`;
    params come from `init` or `convert.vae_convert.load_vae_params`."""

    module = WanVAEDecoder  # params {'conv2', 'decoder'}

    def init_decode_cache(
        self, batch: int, latent_height: int, latent_width: int, wan_first_frame: bool = True
    ) -> VAEDecodeCache:
        """Zero caches for a new video. wan_first_frame=True: Wan's decode (latent 0 gives 1 frame);
        False: Self-Forcing's demo decoder (every latent gives 4 frames; drop the first 3 yourself)."""
        dtype = dtype_from_name(self.config.dtype)
        convs = self._abstract.decoder.init_cache(batch, latent_height, latent_width, dtype)
        return VAEDecodeCache(convs=convs, first_chunk=wan_first_frame)

    def decode_chunk(self, params: Params, z: jax.Array, cache: VAEDecodeCache) -> tuple[jax.Array, VAEDecodeCache]:
        """Normalised latents z [B, T, h, w, z_dim] (the chunk after those already in `cache`) ->
        (frames [B, T', 8h, 8w, 3] float32 in [-1, 1], the updated cache).

        T' = 1 + 4 (T - 1) for the first chunk of a Wan decode, 4 T otherwise. Pure and jittable
        (the cache's `first_chunk` flag is static: the first chunk compiles once more).
        """
        cfg = self.config
        if z.ndim != 5 or z.shape[-1] != cfg.z_dim:
            raise ValueError(f"latents must be [batch, frames, height, width, {cfg.z_dim}] (channels-last), got {z.shape}")
        model = nnx.merge(self._graphdef, params)
        mean = jnp.asarray(cfg.latent_mean, jnp.float32)
        std = jnp.asarray(cfg.latent_std, jnp.float32)
        x = model.conv2(z.astype(jnp.float32) * std + mean)
        x, convs, newest = model.decoder(
            x.astype(dtype_from_name(cfg.dtype)), cache.convs, cache.first_chunk, cache.tail_newest
        )
        return (jnp.clip(x.astype(jnp.float32), -1.0, 1.0), VAEDecodeCache(convs=convs, first_chunk=False, tail_newest=newest))

    def decode_raw(self, params: Params, z: jax.Array) -> jax.Array:
        """Raw (unnormalised) latents z [B, 1 + k, h, w, z_dim] of a whole clip, in one pass -> frames
        [B, 1 + 4k, 8h, 8w, 3] float32, not clipped: what training an autoencoder differentiates."""
        cfg = self.config
        if z.ndim != 5 or z.shape[-1] != cfg.z_dim:
            raise ValueError(f"latents must be [batch, frames, height, width, {cfg.z_dim}] (channels-last), got {z.shape}")
        model = nnx.merge(self._graphdef, params)
        cache = self.init_decode_cache(z.shape[0], z.shape[2], z.shape[3])
        x = model.conv2(z.astype(jnp.float32))
        x, _, _ = model.decoder(x.astype(dtype_from_name(cfg.dtype)), cache.convs, True, cache.tail_newest)
        return x.astype(jnp.float32)
