"""Causal-RoPE: tables, positions and rotation against the PyTorch reference's complex128 math."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_reference.causal_wan import causal_rope_apply, rope_table

from causal_dit_jax.model.config import get_preset
from causal_dit_jax.model.rope import apply_rope, causal_rope_positions, rope_cos_sin, rope_tables

CFG = get_preset("wan2.1-t2v-1.3b")


def test_split_and_tables_match_wan():
    assert CFG.rope_split == (22, 21, 21)
    tabs = rope_tables(CFG, 1024, 30, 52)
    ref = rope_table(CFG.head_dim).numpy()  # [1024, 64] complex128 = concat(t 22, h 21, w 21)
    np.testing.assert_allclose(np.asarray(tabs.cos_t), ref[:, :22].real, atol=1e-6)
    np.testing.assert_allclose(np.asarray(tabs.sin_h), ref[:30, 22:43].imag, atol=1e-6)
    np.testing.assert_allclose(np.asarray(tabs.cos_w), ref[:52, 43:].real, atol=1e-6)


def test_no_1024_frame_cap():
    tabs = rope_tables(CFG, 5000, 30, 52)
    t, r, c = causal_rope_positions(jnp.arange(3 * 1560), 30, 52, 4000)
    cos, _ = rope_cos_sin(tabs, t, r, c)
    angle = 4001 * 10000.0 ** (-1 / 22)  # frame 4001, second time pair
    assert abs(float(cos[1560, 1]) - np.cos(angle)) < 1e-6


@pytest.mark.parametrize("start", [0, 3, 17])
def test_positions_are_frame_major(start):
    t, r, c = (np.asarray(a) for a in causal_rope_positions(jnp.arange(2 * 4 * 6), 4, 6, start))
    want = [(start + f, h, w) for f in range(2) for h in range(4) for w in range(6)]
    assert list(zip(t.tolist(), r.tolist(), c.tolist())) == want


@pytest.mark.parametrize("start", [0, 9])
def test_apply_rope_matches_reference(start):
    cfg = get_preset("tiny")  # head_dim 16: split 4/2/2 pairs
    grid = (3, 4, 6)
    rng = np.random.default_rng(start)
    x = rng.standard_normal((2, 72, cfg.num_heads, cfg.head_dim)).astype(np.float32)
    ref = causal_rope_apply(torch.from_numpy(x), grid, rope_table(cfg.head_dim), start_frame=start).numpy()
    tabs = rope_tables(cfg, start + 3, 4, 6)
    cos, sin = rope_cos_sin(tabs, *causal_rope_positions(jnp.arange(72), 4, 6, start))
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), cos, sin)), ref, atol=2e-6)
