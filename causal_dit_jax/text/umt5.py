"""The umT5-XXL text encoder of Wan2.1 (encoder only) as pure functions of (params, ids, mask).

`UMT5Encoder` holds only static things (the config and the graph definitions of its Flax NNX modules);
parameters are a plain pytree:

    {'token_embedding': {'embedding': [V, C]},
     'blocks': {... every leaf stacked over layers ...},
     'norm': {'scale': [C]}}                      (+ 'pos_embedding' at the top when shared_pos)

Math (the published umT5-XXL encoder of Wan2.1): pre-norm blocks with an RMS norm in float32
(eps 1e-6), attention with no 1/sqrt(d) scaling plus a learned bidirectional relative-position bias
(32 buckets, one table per layer), padded keys masked, softmax in float32, a gated GELU-tanh FFN
fc2(fc1(x) * gelu_tanh(gate(x))), a final norm.

Letters: B batch, L query tokens, S key tokens, N heads, D head dim, C channels, K text tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from causal_dit_jax.model.config import ConfigFields, dtype_from_name, lookup_preset
from causal_dit_jax.model.layers import RMSNorm

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class T5Config(ConfigFields):
    """Shapes of Wan's umT5 encoder (names follow Wan's `T5Encoder` arguments).

    Precision: `param_dtype` is how weights are stored (Wan ships bf16), `dtype` the matmul dtype and
    `residual_dtype` the residual stream. Norms, attention logits and softmax always run in float32.
    float16 is refused: T5 activations overflow it (Wan clamps; we do not).
    `text_len` is the length of the conditioning the DiT receives (Wan: 512 tokens).
    """

    vocab_size: int = 256384  # umT5's sentencepiece vocabulary
    dim: int = 4096  # C
    dim_attn: int = 4096  # N * D
    dim_ffn: int = 10240  # the gated FFN's hidden width
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32  # relative-position buckets (half per direction)
    max_distance: int = 128  # beyond it, positions share the last bucket
    shared_pos: bool = False  # one position-bias table for all layers (umT5: one per layer)
    eps: float = 1e-6
    text_len: int = 512  # the DiT's conditioning length (Wan: 512 tokens)
    param_dtype: str = "bfloat16"  # Wan ships bf16 weights
    dtype: str = "bfloat16"  # matmuls
    residual_dtype: str = "float32"  # the residual stream

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        if self.num_buckets < 4 or self.num_buckets % 4:
            raise ValueError(f"num_buckets must be a positive multiple of 4, got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"max_distance {self.max_distance} must exceed the exact range {self.num_buckets // 4}")
        for name in ("param_dtype", "dtype", "residual_dtype"):
            dtype_from_name(getattr(self, name))
            if getattr(self, name) == "float16":
                raise ValueError(f"{name}=float16 is not supported: umT5 activations overflow float16")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads


BYTE_VOCAB = 259  # ByteTokenizer: pad 0, eos 1, unk 2, then 256 byte values

T5_PRESETS: dict[str, T5Config] = {
    # Wan2.1's models_t5_umt5-xxl-enc-bf16.pth (5.68B parameters).
    "umt5-xxl": T5Config(),
    # Untrained small encoders over `tokenizer.ByteTokenizer` ids, sized for the DiT presets of the same
    # name (dim = that preset's text_dim, text_len likewise).
    "demo": T5Config(vocab_size=BYTE_VOCAB, dim=256, dim_attn=256, dim_ffn=512, num_heads=4, num_layers=2, text_len=256),
    "procedural": T5Config(vocab_size=BYTE_VOCAB, dim=256, dim_attn=256, dim_ffn=512, num_heads=4, num_layers=2, text_len=64),
    "tiny": T5Config(
        vocab_size=BYTE_VOCAB, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, text_len=8
    ).in_float32(),
}


def get_t5_preset(name: str) -> T5Config:
    return lookup_preset(T5_PRESETS, name, "text encoder preset")


# ---------------------------------------------------------------------------------------- position bias
def relative_position_bucket(rel_pos: np.ndarray, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """Bidirectional T5 bucket of each (key - query) offset, int32 (host numpy: lengths are static).

    Half the buckets per direction (+num_buckets/2 when the key lies after the query); within a
    direction offsets below num_buckets/4 get their own bucket, larger ones log-spaced buckets up to
    max_distance, clamped to the last. The log runs in float32 and truncates, as Wan's does; doing it
    on the host keeps the table identical on every backend (a device log may differ by an ulp at the
    bucket edges 16, 32, 64).
    """
    half = num_buckets // 2
    max_exact = half // 2
    rel_pos = np.asarray(rel_pos, np.int64)
    direction = np.where(rel_pos > 0, half, 0)
    dist = np.abs(rel_pos)
    # max(dist, 1) keeps log(0) out of the float->int cast; those offsets take the exact branch.
    scaled = (
        np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(half - max_exact)
    )
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return (direction + np.where(dist < max_exact, dist, large)).astype(np.int32)


def position_buckets(length: int, config: T5Config) -> np.ndarray:
    """Bucket of every (query, key) pair of a length-`length` sequence: [L, S] int32."""
    pos = np.arange(length)
    return relative_position_bucket(pos[None, :] - pos[:, None], config.num_buckets, config.max_distance)


class RelativePositionBias(nnx.Module):
    """A learned [num_buckets, N] table read at each (query, key) bucket -> bias [N, L, S] (float32)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            jax.random.normal(rngs.params(), (config.num_buckets, config.num_heads), jnp.float32).astype(
                dtype_from_name(config.param_dtype)
            )
        )

    def __call__(self, buckets: jax.Array) -> jax.Array:
        bias = jnp.take(self.embedding[...].astype(jnp.float32), buckets, axis=0)  # l s n
        return bias.transpose(2, 0, 1)  # l s n -> n l s


