"""PartitionSpecs of every array the sequence-parallel DiT touches, named by their shape letters.

B batch, L tokens, P patch values, F frames, K text tokens, N heads, D head dim, S cached keys.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import PartitionSpec as P

from causal_dit_jax.sharding.mesh import DATA, RING, SEQ_AXES, ULYSSES


@dataclasses.dataclass(frozen=True)
class SequenceParallelSpecs:
    tokens_blp: P = P(DATA, SEQ_AXES, None)  # patch tokens / outputs, sequence split over every seq device
    time_bf: P = P(DATA, None)  # per-frame timesteps
    text_lbknd: P = P(None, DATA, None, None, None)  # text K/V per layer: replicated over the sequence
    # Self-attention cache per layer. All-to-all part: heads split over 'ulysses'; ring part: the
    # cached sequence stays on the ring member that computed it.
    cache_lbsnd: P = P(None, DATA, RING, ULYSSES, None)


SPECS = SequenceParallelSpecs()
