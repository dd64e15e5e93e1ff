"""Ring attention over the 'ring' mesh axis, online softmax (log-sum-exp) merges, R members.

Each ring member holds one segment of the chunk's tokens and, in its KV cache, its segment of every
cached chunk (sequence-sharded: the keys stay where they were computed). What circulates is whichever
is smaller; both are static shapes, so the choice is made at trace time (`ring_traffic`):

* the queries (`'queries'`, any KV cache of 2 slots or more): a member's query block travels around
  the ring with its float32 running result (out, lse); each member attends the visiting queries to
  its OWN valid cached keys and merges the result in. Keys and values never move, and the traffic
  does not depend on the cache's size or fill.
* the keys and values (`'keys'`, no cache, or a one-slot one): the member's K/V block travels and the
  queries stay. A block is every slot of the member's cache (filled or not: ppermute needs static
  shapes), so this is only cheaper when the block is one segment (2 x bf16 against bf16 q + f32 out).

Padded tokens (the tail of the last segment) are masked as keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.model.attention import attention_with_lse, frame_key_mask, prefix_attention_with_lse
from causal_dit_jax.model.kv_cache import CacheWrite, LayerCache, write_chunk
from causal_dit_jax.sharding.mesh import RING

LSE_BYTES = 4  # the running result travels in float32: out [B, Lseg, N, D] and lse [B, N, Lseg]


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets. out [B, L, N, D] f32, lse [B, N, L]."""
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    wa = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - safe), 0.0)
    wb = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0)

    def w(x):  # b n l -> b l n 1
        return jnp.transpose(x, (0, 2, 1))[..., None]

    return out_a * w(wa) + out_b * w(wb), lse


def ring_traffic(
    ring: int, batch: int, segment: int, heads: int, head_dim: int, key_slots: int, q_bytes: int, kv_bytes: int
) -> tuple[str, int]:
    """What a ring step circulates and the bytes each member sends per layer and forward.

    segment: tokens per member (Lseg); heads: the heads on this member (N / ulysses); key_slots: the
    slots of its key/value block (the cache's capacity; 1 without a cache, the chunk's own segment);
    q_bytes / kv_bytes: bytes per element of the queries / of the keys and values.
    'queries': R - 1 hops of the query block (q's dtype) and R - 1 of its float32 result (out, lse):
    the first hop carries the queries alone, the last the result alone, bringing it home.
    'keys': R - 1 hops of the K and V blocks, every slot of them.
    The smaller wins (a tie keeps the keys).
    """
    block = batch * segment * heads * head_dim
    queries = (ring - 1) * (block * (q_bytes + LSE_BYTES) + batch * heads * segment * LSE_BYTES)
    keys = (ring - 1) * 2 * key_slots * block * kv_bytes
    return ("queries", queries) if queries < keys else ("keys", keys)


def ring_self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layer_cache: LayerCache | None,
    write: CacheWrite | None,
    *,
    true_len: int,
    axis: str = RING,
    implementation: str | None = None,
) -> tuple[jax.Array, LayerCache | None]:
    """q/k/v [B, Lseg, N, D]: this member's segment of the chunk (segment r covers flattened tokens
    [r*Lseg, (r+1)*Lseg)); true_len: real tokens in the chunk (the rest is padding).

    With a cache [B, cap*Lseg, N, D] the segment's k/v are written to its slot first, and every
    valid slot of every member is attended. Returns out [B, Lseg, N, D] (q's dtype) and the cache.
    What circulates (queries or keys) is `ring_traffic`'s choice. When the chunk has no padding
    (ring * Lseg == true_len, e.g. 4680 tokens on 2, 4 or 8 members) every block's valid keys are a
    prefix, and each step is one flash attention (cuDNN on GPUs) returning its log-sum-exp; otherwise
    a masked attention. A window or sink of part chunks (`write.frame_mask`) always takes the masked
    attention, its mask also dropping the frames Self-Forcing has evicted (each key block is the
    segment of its owner, so the mask is the owner's).
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
    b, s, n, d = keys.shape

    frame_mask = None if write is None else write.frame_mask  # [slots, c] for a part-chunk window/sink
    if frame_mask is not None and true_len % frame_mask.shape[1]:
        raise ValueError(f"a chunk of {true_len} tokens is not {frame_mask.shape[1]} whole frames")
    prefix = ring * seg == true_len and frame_mask is None  # the valid keys: the first valid_slots * seg

    def key_mask(owner):  # [B, S]: by each key's slot and its token in the segment of its owner
        slot, token = jnp.arange(s, dtype=jnp.int32) // seg, jnp.arange(s, dtype=jnp.int32) % seg
        mask = (slot < valid_slots) & (owner * seg + token < true_len)
        if frame_mask is not None:  # and by the frame of that token, as Self-Forcing evicts
            mask &= frame_key_mask(
                frame_mask, s, seg, true_len // frame_mask.shape[1], token_offset=owner * seg, true_len=true_len
            )
        return jnp.broadcast_to(mask, (b, s))

    def attend(queries, block_k, block_v, mask):
        if prefix:
            return prefix_attention_with_lse(queries, block_k, block_v, valid_slots * seg, implementation)
        return attention_with_lse(queries, block_k, block_v, mask)

    perm = [(i, (i + 1) % ring) for i in range(ring)]
    path, _ = ring_traffic(ring, b, seg, n, d, s // seg, np.dtype(q.dtype).itemsize, np.dtype(keys.dtype).itemsize)
    if path == "queries":  # the keys stay: visiting query blocks attend to this member's keys
        mask = None if prefix else key_mask(me)
        home = attend(q, keys, values, mask)  # my queries on my keys
        visiting, acc = q, None  # at step i: the queries of member me - i, their result over members me-i+1..me-1
        for _ in range(1, ring):
            if acc is None:
                visiting = jax.lax.ppermute(visiting, axis, perm)
            else:
                visiting, acc = jax.lax.ppermute((visiting, acc), axis, perm)
            o, l = attend(visiting, keys, values, mask)
            acc = (o, l) if acc is None else merge_partials(*acc, o, l)
        acc = jax.lax.ppermute(acc, axis, perm)  # from member me - 1: my queries over every other member
        out, _ = merge_partials(*home, *acc)
        return out.astype(q.dtype), layer_cache

    out = lse = None  # the keys travel: block i is member (me - i)'s
    block = (keys, values)
    for step in range(ring):
        o, l = attend(q, block[0], block[1], None if prefix else key_mask((me - step) % ring))
        out, lse = (o, l) if out is None else merge_partials(out, lse, o, l)
        if step < ring - 1:
            block = jax.lax.ppermute(block, axis, perm)
    return out.astype(q.dtype), layer_cache
