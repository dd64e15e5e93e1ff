"""Attention over a whole training sequence under a block mask, as a static plan of dense attentions.

Training runs the causal DiT over all frames at once (no KV cache), so attention needs Self-Forcing's
masks: block-causal (diffusion forcing: block i sees blocks 0..i), teacher forcing's [clean | noisy]
sequence (a clean block sees clean blocks up to itself, a noisy block the clean blocks before it and
itself), or none at all (a bidirectional teacher: the whole clip is one block). Every such mask is,
per query block, a few contiguous ranges of key frames; the plan lists them, built once per shape in
Python (no per-step host work, nothing traced). Each query block then runs one dense attention over
its gathered keys with the backend's fast kernel (cuDNN on GPUs): no [L, L] mask is ever built, and
the masked-out blocks cost no FLOPs. Over a mesh's 'seq' axis the plan runs as Ulysses attention, or
as ring attention under its per-frame mask when the heads do not divide by the 'seq' size
(`make_block_attention`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from causal_dit_jax.model.attention import dot_product_attention
from causal_dit_jax.sharding.train_attention import ring_sequence_attention, sequence_size, ulysses_sequence_attention

Ranges = tuple[tuple[int, int], ...]  # [start, end) in frames
SEQUENCE_ATTENTION = ("auto", "ulysses", "ring")  # how a plan runs over a 'seq' axis


@dataclasses.dataclass(frozen=True)
class BlockAttentionPlan:
    """query_blocks[i] = (start, end): the query frames of block i; key_ranges[i]: the key frame
    ranges it attends. The query blocks tile the sequence's `num_frames` frames in order."""

    num_frames: int
    query_blocks: tuple[tuple[int, int], ...]
    key_ranges: tuple[Ranges, ...]

    def __post_init__(self):
        edges = [s for s, _ in self.query_blocks] + [self.query_blocks[-1][1]]
        if edges[0] != 0 or edges[-1] != self.num_frames or any(a >= b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"query blocks {self.query_blocks} do not tile {self.num_frames} frames")
        if len(self.key_ranges) != len(self.query_blocks):
            raise ValueError("one tuple of key ranges per query block")
        for ranges in self.key_ranges:
            if not ranges or any(not 0 <= a < b <= self.num_frames for a, b in ranges):
                raise ValueError(f"key ranges {ranges} must be non-empty [start, end) within {self.num_frames} frames")

    def frame_mask(self) -> np.ndarray:
        """[num_frames, num_frames] bool: query frame i attends key frame j (for tests and plots)."""
        mask = np.zeros((self.num_frames, self.num_frames), bool)
        for (qs, qe), ranges in zip(self.query_blocks, self.key_ranges):
            for ks, ke in ranges:
                mask[qs:qe, ks:ke] = True
        return mask


def _blocks(num_frames: int, block: int) -> list[tuple[int, int]]:
    if block < 1 or num_frames < 1 or num_frames % block:
        raise ValueError(f"{num_frames} frames are not whole blocks of {block}")
    return [(s, s + block) for s in range(0, num_frames, block)]


def check_window(block: int, window: int, sink: int) -> None:
    """A rolling view's sizes, in frames, as `InferenceConfig` takes them: window -1 (everything) or a
    window whose non-sink part holds a whole block; a sink only inside a window."""
    if sink < 0 or (window == -1 and sink) or (window != -1 and window - sink < block):
        raise ValueError(
            f"window={window} with sink={sink} frames: the window minus the sink must hold a block of {block} "
            "frames (window -1 attends everything, with no sink)"
        )


def context_ranges(end: int, window: int = -1, sink: int = 0) -> Ranges:
    """The frames [0, end) that a block ending at frame `end` attends under a rolling view: all of them
    (window -1), else the first `sink` frames and the last `window - sink` (Self-Forcing's eviction: a
    frame f is kept iff f < sink or f >= end - (window - sink))."""
    first = 0 if window == -1 else max(end - (window - sink), 0)
    if first <= sink:
        return ((0, end),)
    return (((0, sink),) if sink else ()) + ((first, end),)


def block_causal_plan(num_frames: int, block: int = 3, window: int = -1, sink: int = 0) -> BlockAttentionPlan:
    """Diffusion forcing: block i attends blocks 0..i (bidirectional inside a block); with a window
    (frames, -1: none) and a sink, only the frames the rolling KV cache would hold (`context_ranges`)."""
    check_window(block, window, sink)
    qb = _blocks(num_frames, block)
    return BlockAttentionPlan(num_frames, tuple(qb), tuple(context_ranges(e, window, sink) for _, e in qb))


