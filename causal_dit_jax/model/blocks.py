"""One Wan DiT block (adaLN modulation, self-attention with Causal-RoPE, cross-attention, FFN).

The self-attention kernel is an argument (`attention_fn`), so the same block runs on one device and
under `shard_map` with Ulysses or ring attention. Letters: B batch, F frames, L tokens, S cached
keys, K text tokens, N heads, D head dim, C model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from causal_dit_jax.model.attention import SelfAttentionFn, dot_product_attention
from causal_dit_jax.model.config import KernelConfig, ModelConfig, dtype_from_name
from causal_dit_jax.model.fp8_linear import make_linear
from causal_dit_jax.model.kv_cache import CacheWrite, LayerCache
from causal_dit_jax.model.layers import MLP, AffineLayerNorm, RMSNorm, layer_norm, per_token
from causal_dit_jax.model.qk_norm_rope import qk_norm_rope


def _dtypes(config: ModelConfig):
    return dtype_from_name(config.dtype), dtype_from_name(config.param_dtype)


class SelfAttention(nnx.Module):
    """q/k/v from one fused matmul, q/k RMSNorm over the full width and Causal-RoPE (`qk_norm_rope`:
    XLA, or one Pallas kernel, as `kernels.norm_rope_impl` says), pluggable attention."""

    def __init__(self, config: ModelConfig, kernels: KernelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = _dtypes(config)
        c = config.dim
        self.num_heads = config.num_heads
        self.norm_rope_impl = kernels.norm_rope_impl
        self.qkv = make_linear(c, 3 * c, kernels.linear_precision, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.o = make_linear(c, c, kernels.linear_precision, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.norm_q = RMSNorm(c, config.eps, pdtype)
        self.norm_k = RMSNorm(c, config.eps, pdtype)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        layer_cache: LayerCache | None,
        write: CacheWrite | None,
        attention_fn: SelfAttentionFn,
    ) -> tuple[jax.Array, LayerCache | None]:
        qkv = self.qkv(x)  # [B, L, 3C]
        q, k = qk_norm_rope(
            qkv, self.norm_q.scale[...], self.norm_k.scale[...], cos, sin, self.norm_q.eps, self.num_heads, self.norm_rope_impl
        )  # each [B, L, N, D], normalised and rotated
        v = rearrange(qkv[..., 2 * qkv.shape[-1] // 3 :], "b l (n d) -> b l n d", n=self.num_heads)
        out, layer_cache = attention_fn(q, k, v, layer_cache, write)
        out = rearrange(out.astype(x.dtype), "b l n d -> b l (n d)")
        return self.o(out), layer_cache


class CrossAttention(nnx.Module):
    """Attention of the video tokens to the text; no RoPE, no mask (as Wan). Text K/V come precomputed
    (`kv` runs once per prompt and stays in the model's dtype whatever the linear precision)."""

    def __init__(self, config: ModelConfig, kernels: KernelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = _dtypes(config)
        c = config.dim
        self.num_heads = config.num_heads
        self.q = make_linear(c, c, kernels.linear_precision, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.kv = nnx.Linear(c, 2 * c, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.o = make_linear(c, c, kernels.linear_precision, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.norm_q = RMSNorm(c, config.eps, pdtype)
        self.norm_k = RMSNorm(c, config.eps, pdtype)

    def text_kv(self, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of the embedded text [B, K, C] -> two [B, K, N, D]."""
        k, v = jnp.split(self.kv(text), 2, axis=-1)
        k = self.norm_k(k)
        return (rearrange(k, "b k (n d) -> b k n d", n=self.num_heads), rearrange(v, "b k (n d) -> b k n d", n=self.num_heads))

    def __call__(self, x: jax.Array, text_k: jax.Array, text_v: jax.Array, implementation: str | None = None) -> jax.Array:
        q = rearrange(self.norm_q(self.q(x)), "b l (n d) -> b l n d", n=self.num_heads)
        out = dot_product_attention(q, text_k, text_v, implementation=implementation)
        return self.o(rearrange(out.astype(x.dtype), "b l n d -> b l (n d)"))


class WanBlock(nnx.Module):
    """x += SelfAttn(mod(LN(x))) * gate1; x += CrossAttn(LN3(x), text); x += FFN(mod(LN(x))) * gate2.

    kernels.linear_precision 'float8': the block's GEMMs in e4m3 (`fp8_linear.FP8_LINEARS`; inference only)."""

    def __init__(self, config: ModelConfig, kernels: KernelConfig = KernelConfig(), *, rngs: nnx.Rngs):
        dtype, pdtype = _dtypes(config)
        self.config = config
        c = config.dim
        init = jax.random.normal(rngs.params(), (6, c), jnp.float32) / c**0.5
        self.modulation = nnx.Param(init.astype(pdtype))
        self.self_attn = SelfAttention(config, kernels, rngs=rngs)
        self.norm3 = AffineLayerNorm(c, config.eps, pdtype)
        self.cross_attn = CrossAttention(config, kernels, rngs=rngs)
        self.ffn = MLP(
            c,
            config.ffn_dim,
            c,
            "gelu_tanh",
            dtype=dtype,
            param_dtype=pdtype,
            rngs=rngs,
            linear_precision=kernels.linear_precision,
        )

    def __call__(
        self,
        x: jax.Array,
        time_mod: jax.Array,
        frame_ids: jax.Array | None,
        cos: jax.Array,
        sin: jax.Array,
        text_k: jax.Array,
        text_v: jax.Array,
        layer_cache: LayerCache | None,
        write: CacheWrite | None,
        attention_fn: SelfAttentionFn,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x [B, L, C] (residual dtype); time_mod [B, F, 6, C] float32; frame_ids [L] frame of each
        token, or None when the tokens are whole frames in order."""
        cfg = self.config
        dtype = dtype_from_name(cfg.dtype)
        res_dtype = x.dtype
        mod = time_mod + self.modulation[...].astype(jnp.float32)  # b f 6 c
        mod = per_token(mod, frame_ids, x.shape[1])  # b f 6 c -> b l 6 c
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, :, i] for i in range(6))

        h = (layer_norm(x, cfg.eps) * (1 + scale1) + shift1).astype(dtype)
        y, layer_cache = self.self_attn(h, cos, sin, layer_cache, write, attention_fn)
        x = (x.astype(jnp.float32) + y.astype(jnp.float32) * gate1).astype(res_dtype)

        h = self.norm3(x).astype(dtype)
        x = (x.astype(jnp.float32) + self.cross_attn(h, text_k, text_v).astype(jnp.float32)).astype(res_dtype)

        h = (layer_norm(x, cfg.eps) * (1 + scale2) + shift2).astype(dtype)
        y = self.ffn(h)
        x = (x.astype(jnp.float32) + y.astype(jnp.float32) * gate2).astype(res_dtype)
        return x, layer_cache
