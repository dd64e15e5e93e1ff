"""The causal Wan DiT and its Self-Forcing sampler: configs, Causal-RoPE, KV cache, blocks, kernels."""

from causal_dit_jax.model.chunk_model import ChunkModel
from causal_dit_jax.model.config import PRESETS, InferenceConfig, KernelConfig, ModelConfig, get_preset
from causal_dit_jax.model.dit import CausalWanDiT, load_dit, param_count
from causal_dit_jax.model.kv_cache import KVCache, TextKV, init_kv_cache
from causal_dit_jax.model.patchify import from_torch_layout, to_torch_layout
from causal_dit_jax.model.rope import RopeTables, causal_rope_positions, rope_tables
from causal_dit_jax.model.sampler import SelfForcingSampler, initial_noise

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
