"""Attention kernels of the DiT on one device.

The blocks take the self-attention as a function argument with the signature of
`local_self_attention`: (q, k, v, layer_cache, write) -> (out, layer_cache). `sharding/` passes
Ulysses or ring versions of it; the blocks themselves never change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

from causal_dit_jax.model.kv_cache import CacheWrite, LayerCache, write_chunk


class SelfAttentionFn(Protocol):
    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, layer_cache: LayerCache | None, write: CacheWrite | None
    ) -> tuple[jax.Array, LayerCache | None]: ...


def default_implementation(dtype) -> str:
    """On GPUs for 16-bit inputs cuDNN flash attention, reading the KV cache in place through paged
    attention ('cudnn_paged': several times faster than XLA's attention, and no per-layer copy of
    the cache; figures in benchmarks/NOTES.md); otherwise XLA."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn_paged"
    return "xla"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_length: jax.Array | None = None,
    implementation: str | None = None,
    key_mask: jax.Array | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v for q [B, L, N, D], k/v [B, S, N, D]; keys past kv_length are ignored
    (cuDNN skips them; XLA masks them).

    key_mask: [S] bool, the keys attended (instead of kv_length): XLA masks the logits; cuDNN takes
    it as a [1, 1, L, S] bias (the frame-granular rolling window; the prefix case keeps kv_length).
    implementation: None (cuDNN on GPU for bf16/f16, else XLA), 'xla' or 'cudnn' ('cudnn_paged' is
    'cudnn' here: there is no cache to page).
    """
    b = q.shape[0]
    kv_len = None
    if kv_length is not None:
        kv_len = jnp.broadcast_to(jnp.asarray(kv_length, jnp.int32), (b,))
    k = k.astype(q.dtype)
    v = v.astype(q.dtype)
    implementation = implementation or default_implementation(q.dtype)
    if implementation == "cudnn_paged":
        implementation = "cudnn"
    mask = None
    if key_mask is not None:
        if kv_length is not None:
            raise ValueError("give kv_length or key_mask, not both")
        mask = key_mask.reshape(1, 1, 1, k.shape[1])
        if implementation == "cudnn":  # cuDNN's bias must span the queries
            mask = jnp.broadcast_to(mask, (1, 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=kv_len, implementation=implementation)


def frame_key_mask(
    frame_mask: jax.Array,
    num_keys: int,
    slot_tokens: int,
    tokens_per_frame: int,
    token_offset: jax.Array | int = 0,
    true_len: int | None = None,
) -> jax.Array:
    """[num_keys] bool from a cache's per-slot frame mask (`CacheWrite.frame_mask`, [slots, c]).

    Key i lies in slot i // slot_tokens at token token_offset + i % slot_tokens of its chunk (a ring
    member holds the segment starting at token_offset), in frame token // tokens_per_frame. Keys past
    the slots (an aligned cache's tail) and, given true_len, the chunk's padding are never valid.
    """
    slots, c = frame_mask.shape
    i = jnp.arange(num_keys, dtype=jnp.int32)
    slot = i // slot_tokens
    token = jnp.asarray(token_offset, jnp.int32) + i % slot_tokens
    inside = slot < slots
    if true_len is not None:
        inside &= token < true_len
    index = jnp.clip(slot, 0, slots - 1) * c + jnp.clip(token // tokens_per_frame, 0, c - 1)
    return inside & frame_mask.reshape(-1)[index]


def attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked attention that also returns the log-sum-exp of the logits (for merging partials).

    q [B, L, N, D], k/v [B, S, N, D], key_mask [B, S] bool. Returns out [B, L, N, D] (float32) and
    lse [B, N, L] (float32; -inf where no key is valid). Math in float32.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("blnd,bsnd->bnls", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # b n l
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    probs = jnp.exp(logits - safe[..., None])
    out = jnp.einsum("bnls,bsnd->blnd", probs, v.astype(jnp.float32))
    return out, lse


def _prefix_mask(b: int, s: int, kv_length) -> jax.Array:
    """[B, S] bool: key j is valid iff j < kv_length."""
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None] < jnp.asarray(kv_length, jnp.int32), (b, s))


@jax.custom_vjp
def cudnn_attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, kv_length: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`attention_with_lse` for a prefix of valid keys (the first kv_length, >= 1) as one cuDNN flash
    attention that also returns its softmax statistics. GPU, bf16/f16 q/k/v [B, L, N, D].

    Returns out [B, L, N, D] float32 and lse [B, N, L] float32. The backward pass is the XLA
    path's (cuDNN's own rule drops the gradient of the statistics, which a ring merge needs).
    """
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    b = q.shape[0]
    q_len = jnp.full((b,), q.shape[1], jnp.int32)
    kv_len = jnp.broadcast_to(jnp.asarray(kv_length, jnp.int32), (b,))
    out, lse = cudnn_attention(
        q,
        k.astype(q.dtype),
        v.astype(q.dtype),
        q_seqlen=q_len,
        kv_seqlen=kv_len,
        scale=q.shape[-1] ** -0.5,
        mask_type=MaskType.PADDING,
        return_residual=True,
    )
    return out.astype(jnp.float32), lse.astype(jnp.float32)


def _lse_fwd(q, k, v, kv_length):
    return cudnn_attention_with_lse(q, k, v, kv_length), (q, k, v, kv_length)


def _lse_bwd(res, g):
    q, k, v, kv_length = res
    mask = _prefix_mask(q.shape[0], k.shape[1], kv_length)
    _, vjp = jax.vjp(lambda a, b_, c: attention_with_lse(a, b_, c, mask), q, k, v)
    return (*vjp(g), None)


cudnn_attention_with_lse.defvjp(_lse_fwd, _lse_bwd)


def prefix_attention_with_lse(
    q: jax.Array, k: jax.Array, v: jax.Array, kv_length, implementation: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """Attention of q over the first kv_length keys with its log-sum-exp (out f32 [B, L, N, D],
    lse f32 [B, N, L]): cuDNN on GPUs for 16-bit inputs, XLA's masked einsum otherwise."""
    implementation = implementation or default_implementation(q.dtype)
    if implementation in ("cudnn", "cudnn_paged"):
        return cudnn_attention_with_lse(q, k, v, jnp.asarray(kv_length, jnp.int32))
    return attention_with_lse(q, k, v, _prefix_mask(q.shape[0], k.shape[1], kv_length))


PAGE_TOKENS = 256  # keys per page of the paged cache attention (cuDNN wants a power of 2)


def paged_cache_attention(q: jax.Array, cache: LayerCache, kv_length: jax.Array, page_tokens: int = PAGE_TOKENS) -> jax.Array:
    """cuDNN paged attention of q [B, L, N, D] over this layer's part of the stacked cache, read in place.

    The stacked buffers [layers, B, S, N, D] are viewed (a free reshape) as pages of `page_tokens`
    keys, [layers * B * S / page_tokens, page_tokens, N, D], and a page table picks this layer's pages,
    so no per-layer copy of the cache is made (a `cache.read()` slice feeding a custom call is one).
    S must be a multiple of page_tokens (`init_kv_cache(align=...)`); the valid keys are a prefix.
    Each batch row's table spans all pages (cuDNN wants B x table length = pages); entries past
    kv_length are never read. GPU only (cuDNN >= 9.5, bf16/f16); inference only (no gradient rule).
    """
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, paged_attention

    layers, b, s, n, d = cache.k.shape
    if s % page_tokens or page_tokens & (page_tokens - 1):
        raise ValueError(
            f"cache length {s} must be a multiple of the page size {page_tokens}, a power of 2 "
            "(make the cache with init_kv_cache(align=page_tokens))"
        )
    pages = s // page_tokens  # per (layer, batch row)
    k_pages = cache.k.reshape(layers * b * pages, page_tokens, n, d)  # l b (p t) n d -> (l b p) t n d
    v_pages = cache.v.reshape(layers * b * pages, page_tokens, n, d)
    first = (jnp.asarray(cache.layer, jnp.int32) * b + jnp.arange(b, dtype=jnp.int32)) * pages  # [B]
    table = (first[:, None] + jnp.arange(layers * pages, dtype=jnp.int32)[None]) % (layers * b * pages)
    table = table[:, None, :, None]  # [B, 1, layers * pages, 1]
    q_len = jnp.full((b,), q.shape[1], jnp.int32)
    kv_len = jnp.broadcast_to(jnp.asarray(kv_length, jnp.int32), (b,))
    return paged_attention(
        q,
        k_pages.astype(q.dtype),
        v_pages.astype(q.dtype),
        q_len,
        kv_len,
        table,
        table,
        scale=d**-0.5,
        mask_type=MaskType.PADDING,
    )


def _sliced_cache_attention(q, cache_k, cache_v, layer, kv_length):
    return dot_product_attention(q, cache_k[layer], cache_v[layer], kv_length=kv_length, implementation="cudnn")


@jax.custom_vjp
def cache_attention_in_place(
    q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: jax.Array, kv_length: jax.Array
) -> jax.Array:
    """`paged_cache_attention` with a gradient: the backward pass is that of slicing the layer's
    cache and running cuDNN attention (the same function), so the fast path works under jax.grad."""
    return paged_cache_attention(q, LayerCache(cache_k, cache_v, layer), kv_length)


def _in_place_fwd(q, cache_k, cache_v, layer, kv_length):
    return cache_attention_in_place(q, cache_k, cache_v, layer, kv_length), (q, cache_k, cache_v, layer, kv_length)


def _in_place_bwd(res, g):
    q, cache_k, cache_v, layer, kv_length = res
    _, vjp = jax.vjp(lambda a, b, c: _sliced_cache_attention(a, b, c, layer, kv_length), q, cache_k, cache_v)
    return (*vjp(g), None, None)


cache_attention_in_place.defvjp(_in_place_fwd, _in_place_bwd)


def local_self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layer_cache: LayerCache | None = None,
    write: CacheWrite | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, LayerCache | None]:
    """Self-attention of a chunk on one device, with or without the KV cache.

    Without a cache the chunk attends to itself. With one, the chunk's (rotated) k/v are written to
    its slot and the chunk attends to every valid slot: the earlier chunks and itself
    (block-causal, bidirectional inside the chunk; no mask beyond the valid length). A cache whose
    window or sink is not whole chunks (`write.frame_mask`) is read sliced, with a key mask of the
    frames Self-Forcing still holds (XLA's or cuDNN's masked attention).
    implementation 'cudnn_paged' (the GPU default) reads the cache in place through cuDNN paged
    attention when its key axis is a whole number of pages (`CausalWanDiT.init_cache` makes it so),
    and slices the layer's cache otherwise.
    """
    implementation = implementation or default_implementation(q.dtype)
    paged = implementation == "cudnn_paged"
    if paged:
        implementation = "cudnn"
    if layer_cache is None:
        return dot_product_attention(q, k, v, implementation=implementation), None
    layer_cache = write_chunk(layer_cache, k, v, write)
    if write.frame_mask is not None:  # a window or sink of part chunks: the masked read of the layer
        cache_k, cache_v = layer_cache.read()
        chunk = k.shape[1]
        mask = frame_key_mask(write.frame_mask, cache_k.shape[1], chunk, chunk // write.frame_mask.shape[1])
        out = dot_product_attention(q, cache_k, cache_v, implementation=implementation, key_mask=mask)
        return out, layer_cache
    kv_length = write.valid_slots * k.shape[1]
    if paged and layer_cache.k.shape[2] % PAGE_TOKENS == 0:
        out = cache_attention_in_place(q, layer_cache.k, layer_cache.v, layer_cache.layer, kv_length)
        return out, layer_cache
    cache_k, cache_v = layer_cache.read()
    out = dot_product_attention(q, cache_k, cache_v, kv_length=kv_length, implementation=implementation)
    return out, layer_cache


def make_local_self_attention(implementation: str | None = None) -> Callable:
    """`local_self_attention` bound to an attention implementation ('xla', 'cudnn', 'cudnn_paged' or
    None: the backend's default)."""

    def fn(q, k, v, layer_cache=None, write=None):
        return local_self_attention(q, k, v, layer_cache, write, implementation)

    return fn
