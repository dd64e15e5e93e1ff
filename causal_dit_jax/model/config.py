"""Model shapes and Self-Forcing inference settings: the one source of every shape."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
    """'bfloat16' -> jnp.bfloat16, with a clear error for unknown names."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class ConfigFields:
    """replace / to_dict / to_json / from_dict for the frozen config dataclasses."""

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    def in_float32(self):
        """This config with float32 weights and compute (every precision field it has)."""
        names = {f.name for f in dataclasses.fields(self)} & {"param_dtype", "dtype", "residual_dtype"}
        return self.replace(**dict.fromkeys(names, "float32"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from `to_dict()` output (e.g. a checkpoint's config.json); unknown fields are an error."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigFields):
    """Shapes of the causal Wan2.1 DiT (names follow Wan's `WanModel` arguments).

    Precision: `param_dtype` is how weights are stored, `dtype` the matmul/activation dtype,
    `residual_dtype` the dtype of the residual stream. Norms, modulation, the time embedding and
    RoPE always run in float32 (as Wan2.1 does). The default keeps a float32 residual stream around
    bf16 matmuls (Wan2.1's own precision); `residual_dtype='bfloat16'` is Self-Forcing's all-bf16 cast.
    """

    dim: int = 1536  # C, the model width
    ffn_dim: int = 8960  # the FFN's hidden width
    num_heads: int = 12  # N (head_dim D = C / N)
    num_layers: int = 30
    in_dim: int = 16  # latent channels in (the VAE's z_dim)
    out_dim: int = 16  # flow channels out
    text_dim: int = 4096  # the text encoder's width (umT5-XXL)
    text_len: int = 512  # K, text tokens per prompt
    freq_dim: int = 256  # width of the sinusoidal timestep embedding
    eps: float = 1e-6  # of every norm
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (time, rows, columns) per token
    param_dtype: str = "bfloat16"  # how weights are stored
    dtype: str = "bfloat16"  # matmuls and activations
    residual_dtype: str = "float32"  # the residual stream

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.patch_size[0] != 1:
            raise ValueError(f"temporal patch size must be 1, got {self.patch_size}")
        if len(self.rope_split) != 3 or min(self.rope_split) <= 0:
            raise ValueError(f"head_dim {self.head_dim} too small for a 3-axis RoPE split")
        for name in ("param_dtype", "dtype", "residual_dtype"):
            dtype_from_name(getattr(self, name))
        object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex pairs rotated by (time, row, column): (22, 21, 21) for head_dim 128."""
        half = self.head_dim // 2
        hw = half // 3
        return (half - 2 * hw, hw, hw)

    @property
    def patch_features(self) -> int:
        """Values per input token: pt*ph*pw*in_dim (64 for Wan)."""
        pt, ph, pw = self.patch_size
        return pt * ph * pw * self.in_dim

    @property
    def out_features(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw * self.out_dim

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Tokens of one latent frame: (H/ph)*(W/pw) (1560 at 60x104)."""
        _, ph, pw = self.patch_size
        if latent_height % ph or latent_width % pw:
            raise ValueError(
                f"latent size {latent_height}x{latent_width} is not divisible by the patch "
                f"size {ph}x{pw} (pixel sizes must be multiples of 16)"
            )
        return (latent_height // ph) * (latent_width // pw)


PRESETS: dict[str, ModelConfig] = {
    # The published Wan2.1-T2V-1.3B (1,418,996,800 parameters).
    "wan2.1-t2v-1.3b": ModelConfig(),
    # Small presets: 12 heads and every code path of the real model, at a fraction of the size.
    # `demo` runs the embedded default video on a 2-core CPU; `tiny` is for tests.
    "demo": ModelConfig(dim=384, ffn_dim=1024, num_heads=12, num_layers=4, text_dim=256, text_len=256, freq_dim=64),
    "tiny": ModelConfig(dim=192, ffn_dim=256, num_heads=12, num_layers=2, text_dim=32, text_len=8, freq_dim=32).in_float32(),
    # The embedded default's DiT (trained on the procedural world, `train/recipe.py`): 64-wide heads.
    "procedural": ModelConfig(dim=320, ffn_dim=1024, num_heads=5, num_layers=4, text_dim=256, text_len=64, freq_dim=64),
}


def lookup_preset(presets: dict, name: str, what: str):
    """presets[name], or an error naming `what` and the available presets."""
    if name not in presets:
        raise ValueError(f"unknown {what} {name!r}; available: {sorted(presets)}")
    return presets[name]


def get_preset(name: str) -> ModelConfig:
    return lookup_preset(PRESETS, name, "preset")


ATTENTION_IMPLS = ("xla", "cudnn", "cudnn_paged")
NORM_ROPE_IMPLS = ("xla", "pallas")
LINEAR_PRECISIONS = ("bfloat16", "float8")


def check_choice(value, choices: tuple, what: str):
    """`value` if it is one of `choices`, else an error naming `what` and the valid choices."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {list(choices)}")
    return value


@dataclasses.dataclass(frozen=True)
class KernelConfig(ConfigFields):
    """How the DiT's kernels run: one frozen, validated record instead of keywords through every layer.

    attention_impl: the self-attention kernel on one device: 'xla', 'cudnn', 'cudnn_paged' (cuDNN
    reading the KV cache in place) or None (the backend's default: 'cudnn_paged' on GPUs for 16-bit
    models, else 'xla'). norm_rope_impl: q/k RMSNorm + RoPE as XLA fusions ('xla') or one Pallas
    kernel ('pallas'). linear_precision: 'bfloat16' (the model's dtypes) or 'float8' (the block
    GEMMs in e4m3 with per-channel weight and per-token activation scales; inference only: it
    changes the output). scan_unroll: layers per iteration of the layer loop (1 compiles fastest).
    """

    attention_impl: str | None = None
    norm_rope_impl: str = "xla"
    linear_precision: str = "bfloat16"
    scan_unroll: int = 1

    def __post_init__(self):
        if self.attention_impl is not None:
            check_choice(self.attention_impl, ATTENTION_IMPLS, "attention_impl")
        check_choice(self.norm_rope_impl, NORM_ROPE_IMPLS, "norm_rope_impl")
        check_choice(self.linear_precision, LINEAR_PRECISIONS, "linear_precision")
        if not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            raise ValueError(f"scan_unroll must be a positive int, got {self.scan_unroll!r}")


class CacheLayout(NamedTuple):
    """The self-attention KV cache of one stream, from `InferenceConfig.cache_layout` (static ints)."""

    capacity: int  # chunk slots
    sink_chunks: int  # leading slots that keep the stream's first chunks (the sink; 0 when nothing is evicted)
    sink_frames: int  # latent frames never evicted (Self-Forcing's sink_size; 0 when nothing is evicted)
    window_frames: int  # latent frames attended at most (local_attn_size); -1: this stream never evicts


@dataclasses.dataclass(frozen=True)
class InferenceConfig(ConfigFields):
    """Self-Forcing few-step inference settings (`configs/self_forcing_dmd.yaml`).

    local_attn_size / sink_size count latent frames, as in Self-Forcing (-1 = attend to the whole
    history). With a window, the chunk ending at (exclusive) frame E attends to the frames f < E with
    f < sink_size or f >= E - (local_attn_size - sink_size): Self-Forcing's shift-left eviction of the
    oldest non-sink frames. Any frame counts work (a 1-frame sink is a real setting) as long as the
    window minus the sink holds a whole chunk. cache_dtype: None keeps the cache in the model's dtype.
    """

    frames_per_chunk: int = 3
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    num_train_timesteps: int = 1000
    context_noise: float = 0.0
    local_attn_size: int = -1
    sink_size: int = 0
    cache_dtype: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "denoising_steps", tuple(self.denoising_steps))
        if self.frames_per_chunk <= 0:
            raise ValueError("frames_per_chunk must be positive")
        if not self.denoising_steps:
            raise ValueError("denoising_steps must not be empty")
        c, local, sink = self.frames_per_chunk, self.local_attn_size, self.sink_size
        if local != -1 and local <= 0:
            raise ValueError(f"local_attn_size={local} must be -1 (the whole video) or a positive number of latent frames")
        if sink < 0:
            raise ValueError(f"sink_size={sink} must be >= 0 latent frames")
        if local == -1 and sink:
            raise ValueError(
                f"sink_size={sink} needs a local_attn_size (a rolling cache); local_attn_size=-1 keeps every frame"
            )
        if local != -1 and local - sink < c:
            raise ValueError(
                f"local_attn_size={local} with sink_size={sink} leaves no room for a chunk: the window "
                f"minus the sink must hold at least frames_per_chunk={c} latent frames"
            )
        if self.cache_dtype is not None:
            dtype_from_name(self.cache_dtype)

    def num_chunks(self, num_frames: int) -> int:
        """Chunks for `num_frames` latent frames; errors if they do not fit the chunking."""
        c = self.frames_per_chunk
        if num_frames <= 0 or num_frames % c:
            raise ValueError(
                f"{num_frames} latent frames do not fit chunks of {c} frames "
                f"(use a multiple of {c}; 21 latent frames = 81 video frames)"
            )
        return num_frames // c

    def cache_layout(self, num_frames: int) -> CacheLayout:
        """The KV cache of a stream of `num_frames` latent frames: the one place its slots are counted.

        Whole-chunk slots: ceil(sink / c) sink slots, then a ring of ceil((window - sink) / c) slots
        for the most recent chunks (enough to hold every frame the window needs), capped at the
        stream's chunks. Global attention, or a stream that never outgrows its window, keeps every
        chunk (window_frames -1).
        """
        n = self.num_chunks(num_frames)
        c, local, sink = self.frames_per_chunk, self.local_attn_size, self.sink_size
        if local == -1 or num_frames <= local:
            return CacheLayout(n, 0, 0, -1)
        sink_chunks = -(-sink // c)
        return CacheLayout(min(n, sink_chunks + -(-(local - sink) // c)), min(sink_chunks, n), sink, local)

    def cache_chunks(self, num_frames: int) -> int:
        """Chunk slots of the self-attention KV cache for a video of `num_frames` latent frames."""
        return self.cache_layout(num_frames).capacity
