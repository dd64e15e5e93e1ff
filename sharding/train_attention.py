"""Ulysses (all-to-all) and ring attention for training's whole-sequence forward on a ('data', 'seq') mesh.

Training runs the DiT over a whole sequence under GSPMD (Auto axes, `train.trainer.train_mesh`): the
tokens [B, L, C] are split over 'data' x 'seq' and XLA partitions every block along them. Attention is
the one place where a query needs every key; `ulysses_sequence_attention` runs it under
`jax.shard_map` instead of letting XLA gather the keys and values, in one of two ways. Ulysses
(`ulysses_sequence_attention`, the heads divisible by the 'seq' size):

    q, k, v  [B/data, L/seq, N, D]      each device: its tokens, every head
      -> all-to-all (one, q k v stacked)
             [B/data, L, N/seq, D]      the whole sequence, a slice of the heads
      -> the full-sequence attention (e.g. a block-attention plan), locally
      -> all-to-all back
    out      [B/data, L/seq, N, D]

all_to_all is linear, so the backward pass is the same two exchanges transposed. Ring
(`ring_sequence_attention`, any number of heads, a per-frame mask):

    q, k, v  [B/data, L/seq, N, D]      each device: its tokens, every head; the queries stay
      -> seq hops: attend the local queries to the K/V block held (masked per token by its frame),
         merge into a float32 running (out, log-sum-exp), pass the block on by ppermute (seq - 1 hops)
    out      [B/data, L/seq, N, D]

The split is checked before any work: tokens divisible by the 'seq' size, the batch by the 'data'
size, and for Ulysses the heads by the 'seq' size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from causal_dit_jax.sharding.mesh import DATA
from causal_dit_jax.sharding.ring import merge_partials
from causal_dit_jax.sharding.ulysses import heads_to_seq, qkv_seq_to_heads

SEQ = "seq"  # the training mesh's sequence axis

FullAttention = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # q, k, v [B, L, N, D] -> [B, L, N, D]


def sequence_size(mesh: Mesh | None) -> int:
    """Devices along `mesh`'s 'seq' axis (1 without a mesh or without that axis)."""
    return mesh.shape[SEQ] if mesh is not None and SEQ in mesh.axis_names else 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_sequence_split(
    mesh: Mesh, num_heads: int | None = None, num_tokens: int | None = None, batch: int | None = None
) -> None:
    """Raise a ValueError unless what is given splits over the mesh: the heads over 'seq' (Ulysses
    attention; ring attention takes any number), the tokens over 'seq', the batch over 'data'."""
    s = sequence_size(mesh)
    if num_heads is not None and num_heads % s:
        raise ValueError(
            f"Ulysses attention over the {SEQ!r} axis of {s} devices needs the {num_heads} heads divisible by {s}; "
            f"'seq' sizes that divide them: {_divisors(num_heads)} (ring attention takes any number of heads)"
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


def _token_frames(first_token: jax.Array | int, count: int, tokens_per_frame: int) -> jax.Array:
    """[count] int32: the frame of each of the tokens first_token .. first_token + count - 1."""
    return (jnp.asarray(first_token, jnp.int32) + jnp.arange(count, dtype=jnp.int32)) // tokens_per_frame


def member_visibility(frame_mask: np.ndarray, tokens_per_frame: int, ring: int, local: int) -> np.ndarray:
    """[ring, ring] bool (static): some query token of member i may attend some key token of member j,
    member r holding tokens [r * local, (r + 1) * local). A False pair's hop is skipped."""
    first = np.arange(ring) * local // tokens_per_frame  # the frames member r's tokens span
    last = ((np.arange(ring) + 1) * local - 1) // tokens_per_frame
    return np.array(
        [[frame_mask[first[i] : last[i] + 1, first[j] : last[j] + 1].any() for j in range(ring)] for i in range(ring)]
    )


def masked_partial_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention of q [B, Lq, N, D] over k/v [B, Lk, N, D] under mask [Lq, Lk] bool -> out [B, Lq, N, D]
    float32 and lse [B, N, Lq] float32 (-inf for a query that sees no key here; its out is 0).

    Float32 math. Masked logits are floored at a finite value and their weights set to 0 (not -inf
    logits), so no inf or NaN reaches the gradient for any mask, fully masked rows included."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqnd,bknd->bnqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)  # b n q k; mask [q, k] broadcasts
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # b n q 1: out and lse do not depend on it
    probs = jnp.where(mask, jnp.exp(logits - top), 0.0)  # b n q k, unnormalised
    total = jnp.sum(probs, axis=-1)  # b n q
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    out = jnp.einsum("bnqk,bknd->bqnd", probs / total[..., None], v.astype(jnp.float32))  # b q n d
    lse = jnp.where(seen, top[..., 0] + jnp.log(total), -jnp.inf)  # b n q
    return out, lse


def _ring_member(q, k, v, *, frame_mask: np.ndarray, tokens_per_frame: int, axis: str | None) -> jax.Array:
    """One member's ring attention (inside shard_map over `axis`, or alone for a ring of one):
    q, k, v [B, Lloc, N, D], its tokens [me * Lloc, (me + 1) * Lloc) of the sequence -> [B, Lloc, N, D]."""
    ring = jax.lax.axis_size(axis) if axis is not None else 1
    me = jax.lax.axis_index(axis) if axis is not None else 0
    local, t = q.shape[1], tokens_per_frame
    sees = jnp.asarray(frame_mask)[_token_frames(me * local, local, t)]  # [Lloc, F]: what each query token's frame sees
    visible = jnp.asarray(member_visibility(frame_mask, t, ring, local))  # [ring, ring]
    partial = jax.checkpoint(masked_partial_attention)  # the backward recomputes a hop's logits, none are stored

    def attend(acc, block, owner):  # merge the queries' attention over member `owner`'s K/V block into acc
        mask = sees[:, _token_frames(owner * local, local, t)]  # [Lloc, F] -> [Lloc (queries), Lloc (keys)]
        return merge_partials(*acc, *partial(q, *block, mask))  # out b q n d, lse b n q

    def skip(acc, block, owner):
        return acc

    block = (k, v)  # at hop i: member (me - i)'s keys and values
    acc = partial(q, k, v, sees[:, _token_frames(me * local, local, t)])  # my queries on my own keys
    perm = [(i, (i + 1) % ring) for i in range(ring)]
    for hop in range(1, ring):
        block = jax.lax.ppermute(block, axis, perm)
        owner = (me - hop) % ring
        acc = jax.lax.cond(visible[me, owner], attend, skip, acc, block, owner)
    return acc[0].astype(q.dtype)


def ring_sequence_attention(frame_mask: np.ndarray, tokens_per_frame: int, mesh: Mesh | None) -> FullAttention:
    """Attention over the whole sequence under a per-frame mask, as ring attention over 'seq'.

    frame_mask: [F, F] bool (static; `BlockAttentionPlan.frame_mask()`): a query token of frame i
    attends a key token of frame j iff frame_mask[i, j]; every frame must attend some frame. The
    sequence is F * tokens_per_frame tokens. q, k, v [B, L, N, D] (global shapes inside jit; XLA lays
    them out as [B/data, L/seq, N, D]) -> [B, L, N, D] in q's dtype, split the same way; any number
    of heads. K/V blocks [B/data, L/seq, N, D] travel around the ring; a hop whose blocks share no
    visible pair is skipped. Without a 'seq' axis (or seq = 1) the same masked attention runs locally.
    """
    frame_mask = np.asarray(frame_mask, bool)
    if frame_mask.ndim != 2 or frame_mask.shape[0] != frame_mask.shape[1]:
        raise ValueError(f"the frame mask must be [F, F], got shape {frame_mask.shape}")
    if not frame_mask.any(axis=1).all():
        raise ValueError(f"query frames {np.flatnonzero(~frame_mask.any(axis=1)).tolist()} attend no key frame")
    if tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame must be >= 1, got {tokens_per_frame}")
    member = functools.partial(_ring_member, frame_mask=frame_mask, tokens_per_frame=tokens_per_frame)
    length = frame_mask.shape[0] * tokens_per_frame
    if sequence_size(mesh) == 1:
        sharded = functools.partial(member, axis=None)
    else:
        spec = P(DATA if DATA in mesh.axis_names else None, SEQ, None, None)  # b l n d
        sharded = jax.shard_map(functools.partial(member, axis=SEQ), mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)

    def fn(q, k, v):
        b, tokens = q.shape[:2]
        if tokens != length or k.shape[1] != length or v.shape[1] != length:
            raise ValueError(f"q/k/v of {tokens}/{k.shape[1]}/{v.shape[1]} tokens; the mask's sequence has {length}")
        if sequence_size(mesh) > 1:
            check_sequence_split(mesh, None, tokens, b)
        return sharded(q, k, v)

    return fn


__all__ = [
    "SEQ",
    "check_sequence_split",
    "masked_partial_attention",
    "member_visibility",
    "ring_sequence_attention",
    "sequence_size",
    "ulysses_sequence_attention",
]
