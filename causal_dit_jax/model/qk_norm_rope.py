"""q/k RMSNorm and Causal-RoPE of the self-attention, read straight from the fused QKV matmul output.

Both paths compute, for the q and k thirds of qkv [B, L, 3C]:
    y = bf16(x * rsqrt(mean(x^2 over C) + eps) * scale)          (Wan's RMSNorm over the full width)
    (y_2i, y_2i+1) rotated by the token's angles: cos/sin [L, D/2]  (interleaved pairs, per head)
with float32 math and the result in qkv's dtype, as `layers.rms_norm` then `rope.apply_rope`.

'xla' is those two functions (XLA runs the norm and q's rotation as two passes; k's rotation it fuses
into the cache write). 'pallas' is one Pallas (Triton) kernel per token row for q and k: the row is
read once, normalised and rotated in registers, written once. Its gradient is the XLA path's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from causal_dit_jax.model.config import NORM_ROPE_IMPLS
from causal_dit_jax.model.layers import rms_norm
from causal_dit_jax.model.pallas_out import out_struct
from causal_dit_jax.model.rope import apply_rope


def qk_norm_rope_xla(
    qkv: jax.Array, scale_q: jax.Array, scale_k: jax.Array, cos: jax.Array, sin: jax.Array, eps: float, num_heads: int
) -> tuple[jax.Array, jax.Array]:
    """qkv [B, L, 3C] -> rotated q, k [B, L, N, D] in qkv's dtype (the plain JAX path)."""
    c = qkv.shape[-1] // 3
    q = rms_norm(qkv[..., :c], scale_q, eps)
    k = rms_norm(qkv[..., c : 2 * c], scale_k, eps)
    q, k = (rearrange(a, "b l (n d) -> b l n d", n=num_heads) for a in (q, k))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _row_kernel(qkv_ref, sq_ref, sk_ref, cos_ref, sin_ref, q_ref, k_ref, *, c: int, pairs_per_head: int, eps: float):
    """One token: its q and k (each C wide, interleaved (re, im) pairs) normalised and rotated."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    half = c // 2
    p = jnp.arange(pl.next_power_of_2(half))  # pair index over the full width (padded to a power of 2)
    valid = p < half
    angle = p % pairs_per_head  # the pair's index inside its head: the column of cos/sin
    cos = plgpu.load(cos_ref.at[angle], mask=valid, other=0.0).astype(jnp.float32)
    sin = plgpu.load(sin_ref.at[angle], mask=valid, other=0.0).astype(jnp.float32)
    for offset, scale_ref, out_ref in ((0, sq_ref, q_ref), (c, sk_ref, k_ref)):
        re = plgpu.load(qkv_ref.at[offset + 2 * p], mask=valid, other=0.0).astype(jnp.float32)
        im = plgpu.load(qkv_ref.at[offset + 2 * p + 1], mask=valid, other=0.0).astype(jnp.float32)
        inv = jax.lax.rsqrt((jnp.sum(re * re) + jnp.sum(im * im)) / c + eps)
        s_re = plgpu.load(scale_ref.at[2 * p], mask=valid, other=0.0).astype(jnp.float32)
        s_im = plgpu.load(scale_ref.at[2 * p + 1], mask=valid, other=0.0).astype(jnp.float32)
        dtype = out_ref.dtype  # the norm's output is rounded to the activation dtype, as the XLA path
        n_re = (re * inv * s_re).astype(dtype).astype(jnp.float32)
        n_im = (im * inv * s_im).astype(dtype).astype(jnp.float32)
        plgpu.store(out_ref.at[2 * p], (n_re * cos - n_im * sin).astype(dtype), mask=valid)
        plgpu.store(out_ref.at[2 * p + 1], (n_re * sin + n_im * cos).astype(dtype), mask=valid)


def _qk_norm_rope_pallas(qkv, scale_q, scale_k, cos, sin, eps, num_heads):
    from jax.experimental import pallas as pl

    b, l, c3 = qkv.shape
    c = c3 // 3
    pairs = cos.shape[-1]
    if c % num_heads or c // num_heads != 2 * pairs:
        raise ValueError(f"width {c} with {num_heads} heads does not match RoPE tables of {pairs} pairs per head")
    kernel = functools.partial(_row_kernel, c=c, pairs_per_head=pairs, eps=eps)
    row = pl.BlockSpec((None, c3), lambda i: (i, 0))  # one token's q|k|v
    vec = pl.BlockSpec((c,), lambda i: (0,))
    table = pl.BlockSpec((None, pairs), lambda i: (i % l, 0))  # the token's cos/sin row
    out = pl.BlockSpec((None, c), lambda i: (i, 0))
    inputs = (qkv.reshape(b * l, c3), scale_q, scale_k, cos.astype(jnp.float32), sin.astype(jnp.float32))
    q, k = pl.pallas_call(
        kernel,
        grid=(b * l,),
        in_specs=[row, vec, vec, table, table],
        out_specs=[out, out],
        out_shape=[out_struct((b * l, c), qkv.dtype, *inputs)] * 2,
        interpret=jax.default_backend() != "gpu",
        name="qk_norm_rope",
    )(*inputs)
    return (
        q.reshape(b, l, num_heads, c // num_heads),  # (b l) (n d) -> b l n d
        k.reshape(b, l, num_heads, c // num_heads),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def qk_norm_rope_pallas(
    qkv: jax.Array, scale_q: jax.Array, scale_k: jax.Array, cos: jax.Array, sin: jax.Array, eps: float, num_heads: int
) -> tuple[jax.Array, jax.Array]:
    """`qk_norm_rope_xla` as one Pallas kernel (Triton on GPUs, interpreted elsewhere)."""
    return _qk_norm_rope_pallas(qkv, scale_q, scale_k, cos, sin, eps, num_heads)


def _pallas_fwd(qkv, scale_q, scale_k, cos, sin, eps, num_heads):
    return _qk_norm_rope_pallas(qkv, scale_q, scale_k, cos, sin, eps, num_heads), (qkv, scale_q, scale_k, cos, sin)


def _pallas_bwd(eps, num_heads, res, g):
    _, vjp = jax.vjp(lambda *a: qk_norm_rope_xla(*a, eps, num_heads), *res)
    return vjp(g)


qk_norm_rope_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def qk_norm_rope(
    qkv: jax.Array,
    scale_q: jax.Array,
    scale_k: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    eps: float,
    num_heads: int,
    implementation: str = "xla",
) -> tuple[jax.Array, jax.Array]:
    """Normalised, rotated q and k [B, L, N, D] from the QKV output [B, L, 3C] (see the module doc)."""
    if implementation == "xla":
        return qk_norm_rope_xla(qkv, scale_q, scale_k, cos, sin, eps, num_heads)
    if implementation == "pallas":
        return qk_norm_rope_pallas(qkv, scale_q, scale_k, cos, sin, eps, num_heads)
    raise ValueError(f"unknown q/k norm + RoPE implementation {implementation!r}; expected one of {NORM_ROPE_IMPLS}")


__all__ = ["qk_norm_rope", "qk_norm_rope_pallas", "qk_norm_rope_xla"]
