"""Ulysses (all-to-all) attention for training's whole-sequence forward on a ('data', 'seq') mesh.

Training runs the DiT over a whole sequence under GSPMD (Auto axes, `train.trainer.train_mesh`): the
tokens [B, L, C] are split over 'data' x 'seq' and XLA partitions every block along them. Attention is
the one place where a query needs every key; `ulysses_sequence_attention` runs it under
`jax.shard_map` instead of letting XLA gather the keys and values:

    q, k, v  [B/data, L/seq, N, D]      each device: its tokens, every head
      -> all-to-all (one, q k v stacked)
             [B/data, L, N/seq, D]      the whole sequence, a slice of the heads
      -> the full-sequence attention (e.g. a block-attention plan), locally
      -> all-to-all back
    out      [B/data, L/seq, N, D]

all_to_all is linear, so the backward pass is the same two exchanges transposed. The split is checked
before any work: heads and tokens divisible by the 'seq' size, the batch by the 'data' size.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from causal_dit_jax.sharding.mesh import DATA
from causal_dit_jax.sharding.ulysses import heads_to_seq, qkv_seq_to_heads

SEQ = "seq"  # the training mesh's sequence axis

FullAttention = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # q, k, v [B, L, N, D] -> [B, L, N, D]


def sequence_size(mesh: Mesh | None) -> int:
    """Devices along `mesh`'s 'seq' axis (1 without a mesh or without that axis)."""
    return mesh.shape[SEQ] if mesh is not None and SEQ in mesh.axis_names else 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_sequence_split(mesh: Mesh, num_heads: int, num_tokens: int | None = None, batch: int | None = None) -> None:
    """Raise a ValueError unless the heads (and, when given, the tokens and the batch) split over the mesh."""
    s = sequence_size(mesh)
    if num_heads % s:
        raise ValueError(
            f"Ulysses attention over the {SEQ!r} axis of {s} devices needs the {num_heads} heads divisible by {s}; "
            f"'seq' sizes that divide them: {_divisors(num_heads)}"
        )
    if num_tokens is not None and num_tokens % s:
        raise ValueError(
            f"the sequence's {num_tokens} tokens do not split over the {SEQ!r} axis of {s} devices; "
            f"'seq' sizes that divide them: {_divisors(num_tokens)} (or change the frames or latent size)"
        )
    data = mesh.shape[DATA] if DATA in mesh.axis_names else 1
    if batch is not None and batch % data:
        raise ValueError(f"batch {batch} does not split over the {DATA!r} axis of {data} devices")


def ulysses_sequence_attention(attention: FullAttention, mesh: Mesh) -> FullAttention:
    """`attention` over the whole sequence, run per device on N/seq heads between two all-to-alls.

    q, k, v [B, L, N, D] (global shapes inside jit; XLA lays them out as [B/data, L/seq, N, D]) ->
    [B, L, N, D] split the same way. A mesh without a 'seq' axis, or with seq = 1, returns `attention`.
    """
    if sequence_size(mesh) == 1:
        return attention
    spec = P(DATA if DATA in mesh.axis_names else None, SEQ, None, None)  # b l n d

    def shard(q, k, v):
        q, k, v = qkv_seq_to_heads(q, k, v, SEQ)  # b (l/s) n d -> b l (n/s) d
        return heads_to_seq(attention(q, k, v), SEQ)  # b l (n/s) d -> b (l/s) n d

    sharded = jax.shard_map(shard, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)

    def fn(q, k, v):
        b, length, heads, _ = q.shape
        check_sequence_split(mesh, heads, length, b)
        return sharded(q, k, v)

    return fn


__all__ = ["SEQ", "check_sequence_split", "sequence_size", "ulysses_sequence_attention"]
