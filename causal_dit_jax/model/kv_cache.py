"""Functional KV caches: the self-attention cache of earlier chunks and the text (cross-attention) K/V.

The self-attention cache is preallocated with static shapes: `capacity` chunk slots of `chunk_tokens`
keys each, for every layer. A chunk's keys are written (already rotated with their absolute
positions) into the slot of its chunk index; repeated forwards of one chunk (the denoising steps and
the cache-fill pass) overwrite the same slot, as in Self-Forcing.

Rolling (local attention window with an attention sink): the first `sink_chunks` slots keep the
stream's first chunks; the remaining slots form a ring of the most recent chunks. Since keys carry
their absolute RoPE positions, the order of keys in the cache does not change attention, so the
ring gives exactly the key set of Self-Forcing's shift-left eviction: sink frames plus the most
recent `local_attn_size - sink_size` frames. Global attention is the special case of a ring that
never wraps (capacity = all chunks of the video).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from causal_dit_jax.model.config import InferenceConfig, ModelConfig, dtype_from_name


@struct.dataclass
class KVCache:
    """Self-attention cache for all layers.

    k, v: [layers, B, S, N, D] with S = capacity * tokens per chunk slot (per device under sequence
    parallelism, where N or S may be the local part). origin_frame: int32 scalar, the global latent
    frame of the stream's first chunk (chunk index = (start_frame - origin_frame) // frames_per_chunk).
    """

    k: jax.Array
    v: jax.Array
    origin_frame: jax.Array
    capacity: int = struct.field(pytree_node=False)
    sink_chunks: int = struct.field(pytree_node=False, default=0)
    frames_per_chunk: int = struct.field(pytree_node=False, default=3)


class CacheWrite(NamedTuple):
    """Where a chunk goes in the cache: its slot and how many leading slots are valid after the write."""

    slot: jax.Array  # int32 scalar
    valid_slots: jax.Array  # int32 scalar


class TextKV(NamedTuple):
    """Cross-attention keys/values of the prompt, per layer: [layers, B, K, N, D]. Computed once."""

    k: jax.Array
    v: jax.Array


def cache_keys(capacity: int, chunk_tokens: int, align: int = 1) -> int:
    """Length of the cache's key axis: capacity slots of chunk_tokens keys, rounded up to a multiple of
    align (paged attention reads whole pages; the tail is never valid, since valid slots are a prefix)."""
    return -(-capacity * chunk_tokens // align) * align


def init_kv_cache(model: ModelConfig, inference: InferenceConfig, batch: int, num_frames: int,
                  chunk_tokens: int, origin_frame: int | jax.Array = 0, num_heads: int | None = None,
                  dtype=None, align: int = 1) -> KVCache:
    """Zero cache sized for a video of `num_frames` latent frames (or the rolling window).

    chunk_tokens: keys stored per chunk slot (3 * 1560 = 4680 at 480x832 on one device).
    num_heads: heads held here (the local heads under head-sharded sequence parallelism).
    align: the key axis is rounded up to a multiple of this (paged attention reads whole pages); the
    tail is never valid, since the valid slots are always a prefix.
    """
    capacity = inference.cache_chunks(num_frames)
    sink = inference.sink_size // inference.frames_per_chunk
    n = model.num_heads if num_heads is None else num_heads
    dt = dtype_from_name(inference.cache_dtype) if dtype is None else dtype
    shape = (model.num_layers, batch, cache_keys(capacity, chunk_tokens, align), n, model.head_dim)
    return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
                   origin_frame=jnp.asarray(origin_frame, jnp.int32), capacity=capacity,
                   sink_chunks=sink, frames_per_chunk=inference.frames_per_chunk)


def cache_write_index(cache: KVCache, start_frame: jax.Array | int) -> CacheWrite:
    """Slot of the chunk starting at global frame `start_frame`, and the valid slots after writing it."""
    c = cache.frames_per_chunk
    chunk = (jnp.asarray(start_frame, jnp.int32) - cache.origin_frame) // c
    sink, cap = cache.sink_chunks, cache.capacity
    ring = max(cap - sink, 1)
    slot = jnp.where(chunk < sink, chunk, sink + (chunk - sink) % ring)
    valid = jnp.minimum(chunk + 1, cap)
    return CacheWrite(slot=slot.astype(jnp.int32), valid_slots=valid.astype(jnp.int32))


class LayerCache(NamedTuple):
    """One layer's view of the stacked cache. The whole [layers, B, S, N, D] buffers travel through
    the layer loop as its carry, so a chunk's write is an in-place update of [layer, :, slot] (no copy
    of the cache per layer or per forward)."""

    k: jax.Array  # [layers, B, S, N, D]
    v: jax.Array
    layer: jax.Array  # int32 scalar

    def read(self) -> tuple[jax.Array, jax.Array]:
        """This layer's keys and values, each [B, S, N, D]."""
        return self.k[self.layer], self.v[self.layer]


def write_chunk(cache: LayerCache, k: jax.Array, v: jax.Array, write: CacheWrite) -> LayerCache:
    """Write one layer's chunk keys/values k, v [B, L, N, D] into slot `write.slot`."""
    length = k.shape[1]
    zero = jnp.zeros((), jnp.int32)
    idx = (jnp.asarray(cache.layer, jnp.int32), zero, write.slot * length, zero, zero)
    new_k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype)[None], idx)
    new_v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype)[None], idx)
    return cache._replace(k=new_k, v=new_v)
