"""All-to-all (Ulysses) exchange: sequence-sharded q/k/v <-> head-sharded, full-sequence q/k/v.

Inside shard_map over the 'ulysses' axis of size U: [B, L, N, D] (L local tokens, all heads) becomes
[B, U*L, N/U, D] (the U shards' tokens in order, N/U heads) and back. q, k and v travel in one
collective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from causal_dit_jax.sharding.mesh import ULYSSES


def seq_to_heads(x: jax.Array, axis: str = ULYSSES) -> jax.Array:
    """[..., L, N, D] sequence-sharded -> [..., U*L, N/U, D] head-sharded (sequence axis -3)."""
    if jax.lax.axis_size(axis) == 1:
        return x
    return jax.lax.all_to_all(x, axis, split_axis=x.ndim - 2, concat_axis=x.ndim - 3, tiled=True)


def heads_to_seq(x: jax.Array, axis: str = ULYSSES) -> jax.Array:
    """Inverse of `seq_to_heads`: [..., U*L, N/U, D] -> [..., L, N, D]."""
    if jax.lax.axis_size(axis) == 1:
        return x
    return jax.lax.all_to_all(x, axis, split_axis=x.ndim - 3, concat_axis=x.ndim - 2, tiled=True)


def check_heads(num_heads: int, ulysses_size: int) -> None:
    if num_heads % ulysses_size:
        raise ValueError(f"{num_heads} heads cannot be split over an all-to-all group of {ulysses_size}")


def qkv_seq_to_heads(q, k, v, axis: str = ULYSSES):
    """One all-to-all for q, k and v together."""
    q, k, v = seq_to_heads(jnp.stack([q, k.astype(q.dtype), v.astype(q.dtype)]), axis)
    return q, k, v
