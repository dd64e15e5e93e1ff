"""Ring attention over the 'ring' mesh axis: queries stay local, K/V blocks circulate (ppermute).

Each ring member holds one segment of the chunk's tokens and the KV cache of the segments it
computed (sequence-sharded). Per layer it attends its queries to its own block, passes the block to
the next member, and merges the partial results with an online softmax (log-sum-exp), R steps in all.
Padded tokens (the tail of the last segment) are masked as keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from causal_dit_jax.model.attention import attention_with_lse, frame_key_mask, prefix_attention_with_lse
from causal_dit_jax.model.kv_cache import CacheWrite, LayerCache, write_chunk
from causal_dit_jax.sharding.mesh import RING


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets. out [B, L, N, D] f32, lse [B, N, L]."""
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    wa = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - safe), 0.0)
    wb = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0)

    def w(x):  # b n l -> b l n 1
        return jnp.transpose(x, (0, 2, 1))[..., None]

    return out_a * w(wa) + out_b * w(wb), lse


def ring_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, layer_cache: LayerCache | None,
                        write: CacheWrite | None, *, true_len: int, axis: str = RING,
                        implementation: str | None = None) -> tuple[jax.Array, LayerCache | None]:
    """q/k/v [B, Lseg, N, D]: this member's segment of the chunk (segment r covers flattened tokens
    [r*Lseg, (r+1)*Lseg)); true_len: real tokens in the chunk (the rest is padding).

    With a cache [B, cap*Lseg, N, D] the segment's k/v are written to its slot first, and every
    valid slot of every member is attended. Returns out [B, Lseg, N, D] (q's dtype) and the cache.
    When the chunk has no padding (ring * Lseg == true_len, e.g. 4680 tokens on 2, 4 or 8 members)
    every block's valid keys are a prefix, and each step is one flash attention (cuDNN on GPUs)
    returning its log-sum-exp; otherwise a masked attention. A window or sink of part chunks
    (`write.frame_mask`) always takes the masked attention, its mask also dropping the frames
    Self-Forcing has evicted (each block's tokens are the segment of its owner, so the mask is made
    per step).
    """
    ring = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)
    seg = k.shape[1]
    if layer_cache is None:
        keys, values, valid_slots = k, v.astype(k.dtype), 1
    else:
        layer_cache = write_chunk(layer_cache, k, v, write)
        keys, values = layer_cache.read()
        valid_slots = write.valid_slots
    s = keys.shape[1]
    b = q.shape[0]

    frame_mask = None if write is None else write.frame_mask  # [slots, c] for a part-chunk window/sink
    if frame_mask is not None and true_len % frame_mask.shape[1]:
        raise ValueError(f"a chunk of {true_len} tokens is not {frame_mask.shape[1]} whole frames")

    out = lse = None
    block = (keys, values)  # b s n d each
    perm = [(i, (i + 1) % ring) for i in range(ring)]
    no_padding = ring * seg == true_len
    for step in range(ring):
        if no_padding and frame_mask is None:  # the valid keys are the first valid_slots * seg
            o, l = prefix_attention_with_lse(q, block[0], block[1], valid_slots * seg, implementation)
        else:  # mask by each key's slot and its token in the segment of `block`'s owner
            owner = (me - step) % ring
            slot, token = jnp.arange(s, dtype=jnp.int32) // seg, jnp.arange(s, dtype=jnp.int32) % seg
            mask = (slot < valid_slots) & (owner * seg + token < true_len)
            if frame_mask is not None:  # and by the frame of that token, as Self-Forcing evicts
                mask &= frame_key_mask(frame_mask, s, seg, true_len // frame_mask.shape[1],
                                       token_offset=owner * seg, true_len=true_len)
            o, l = attention_with_lse(q, block[0], block[1], jnp.broadcast_to(mask, (b, s)))
        out, lse = (o, l) if out is None else merge_partials(out, lse, o, l)
        if step < ring - 1:
            block = jax.lax.ppermute(block, axis, perm)
    return out.astype(q.dtype), layer_cache
