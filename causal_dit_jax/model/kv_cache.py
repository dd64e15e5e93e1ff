"""Functional KV caches: the self-attention cache of earlier chunks and the text (cross-attention) K/V.

The self-attention cache is preallocated with static shapes: `capacity` chunk slots of `chunk_tokens`
keys each, for every layer. A chunk's keys are written (already rotated with their absolute
positions) into the slot of its chunk index; repeated forwards of one chunk (the denoising steps and
the cache-fill pass) overwrite the same slot, as in Self-Forcing.

Rolling (local attention window with an attention sink, both in latent frames as in Self-Forcing):
the first `sink_chunks` slots keep the stream's first chunks; the remaining slots form a ring of the
most recent chunks (`InferenceConfig.cache_layout` sizes both so that every frame the window needs
is still held). Since keys carry their absolute RoPE positions, the order of keys in the cache does
not change attention, so the ring gives the key set of Self-Forcing's shift-left eviction. When the
sink and the window are whole chunks, that key set is exactly the written slots, a prefix of the
cache (`CacheWrite.valid_slots`). Otherwise the slots hold some frames Self-Forcing has already
evicted (the non-sink frames of a sink chunk, the oldest frames of the oldest ring chunk);
`CacheWrite.frame_mask` then says, per slot and frame, which keys count. It is derived from the
current chunk index alone (the chunk a slot holds follows from it), so the cache carries no extra
state. Global attention is the special case of a ring that never wraps (capacity = all chunks).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from causal_dit_jax.model.config import InferenceConfig, ModelConfig, dtype_from_name


@struct.dataclass
class KVCache:
    """Self-attention cache for all layers.

    k, v: [layers, B, S, N, D] with S = capacity * tokens per chunk slot (per device under sequence
    parallelism, where N or S may be the local part). origin_frame: int32 scalar, the global latent
    frame of the stream's first chunk (chunk index = (start_frame - origin_frame) // frames_per_chunk).
    The static fields are `InferenceConfig.cache_layout`'s: slots, sink slots, and the eviction rule
    in frames (sink_frames never evicted, at most window_frames attended; -1: nothing is evicted).
    """

    k: jax.Array
    v: jax.Array
    origin_frame: jax.Array
    capacity: int = struct.field(pytree_node=False)
    sink_chunks: int = struct.field(pytree_node=False, default=0)
    frames_per_chunk: int = struct.field(pytree_node=False, default=3)
    sink_frames: int = struct.field(pytree_node=False, default=0)
    window_frames: int = struct.field(pytree_node=False, default=-1)

    @property
    def frame_masked(self) -> bool:
        """Whether attention needs `CacheWrite.frame_mask`: a window or sink that is not whole chunks
        (then the held slots keep frames Self-Forcing has evicted). Otherwise the valid keys are a
        prefix of the cache and the fast paths (a key length) apply."""
        c = self.frames_per_chunk
        return self.window_frames != -1 and bool(self.window_frames % c or self.sink_frames % c)


class CacheWrite(NamedTuple):
    """Where a chunk goes in the cache: its slot and how many leading slots are valid after the write.

    frame_mask: None when the valid keys are the first valid_slots slots (global attention, or a
    window and sink of whole chunks); else [capacity, frames_per_chunk] bool, whether frame i of slot
    s is attended (the slots past valid_slots are all False), for `KVCache.frame_masked` caches.
    """

    slot: jax.Array  # int32 scalar
    valid_slots: jax.Array  # int32 scalar
    frame_mask: jax.Array | None = None


class TextKV(NamedTuple):
    """Cross-attention keys/values of the prompt, per layer: [layers, B, K, N, D]. Computed once."""

    k: jax.Array
    v: jax.Array


def cache_keys(capacity: int, chunk_tokens: int, align: int = 1) -> int:
    """Length of the cache's key axis: capacity slots of chunk_tokens keys, rounded up to a multiple of
    align (paged attention reads whole pages; the tail is never valid, since valid slots are a prefix)."""
    return -(-capacity * chunk_tokens // align) * align


def cache_dtype(model: ModelConfig, inference: InferenceConfig):
    """The cache's dtype: `inference.cache_dtype`, or the model's dtype when that is None."""
    return dtype_from_name(inference.cache_dtype or model.dtype)


def kv_cache_for(
    inference: InferenceConfig, num_frames: int, k: jax.Array, v: jax.Array, origin_frame: int | jax.Array = 0
) -> KVCache:
    """A KVCache over the buffers k, v with the slots and eviction rule of `inference.cache_layout`."""
    layout = inference.cache_layout(num_frames)
    return KVCache(
        k=k,
        v=v,
        origin_frame=jnp.asarray(origin_frame, jnp.int32),
        capacity=layout.capacity,
        sink_chunks=layout.sink_chunks,
        frames_per_chunk=inference.frames_per_chunk,
        sink_frames=layout.sink_frames,
        window_frames=layout.window_frames,
    )


def init_kv_cache(
    model: ModelConfig,
    inference: InferenceConfig,
    batch: int,
    num_frames: int,
    chunk_tokens: int,
    origin_frame: int | jax.Array = 0,
    num_heads: int | None = None,
    dtype=None,
    align: int = 1,
) -> KVCache:
    """Zero cache sized for a video of `num_frames` latent frames (or the rolling window).

    chunk_tokens: keys stored per chunk slot (3 * 1560 = 4680 at 480x832 on one device).
    num_heads: heads held here (the local heads under head-sharded sequence parallelism).
    dtype: overrides `inference.cache_dtype` (whose None means the model's dtype).
    align: the key axis is rounded up to a multiple of this (paged attention reads whole pages); the
    tail is never valid.
    """
    capacity = inference.cache_chunks(num_frames)
    n = model.num_heads if num_heads is None else num_heads
    dt = cache_dtype(model, inference) if dtype is None else dtype
    shape = (model.num_layers, batch, cache_keys(capacity, chunk_tokens, align), n, model.head_dim)
    return kv_cache_for(inference, num_frames, jnp.zeros(shape, dt), jnp.zeros(shape, dt), origin_frame)


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def slot_frame_mask(cache: KVCache, chunk: jax.Array) -> jax.Array:
    """[capacity, frames_per_chunk] bool: which frames of which slot the chunk `chunk` (its index in
    the stream, its keys already written) attends to, with Self-Forcing's eviction.

    Slot s < sink_chunks holds chunk s; ring slot s holds the latest chunk k <= chunk with
    k = s (mod ring), i.e. k = chunk - (chunk - s) % ring, if k has reached the ring. Frame f
    (counted from the stream's first) of chunk E / c - 1 is kept iff f < sink_frames or
    f >= E - (window_frames - sink_frames).
    """
    c, cap, sink = cache.frames_per_chunk, cache.capacity, cache.sink_chunks
    ring = max(cap - sink, 1)
    s = jnp.arange(cap, dtype=jnp.int32)
    held = jnp.where(s < sink, s, chunk - (chunk - s) % ring)
    written = (held <= chunk) & ((s < sink) | (held >= sink))
    frame = held[:, None] * c + jnp.arange(c, dtype=jnp.int32)[None]
    end = (chunk + 1) * c
    kept = (frame < cache.sink_frames) | (frame >= end - (cache.window_frames - cache.sink_frames))
    return written[:, None] & kept


def cache_write_index(cache: KVCache, start_frame: jax.Array | int) -> CacheWrite:
    """Slot of the chunk starting at global frame `start_frame`, the valid slots after writing it,
    and (for `frame_masked` caches) its frame mask.

    start_frame must be aligned with the cache's chunks: (start_frame - origin_frame) a multiple of
    frames_per_chunk. A concrete start_frame (int, numpy, an array outside jit) that is not is an
    error; a traced one is the caller's guarantee (the sampler passes origin + i * frames_per_chunk),
    unchecked so that nothing is added to the jitted forward.
    """
    c = cache.frames_per_chunk
    if _concrete(start_frame) and _concrete(cache.origin_frame):
        offset = int(np.asarray(start_frame)) - int(np.asarray(cache.origin_frame))
        if offset % c:
            raise ValueError(
                f"start_frame={int(np.asarray(start_frame))} is not aligned with the cache's chunks: "
                f"it is {offset} frames from the stream's first frame "
                f"{int(np.asarray(cache.origin_frame))}, not a multiple of frames_per_chunk={c}"
            )
    chunk = (jnp.asarray(start_frame, jnp.int32) - cache.origin_frame) // c
    sink, cap = cache.sink_chunks, cache.capacity
    ring = max(cap - sink, 1)
    slot = jnp.where(chunk < sink, chunk, sink + (chunk - sink) % ring)
    valid = jnp.minimum(chunk + 1, cap)
    mask = slot_frame_mask(cache, chunk) if cache.frame_masked else None
    return CacheWrite(slot=slot.astype(jnp.int32), valid_slots=valid.astype(jnp.int32), frame_mask=mask)


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
