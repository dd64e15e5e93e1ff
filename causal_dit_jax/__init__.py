"""causal-dit-jax: streaming text-to-video with a causal, KV-cached Wan2.1 DiT (Self-Forcing) in JAX.

The package face is the model (`causal_dit_jax.model`): importing it loads no text encoder, decoder
or pipeline. The floors above it: `text`, `decoders`, `sharding`, `convert`, then `app` (pipeline,
video writer, CLI) and `bench`.
"""

from causal_dit_jax.model import (
    PRESETS,
    CausalWanDiT,
    ChunkModel,
    InferenceConfig,
    KernelConfig,
    KVCache,
    ModelConfig,
    RopeTables,
    SelfForcingSampler,
    TextKV,
    causal_rope_positions,
    from_torch_layout,
    get_preset,
    init_kv_cache,
    initial_noise,
    load_dit,
    param_count,
    rope_tables,
    to_torch_layout,
)

__all__ = [
    "CausalWanDiT",
    "ChunkModel",
    "InferenceConfig",
    "KVCache",
    "KernelConfig",
    "ModelConfig",
    "PRESETS",
    "RopeTables",
    "SelfForcingSampler",
    "TextKV",
    "causal_rope_positions",
    "from_torch_layout",
    "get_preset",
    "init_kv_cache",
    "initial_noise",
    "load_dit",
    "param_count",
    "rope_tables",
    "to_torch_layout",
]
