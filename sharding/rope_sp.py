"""Causal-RoPE SP: each shard derives its own token positions; nothing positional crosses devices.

A shard's tokens are the flattened chunk indices [offset, offset + local_len) with
offset = (ring_index * ulysses_size + ulysses_index) * local_len, read from `lax.axis_index`. The core's
`causal_rope_positions` turns them into (global time, row, column) with the chunk's start frame.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from causal_dit_jax.model.rope import causal_rope_positions
from causal_dit_jax.sharding.mesh import RING, ULYSSES


def shard_index() -> jax.Array:
    """This device's position along the partitioned sequence (inside shard_map over RING x ULYSSES)."""
    return jax.lax.axis_index(RING) * jax.lax.axis_size(ULYSSES) + jax.lax.axis_index(ULYSSES)


def shard_token_offset(local_len: int) -> jax.Array:
    """Flattened chunk index of this shard's first token."""
    return shard_index() * local_len


def shard_positions(local_len: int, grid_h: int, grid_w: int, start_frame) -> tuple[jax.Array, ...]:
    """(time, row, column) of this shard's tokens, computed locally (padding tokens run past the grid)."""
    index = shard_token_offset(local_len) + jnp.arange(local_len, dtype=jnp.int32)
    return causal_rope_positions(index, grid_h, grid_w, start_frame)
