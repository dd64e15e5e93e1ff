"""Causal-RoPE SP: each shard derives its own token positions; nothing positional crosses devices.

A shard's tokens are the flattened chunk indices [offset, offset + local_len) with
offset = (ring_index * ulysses_size + ulysses_index) * local_len, read from `lax.axis_index`. The core's
`causal_rope_positions` turns them into (global time, row, column) with the chunk's start frame,
inside the one forward (`CausalWanDiT.forward_tokens(token_offset=...)`) both paths run.
"""

from __future__ import annotations

import jax

from causal_dit_jax.sharding.mesh import RING, ULYSSES


def shard_index() -> jax.Array:
    """This device's position along the partitioned sequence (inside shard_map over RING x ULYSSES)."""
    return jax.lax.axis_index(RING) * jax.lax.axis_size(ULYSSES) + jax.lax.axis_index(ULYSSES)


def shard_token_offset(local_len: int) -> jax.Array:
    """Flattened chunk index of this shard's first token."""
    return shard_index() * local_len
