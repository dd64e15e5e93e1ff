"""Decode each denoised latent chunk to uint8 frames on the device, without host syncs in between."""

from __future__ import annotations

import jax
import numpy as np

from causal_dit_jax.vae import to_uint8


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
        per call, queued], the new cache). Latents elsewhere (a mesh's output) are first brought to the
        decoder params' device."""
        where = jax.tree.leaves(params)[0].sharding
        if latents.sharding != where:
            latents = jax.device_put(latents, where)
        outs = []
        for j in range(0, latents.shape[1], self.latents_per_call):
            size = min(self.latents_per_call, latents.shape[1] - j)
            pixels, cache = self._decode(params, latents, np.int32(j), cache, size)
            outs.append(pixels)
        return outs, cache


__all__ = ["LatentChunkDecoder"]
