"""Latents <-> tokens and the PyTorch layouts, against torch's own permutes (exact: pure data movement)."""

import jax
import numpy as np
import pytest
import torch

from causal_dit_jax.model.config import get_preset
from causal_dit_jax.model.patchify import (
    from_torch_layout,
    latents_to_tokens,
    patchify,
    to_torch_layout,
    tokens_to_latents,
    unpatchify,
)

# torch layout -> the permutation of its last four axes that gives channels-last (f, h, w, c)
TO_CHANNELS_LAST = {"bfchw": (0, 2, 3, 1), "bcfhw": (1, 2, 3, 0)}


@pytest.mark.parametrize("layout", sorted(TO_CHANNELS_LAST))
@pytest.mark.parametrize("lead", [(), (2,), (3, 2, 1)])  # no batch, a batch, steps x chunks x batch
def test_torch_layouts_for_any_leading_axes(layout, lead):
    x = torch.randn(*lead, 3, 5, 4, 6)
    k = len(lead)
    expected = x.permute(*range(k), *(k + a for a in TO_CHANNELS_LAST[layout])).numpy()
    ours = from_torch_layout(x.numpy(), layout)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(to_torch_layout(ours, layout), x.numpy())


def test_bad_layouts_are_named():
    with pytest.raises(ValueError, match="unknown layout 'bhwc'"):
        from_torch_layout(np.zeros((1, 2, 3, 4, 5)), "bhwc")
    with pytest.raises(ValueError, match="at least 4 axes"):
        to_torch_layout(np.zeros((2, 3, 4)), "bcfhw")


def test_tokens_round_trip_and_order():
    cfg = get_preset("tiny")
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 6, cfg.in_dim))
    tokens, grid = latents_to_tokens(cfg, x, np.zeros((2, 3)))
    assert grid == (3, 2, 3) and tokens.shape == (2, 18, 4 * cfg.in_dim)
    # token (frame 1, row 1, col 2) holds the 2x2 patch at latent rows 2-3, columns 4-5, channels fastest
    np.testing.assert_array_equal(tokens[:, 1 * 6 + 1 * 3 + 2], x[:, 1, 2:4, 4:6].reshape(2, -1))
    np.testing.assert_array_equal(tokens_to_latents(cfg, tokens, grid), x)
    np.testing.assert_array_equal(unpatchify(patchify(x, cfg.patch_size), *grid, cfg.patch_size), x)


def test_chunk_inputs_are_checked():
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="16 channels"):
        latents_to_tokens(cfg, np.zeros((1, 3, 4, 6, 8)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="timesteps must be"):
        latents_to_tokens(cfg, np.zeros((1, 3, 4, 6, 16)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="not divisible by the patch"):
        latents_to_tokens(cfg, np.zeros((1, 3, 5, 6, 16)), np.zeros((1, 3)))
