"""Sequence parallelism for the causal DiT: meshes, partition specs, Ulysses / ring attention, Causal-RoPE SP."""

from causal_dit_jax.sharding.mesh import DATA, RING, SEQ_AXES, STRATEGIES, ULYSSES, make_mesh, split_sequence_devices
from causal_dit_jax.sharding.sequence_parallel import SequenceParallelDiT, sequence_parallel_dit

__all__ = [
    "DATA",
    "RING",
    "SEQ_AXES",
    "STRATEGIES",
    "ULYSSES",
    "SequenceParallelDiT",
    "make_mesh",
    "sequence_parallel_dit",
    "split_sequence_devices",
]
