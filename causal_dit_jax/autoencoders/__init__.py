"""Video autoencoders between latents and frames, streaming: the Wan2.1 VAE decoder and encoder, the tiny
TAEHV decoder and encoder, the shared chunked decode and the chunk decode loop."""

from causal_dit_jax.autoencoders.chunked_decode import ChunkedDecode, LatentChunkDecoder, to_uint8
from causal_dit_jax.autoencoders.taehv import TAEHVConfig, TAEHVDecoder, get_taehv_preset
from causal_dit_jax.autoencoders.taehv_encoder import TAEHVEncoder
from causal_dit_jax.autoencoders.wan_vae import VAEConfig, WanVAE, get_vae_preset
from causal_dit_jax.autoencoders.wan_vae_encoder import VAEEncodeCache, WanVAEEncoder, load_vae_encoder

__all__ = [
    "ChunkedDecode",
    "LatentChunkDecoder",
    "TAEHVConfig",
    "TAEHVDecoder",
    "TAEHVEncoder",
    "VAEConfig",
    "VAEEncodeCache",
    "WanVAE",
    "WanVAEEncoder",
    "get_taehv_preset",
    "get_vae_preset",
    "load_vae_encoder",
    "to_uint8",
]