def teacher_forcing_plan(num_frames: int, block: int = 3, window: int = -1, sink: int = 0) -> BlockAttentionPlan:
    """The sequence [clean (F frames) | noisy (F frames)]: clean block i attends clean frames [0, end_i);
    noisy block i attends clean frames [0, start_i) and its own noisy frames. With a window (frames,
    -1: none) and a sink, each block attends what the rolling KV cache holds at inference
    (`context_ranges`): the sink and the latest window - sink frames up to its end, its own frames
    noisy for a noisy block."""
    check_window(block, window, sink)
    f = num_frames
    qb = _blocks(f, block)
    clean = [context_ranges(e, window, sink) for _, e in qb]
    noisy = []
    for s, e in qb:
        before = tuple((a, min(b, s)) for a, b in context_ranges(e, window, sink) if a < s)  # the clean context
        noisy.append(before + ((f + s, f + e),))
    return BlockAttentionPlan(2 * f, tuple(qb) + tuple((f + s, f + e) for s, e in qb), tuple(clean + noisy))


def bidirectional_plan(num_frames: int) -> BlockAttentionPlan:
    """The whole clip as one block (Wan's base model, Self-Forcing's teacher and critic)."""
    return BlockAttentionPlan(num_frames, ((0, num_frames),), (((0, num_frames),),))


def make_block_attention(
    plan: BlockAttentionPlan,
    tokens_per_frame: int,
    implementation: str | None = None,
    mesh: Mesh | None = None,
    sequence_attention: str = "auto",
):
    """A `SelfAttentionFn` for `CausalWanDiT.forward_tokens` (no cache): q, k, v [B, L, N, D] with
    L = plan.num_frames * tokens_per_frame -> [B, L, N, D], one dense attention per query block.

    mesh: a training mesh (`train_mesh`); with a 'seq' axis of size > 1 the tokens stay split over
    'seq' through the attention too (`sharding.train_attention`), as `sequence_attention` says:
    'ulysses': two all-to-alls, each device running the plan over the whole sequence for N/seq heads
    (the heads must divide by seq); 'ring': the K/V blocks travel around the 'seq' ring under the
    plan's per-frame mask, any number of heads (float32 einsum attention: `implementation` is not
    read); 'auto' (default): Ulysses when the heads divide by seq, else ring."""
    if sequence_attention not in SEQUENCE_ATTENTION:
        raise ValueError(f"unknown sequence_attention {sequence_attention!r}; expected one of {SEQUENCE_ATTENTION}")
    t = tokens_per_frame

    def dense(q, k, v):  # the whole sequence, any number of heads
        outs = []
        for (qs, qe), ranges in zip(plan.query_blocks, plan.key_ranges):
            kk = jnp.concatenate([k[:, a * t : b * t] for a, b in ranges], axis=1)  # b s n d
            vv = jnp.concatenate([v[:, a * t : b * t] for a, b in ranges], axis=1)
            outs.append(dot_product_attention(q[:, qs * t : qe * t], kk, vv, implementation=implementation))
        return jnp.concatenate(outs, axis=1)

    seq = sequence_size(mesh)
    if seq == 1:
        attention = dense
    else:
        ulysses = ulysses_sequence_attention(dense, mesh)  # checks the heads, tokens and batch split
        ring = ring_sequence_attention(plan.frame_mask(), t, mesh)  # checks the tokens and batch split

        def attention(q, k, v):  # the head count is known here
            heads = q.shape[2]
            use_ring = sequence_attention == "ring" or (sequence_attention == "auto" and heads % seq)
            return ring(q, k, v) if use_ring else ulysses(q, k, v)

    def fn(q, k, v, layer_cache=None, write=None):
        if layer_cache is not None:
            raise ValueError("block attention runs over a whole sequence, without a KV cache")
        if q.shape[1] != plan.num_frames * t:
            raise ValueError(f"{q.shape[1]} tokens, the plan has {plan.num_frames} frames of {t}")
        return attention(q, k, v), None

    return fn


def attended_pairs(plan: BlockAttentionPlan, tokens_per_frame: int) -> int:
    """Query-key token pairs the plan computes (its attention FLOPs are 4 D N times this)."""
    t = tokens_per_frame
    return sum((qe - qs) * t * sum((b - a) * t for a, b in r) for (qs, qe), r in zip(plan.query_blocks, plan.key_ranges))


__all__ = [
    "SEQUENCE_ATTENTION",
    "BlockAttentionPlan",
    "attended_pairs",
    "bidirectional_plan",
    "block_causal_plan",
    "check_window",
    "context_ranges",
    "make_block_attention",
    "teacher_forcing_plan",
]
