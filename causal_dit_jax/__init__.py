"""causal-dit-jax: streaming text-to-video with a causal, KV-cached Wan2.1 DiT (Self-Forcing) in JAX."""

from causal_dit_jax.chunk_decoder import LatentChunkDecoder
from causal_dit_jax.config import InferenceConfig, ModelConfig, PRESETS, get_preset
from causal_dit_jax.dit import CausalWanDiT, load_dit, param_count
from causal_dit_jax.kv_cache import KVCache, TextKV, init_kv_cache
from causal_dit_jax.patchify import from_torch_layout, to_torch_layout
from causal_dit_jax.rope import RopeTables, causal_rope_positions, rope_tables
from causal_dit_jax.pipeline import TextToVideoPipeline
from causal_dit_jax.sampler import SelfForcingSampler, initial_noise

__all__ = [
    "CausalWanDiT", "InferenceConfig", "KVCache", "LatentChunkDecoder", "ModelConfig", "PRESETS", "RopeTables",
    "SelfForcingSampler", "TextKV", "TextToVideoPipeline", "causal_rope_positions", "from_torch_layout",
    "get_preset", "init_kv_cache", "initial_noise", "load_dit", "param_count", "rope_tables", "to_torch_layout",
]
