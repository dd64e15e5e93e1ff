"""Causal-RoPE with a global time index: precomputed cos/sin tables, token positions, rotation.

Wan's 3D RoPE splits a head's `head_dim/2` complex pairs into (time, row, column) groups
(22/21/21 for head_dim 128). Pairs are interleaved: (x[2j], x[2j+1]) = (re, im). A token's angles
are concat(time_angles[start_frame + frame], row_angles[row], col_angles[col]).

The tables are computed once, on the host in float64 (as PyTorch does in complex128), and stored as
float32 cos/sin. `causal_rope_positions` is the one place a flattened token index becomes a
(time, row, column) position; sequence parallelism calls it with its shard's token offset.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.model.config import ModelConfig

ROPE_THETA = 10000.0


class RopeTables(NamedTuple):
    """cos/sin of the rotation angles per axis: time [T, Pt], rows [H, Ph], columns [W, Pw] (float32)."""

    cos_t: jax.Array
    sin_t: jax.Array
    cos_h: jax.Array
    sin_h: jax.Array
    cos_w: jax.Array
    sin_w: jax.Array

    @property
    def max_frames(self) -> int:
        return self.cos_t.shape[0]


def _axis_angles(length: int, pairs: int) -> np.ndarray:
    """angles[p, j] = p * theta^(-j/pairs) in float64 (Wan's rope_params(length, 2*pairs))."""
    inv_freq = 1.0 / np.power(ROPE_THETA, np.arange(pairs, dtype=np.float64) / pairs)
    return np.outer(np.arange(length, dtype=np.float64), inv_freq)


def rope_tables(config: ModelConfig, max_frames: int, grid_h: int, grid_w: int) -> RopeTables:
    """Precompute the tables for time positions [0, max_frames) and a (grid_h, grid_w) token grid.

    There is no fixed cap on the time axis (PyTorch's table stops at 1024 frames): size it to the
    last global frame a stream will reach.
    """
    if max_frames <= 0 or grid_h <= 0 or grid_w <= 0:
        raise ValueError(f"rope_tables needs positive sizes, got frames={max_frames} grid={grid_h}x{grid_w}")
    pt, ph, pw = config.rope_split
    out = []
    for length, pairs in ((max_frames, pt), (grid_h, ph), (grid_w, pw)):
        ang = _axis_angles(length, pairs)
        out += [jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)]
    return RopeTables(*out)


def causal_rope_positions(
    token_index: jax.Array, grid_h: int, grid_w: int, start_frame: jax.Array | int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(time, row, column) of flattened chunk tokens, order frame-major then row then column.

    token_index: [L] int indices into the chunk's flattened (frame, row, col) sequence; a shard passes
    `shard_offset + arange(local_len)`. start_frame: global latent-frame index of the chunk's first
    frame (the global time index). Returns three int32 [L] arrays.
    """
    token_index = jnp.asarray(token_index, jnp.int32)
    per_frame = grid_h * grid_w
    frame = token_index // per_frame
    row = (token_index // grid_w) % grid_h
    col = token_index % grid_w
    return frame + jnp.asarray(start_frame, jnp.int32), row, col


def rope_cos_sin(tables: RopeTables, time: jax.Array, row: jax.Array, col: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gather each token's rows of the tables: cos, sin [L, head_dim/2] (float32).

    Indices past a table's end (padding tokens) are clipped; those tokens are masked elsewhere.
    """

    def take(tab, idx):
        return jnp.take(tab, idx, axis=0, mode="clip")

    cos = jnp.concatenate([take(tables.cos_t, time), take(tables.cos_h, row), take(tables.cos_w, col)], -1)
    sin = jnp.concatenate([take(tables.sin_t, time), take(tables.sin_h, row), take(tables.sin_w, col)], -1)
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of x [B, L, N, D] by angles with cos/sin [L, D/2]; float32 math."""
    b, l, n, d = x.shape
    xf = x.astype(jnp.float32).reshape(b, l, n, d // 2, 2)  # b l n (p two) -> b l n p two
    re, im = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return out.reshape(b, l, n, d).astype(x.dtype)
