"""What "a chunk model" is: the interface the sampler, the pipeline and the bench drive.

`CausalWanDiT` (one device) and `sharding.SequenceParallelDiT` (a mesh) both satisfy it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from causal_dit_jax.model.config import InferenceConfig, KernelConfig, ModelConfig
from causal_dit_jax.model.kv_cache import KVCache, TextKV
from causal_dit_jax.model.rope import RopeTables

Params = dict[str, Any]
Array = jax.Array
Cache = KVCache | None  # a chunk without a cache attends to itself only


@runtime_checkable
class ChunkModel(Protocol):
    """A causal DiT that runs one latent chunk at a time against a KV cache."""

    config: ModelConfig
    kernels: KernelConfig

    @property
    def num_devices(self) -> int:
        """Devices one forward runs on (the MFU denominator counts all of them)."""

    def init(self, rng: jax.Array) -> Params: ...

    def abstract_params(self) -> Params: ...

    def place(self, tree: Any) -> Any:
        """Put params or inputs where this model's forward expects them (unchanged on one device,
        replicated over the mesh under sequence parallelism)."""

    def rope_tables(self, max_frames: int, latent_height: int, latent_width: int) -> RopeTables: ...

    def encode_text(self, params: Params, context: jax.Array) -> TextKV: ...

    def init_cache(
        self, inference: InferenceConfig, batch: int, num_frames: int, latent_height: int, latent_width: int, origin_frame=0
    ) -> KVCache: ...

    def forward(
        self, params: Params, x: Array, t: Array, text: TextKV, cache: Cache, start_frame: Array | int, rope: RopeTables
    ) -> tuple[Array, Cache]: ...


__all__ = ["ChunkModel"]