# ---------------------------------------------------------------------------------------- block
class T5Attention(nnx.Module):
    """Multi-head self-attention with an additive bias and no 1/sqrt(d) scaling; q/k/v/o have no bias."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        dtype, pdtype = dtype_from_name(config.dtype), dtype_from_name(config.param_dtype)
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        c, a = config.dim, config.dim_attn
        linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.q, self.k, self.v, self.o = linear(c, a), linear(c, a), linear(c, a), linear(a, c)

    def __call__(self, x: jax.Array, bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x [B, L, C], bias [N, L, S] float32, key_mask [B, S] bool -> [B, L, C]."""
        b, l, _ = x.shape

        def split(t):
            return t.reshape(b, l, self.num_heads, self.head_dim)  # b l (n d) -> b l n d

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = jnp.einsum("BLND,BSND->BNLS", q, k, preferred_element_type=jnp.float32) + bias
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("BNLS,BSND->BLND", probs, v)
        return self.o(out.reshape(b, l, -1))


class T5FeedForward(nnx.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        linear = functools.partial(
            nnx.Linear,
            use_bias=False,
            dtype=dtype_from_name(config.dtype),
            param_dtype=dtype_from_name(config.param_dtype),
            rngs=rngs,
        )
        self.gate = linear(config.dim, config.dim_ffn)
        self.fc1 = linear(config.dim, config.dim_ffn)
        self.fc2 = linear(config.dim_ffn, config.dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.fc1(x) * jax.nn.gelu(self.gate(x), approximate=True))


class T5Block(nnx.Module):
    """x + attn(norm1(x)), then x + ffn(norm2(x)); owns its position-bias table unless shared_pos."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        pdtype = dtype_from_name(config.param_dtype)
        self.norm1 = RMSNorm(config.dim, config.eps, pdtype)
        self.attn = T5Attention(config, rngs=rngs)
        self.norm2 = RMSNorm(config.dim, config.eps, pdtype)
        self.ffn = T5FeedForward(config, rngs=rngs)
        self.pos_embedding = None if config.shared_pos else RelativePositionBias(config, rngs=rngs)

    def __call__(self, x: jax.Array, buckets: jax.Array, key_mask: jax.Array, shared_bias: jax.Array | None) -> jax.Array:
        bias = shared_bias if self.pos_embedding is None else self.pos_embedding(buckets)
        x = x + self.attn(self.norm1(x), bias, key_mask).astype(x.dtype)
        return x + self.ffn(self.norm2(x)).astype(x.dtype)


class Embeddings(nnx.Module):
    """Token embedding, the final norm and (shared_pos only) the shared position-bias table."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        pdtype = dtype_from_name(config.param_dtype)
        self.token_embedding = nnx.Embed(config.vocab_size, config.dim, param_dtype=pdtype, rngs=rngs)
        self.norm = RMSNorm(config.dim, config.eps, pdtype)
        self.pos_embedding = RelativePositionBias(config, rngs=rngs) if config.shared_pos else None


# ---------------------------------------------------------------------------------------- encoder
class UMT5Encoder:
    """Wan's umT5 text encoder. Build from a `T5Config`; params come from `init` or `convert.t5_convert`."""

    def __init__(self, config: T5Config):
        self.config = config
        self._outer_def = nnx.graphdef(nnx.eval_shape(lambda: Embeddings(config, rngs=nnx.Rngs(0))))
        self._block_def = nnx.graphdef(nnx.eval_shape(lambda: T5Block(config, rngs=nnx.Rngs(0))))

    def init(self, rng: jax.Array) -> Params:
        """Random parameters: {'token_embedding', 'blocks' (stacked over layers), 'norm'[, 'pos_embedding']}."""
        k_outer, k_blocks = jax.random.split(rng)

        def one_block(key):
            return nnx.to_pure_dict(nnx.state(T5Block(self.config, rngs=nnx.Rngs(key))))

        params = nnx.to_pure_dict(nnx.state(Embeddings(self.config, rngs=nnx.Rngs(k_outer))))
        params["blocks"] = jax.vmap(one_block)(jax.random.split(k_blocks, self.config.num_layers))
        return params

    def abstract_params(self) -> Params:
        """ShapeDtypeStructs of the parameter tree (no memory)."""
        return jax.eval_shape(self.init, jax.random.key(0))

    def _outer(self, params: Params) -> Embeddings:
        return nnx.merge(self._outer_def, {k: v for k, v in params.items() if k != "blocks"})

    def encode(self, params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Token ids [B, K] and mask [B, K] (nonzero = token, 0 = padding) -> hidden states [B, K, C].

        Every row is computed (padded queries attend to the prompt's tokens, as in Wan); use
        `text_context` for the DiT's conditioning. Output dtype: config.dtype.
        """
        cfg = self.config
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"ids and mask must both be [batch, tokens], got {ids.shape} and {mask.shape}")
        outer = self._outer(params)
        key_mask = jnp.asarray(mask) != 0
        buckets = jnp.asarray(position_buckets(ids.shape[1], cfg))
        shared_bias = None if outer.pos_embedding is None else outer.pos_embedding(buckets)
        x = outer.token_embedding(jnp.asarray(ids, jnp.int32)).astype(dtype_from_name(cfg.residual_dtype))

        def body(x, block_params):
            block = nnx.merge(self._block_def, block_params)
            return block(x, buckets, key_mask, shared_bias), None

        x, _ = jax.lax.scan(body, x, params["blocks"])
        return outer.norm(x.astype(jnp.float32)).astype(dtype_from_name(cfg.dtype))

    def text_context(self, params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Self-Forcing's conditioning: `encode`, rows of padding set to 0, zero-padded to text_len.

        ids, mask [B, K] with K <= config.text_len -> [B, text_len, C] (Wan: [B, 512, 4096]).
        """
        k, text_len = ids.shape[-1], self.config.text_len
        if k > text_len:
            raise ValueError(f"{k} tokens exceed the text length {text_len}; tokenize with max_length={text_len}")
        out = self.encode(params, ids, mask)
        out = jnp.where((jnp.asarray(mask) != 0)[:, :, None], out, jnp.zeros((), out.dtype))
        return jnp.pad(out, ((0, 0), (0, text_len - k), (0, 0)))


@functools.cache
def t5_param_count(config: T5Config) -> int:
    """Number of parameters of the encoder described by `config`."""
    return sum(math.prod(s.shape) for s in jax.tree.leaves(UMT5Encoder(config).abstract_params()))
