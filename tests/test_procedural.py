"""The procedural world: seeded clips, what they show (the colour, the shape's area, the direction of
motion, read off the pixels), captions that parse back to their labels, and the source in the grain
pipeline."""

import itertools

import numpy as np
import pytest

from causal_dit_jax.train.data import iterate, make_dataset
from causal_dit_jax.train.procedural import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    ClipLabels,
    ProceduralClips,
    parse_caption,
    render_clip,
)


def _object(frame: np.ndarray, background: str) -> np.ndarray:
    """[H, W] bool: the pixels that differ from the background."""
    return np.abs(frame.astype(int) - np.asarray(BACKGROUNDS[background])).sum(-1) > 60


def test_clips_show_their_labels():
    rng = np.random.default_rng(0)
    areas = {}
    for colour, shape, direction in itertools.product(COLOURS, SHAPES, DIRECTIONS):
        labels = ClipLabels(colour, shape, direction, "gray")
        clip = render_clip(labels, 9, 64, 96, rng)
        assert clip.shape == (9, 64, 96, 3) and clip.dtype == np.uint8
        first, last = _object(clip[0], "gray"), _object(clip[-1], "gray")
        assert first.sum() > 50 and abs(int(first.sum()) - int(last.sum())) < 0.1 * first.sum()  # stays in view
        ys, xs = np.nonzero(first)
        inner = clip[0][first]
        np.testing.assert_allclose(np.median(inner, axis=0), COLOURS[colour], atol=2)
        (y0, x0), (y1, x1) = np.argwhere(first).mean(0), np.argwhere(last).mean(0)
        move = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
        assert move[direction] > 20 and all(abs(v) < 3 for d, v in move.items() if d not in (direction, _opposite(direction)))
        areas.setdefault(shape, []).append(first.sum())
    circle, square, triangle = (np.mean(areas[s]) for s in SHAPES)
    assert square > circle > triangle  # distinguishable by area alone: 3.61 r^2 > pi r^2 > 1.62 r^2


def _opposite(d: str) -> str:
    return {"left": "right", "right": "left", "up": "down", "down": "up"}[d]


def test_captions_parse_back():
    for colour, shape, direction, background in itertools.product(COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS):
        labels = ClipLabels(colour, shape, direction, background)
        want = {"colour": colour, "shape": shape, "direction": direction, "background": background}
        assert parse_caption(labels.caption()) == want
        assert parse_caption(labels.caption(np.random.default_rng(len(colour) + len(shape)))) == want
    assert parse_caption("A RED BALL going left, on a grey background") == {
        "colour": "red",
        "shape": "circle",
        "direction": "left",
        "background": "gray",
    }
    assert parse_caption("a shiny blue zeppelin") == {"colour": "blue", "shape": None, "direction": None, "background": "black"}
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        ClipLabels("pink", "circle", "left")


def test_source_is_seeded_and_feeds_the_pipeline():
    src = ProceduralClips(12, 5, 32, 48, seed=3)
    a, b = src[4], ProceduralClips(12, 5, 32, 48, seed=3)[4]
    np.testing.assert_array_equal(a["frames"], b["frames"])
    assert a["caption"] == b["caption"]
    assert not np.array_equal(ProceduralClips(12, 5, 32, 48, seed=4)[4]["frames"], a["frames"])
    labels = {k: a[k] for k in ("colour", "shape", "direction", "background")}
    parsed = parse_caption(a["caption"])
    assert list(COLOURS).index(parsed["colour"]) == labels["colour"] and SHAPES.index(parsed["shape"]) == labels["shape"]
    seen = {tuple(src.labels(i).__dict__.values()) for i in range(12)}
    assert len(seen) > 6  # varied
    it = iterate(make_dataset(src, 4, seed=0))
    batch = next(it)
    assert batch["frames"].shape == (4, 5, 32, 48, 3) and len(batch["caption"]) == 4
    with pytest.raises(IndexError):
        src[12]
    with pytest.raises(ValueError, match="unknown backgrounds"):
        ProceduralClips(4, 5, 32, 48, backgrounds=("pink",))
