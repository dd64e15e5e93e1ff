"""causal-dit-jax: streaming text-to-video with a causal, KV-cached Wan2.1 DiT (Self-Forcing) in JAX.

The package face is the model (`causal_dit_jax.model`, re-exported whole): importing it loads no text
encoder, autoencoder or pipeline. The floors above it: `text`, `autoencoders`, `sharding`, `convert`,
then `app` (pipeline, video writer, CLI) and `bench`.
"""

from causal_dit_jax import model
from causal_dit_jax.model import *  # noqa: F403  (the face is the model's own __all__)

__all__ = list(model.__all__)
