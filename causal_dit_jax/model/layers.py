"""Small Flax NNX layers of the Wan DiT: norms, a two-layer MLP, the sinusoidal timestep embedding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from causal_dit_jax.model.fp8_linear import Fp8Linear, gelu_quantize_rows, make_linear


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis with no affine parameters, in float32 (Wan's norm1/norm2/head.norm)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class AffineLayerNorm(nnx.Module):
    """LayerNorm with scale and bias (Wan's norm3, the cross-attention input norm); float32 math."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(x, self.eps)
        return y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis, float32 math, in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis (the full model width for q/k), float32 math."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class MLP(nnx.Module):
    """fc2(act(fc1(x))): Wan's text_embedding (GELU-tanh), time_embedding (SiLU) and ffn (GELU-tanh).
    linear_precision 'float8': both linears are `Fp8Linear`s (inference)."""

    def __init__(
        self,
        d_in: int,
        d_hidden: int,
        d_out: int,
        activation: str,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        linear_precision: str = "bfloat16",
    ):
        if activation not in ("gelu_tanh", "silu"):
            raise ValueError(f"unknown activation {activation!r}")
        self.activation = activation
        self.fc1 = make_linear(d_in, d_hidden, linear_precision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = make_linear(d_hidden, d_out, linear_precision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if isinstance(self.fc2, Fp8Linear) and self.activation == "gelu_tanh":
            # fc1's dequantisation and bias, the GELU and fc2's per-row e4m3 quantisation in one pass
            raw, xs = self.fc1.raw_product(x)
            hq, hs = gelu_quantize_rows(raw, self.fc1.bias[...], row_scale=xs, col_scale=self.fc1.kernel_scale[...])
            return self.fc2.apply_quantized(hq, hs)
        h = self.fc1(x)
        h = jax.nn.gelu(h, approximate=True) if self.activation == "gelu_tanh" else jax.nn.silu(h)
        return self.fc2(h)


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
    """[cos(t w), sin(t w)] with w_i = 10000^(-i/(dim/2)) (cos first, as Wan); float32 [..., dim]."""
    half = dim // 2
    inv_freq = jnp.asarray([math.pow(10000.0, -i / half) for i in range(half)], jnp.float32)
    arg = t.astype(jnp.float32)[..., None] * inv_freq
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def per_token(per_frame: jax.Array, frame_ids: jax.Array | None, num_tokens: int) -> jax.Array:
    """A per-frame tensor [B, F, k, C] seen per token: [B, L, k, C].

    frame_ids None means the tokens are whole frames in order (L = F * tokens per frame): a broadcast
    that XLA fuses into its consumers. Otherwise (a sequence shard that cuts frames) a gather by the
    frame of each token.
    """
    if frame_ids is None:
        b, f, k, c = per_frame.shape
        per_frame_tokens = num_tokens // f
        return jnp.broadcast_to(per_frame[:, :, None], (b, f, per_frame_tokens, k, c)).reshape(b, num_tokens, k, c)
    return jnp.take(per_frame, frame_ids, axis=1)
