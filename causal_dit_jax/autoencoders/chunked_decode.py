"""Streaming decoders: the shared whole-video decode over chunks, uint8 frames, and the chunk-by-chunk
decode loop that queues each denoised latent chunk without host syncs in between."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


class ChunkedDecode:
    """Whole-video decoding for a streaming decoder that has `init_decode_cache(b, h, w)` and a pure
    `decode_chunk(params, z, cache) -> (frames, cache)` (the Wan VAE and the TAEHV decoder)."""

    @functools.cached_property
    def jit_decode_chunk(self):
        """`decode_chunk` under `jax.jit`, kept on the instance (one compile per chunk shape and flag)."""
        return jax.jit(self.decode_chunk)

    def decode(self, params, z: jax.Array, frames_per_chunk: int | None = 3) -> jax.Array:
        """A whole latent video z [B, T, h, w, C] -> frames [B, 1 + 4 (T - 1), 8h, 8w, 3] in [-1, 1].

        Decoded `frames_per_chunk` latents at a time with the caches carried (the same frames as one
        pass, with bounded memory: one pass over 21 latents at 480x832 holds 81-frame activations);
        None decodes in one pass.
        """
        b, t, h, w, _ = z.shape
        cache = self.init_decode_cache(b, h, w)
        step = frames_per_chunk or t
        outs = []
        for start in range(0, t, step):
            frames, cache = self.jit_decode_chunk(params, z[:, start : start + step], cache)
            outs.append(frames)
        return jnp.concatenate(outs, axis=1)


def to_uint8(frames: jax.Array) -> jax.Array:
    """Frames in [-1, 1] -> uint8 [0, 255]: round((v * 0.5 + 0.5).clip(0, 1) * 255)."""
    return jnp.round(jnp.clip(frames * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)


class LatentChunkDecoder:
    """Streams a video decoder (`WanVAE` or `TAEHVDecoder`) over latent chunks.

    `latents_per_call` latents per jitted call (its caches donated); all calls of a chunk are queued
    before any frame is read back, so the GPU runs them back to back (and the chunk's slice of
    latents is taken inside the call, not as a separate dispatch). 1 latent per call gives the first
    frame soonest and the smallest activation memory.
    """

    def __init__(self, vae, latents_per_call: int = 1):
        if latents_per_call < 1:
            raise ValueError(f"latents_per_call must be >= 1, got {latents_per_call}")
        self.vae = vae
        self.latents_per_call = latents_per_call
        self._decode = jax.jit(self._decode_slice, static_argnums=(4,), donate_argnums=(3,))

    def _decode_slice(self, params, latents: jax.Array, start: jax.Array, cache, size: int):
        z = jax.lax.dynamic_slice_in_dim(latents, start, size, axis=1)  # b size h w c
        frames, cache = self.vae.decode_chunk(params, z, cache)
        return to_uint8(frames), cache

    def init_cache(self, batch: int, latent_height: int, latent_width: int):
        return self.vae.init_decode_cache(batch, latent_height, latent_width)

    def __call__(self, params, latents: jax.Array, cache) -> tuple[list[jax.Array], object]:
        """latents [B, T, h, w, C] (the next chunk) -> ([uint8 frames [B, T', H, W, 3] on the device, one
        per call, queued], the new cache). Latents elsewhere (a mesh's output) are first brought to where
        the decoder's params live (one device; the mesh, replicated, for `BandedWanVAE`)."""
        where = jax.tree.leaves(params)[0].sharding
        if latents.sharding != where:
            latents = jax.device_put(latents, where)
        outs = []
        for j in range(0, latents.shape[1], self.latents_per_call):
            size = min(self.latents_per_call, latents.shape[1] - j)
            pixels, cache = self._decode(params, latents, np.int32(j), cache, size)
            outs.append(pixels)
        return outs, cache


__all__ = ["ChunkedDecode", "LatentChunkDecoder", "to_uint8"]
