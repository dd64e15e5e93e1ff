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
    SPEED,
    ClipLabels,
    ProceduralClips,
    draw_frames,
    draw_labels,
    parse_caption,
    render_batch,
    render_clip,
)


def _object(frame: np.ndarray, background: str) -> np.ndarray:
    """[H, W] bool: the pixels that differ from the background."""
    return np.abs(frame.astype(int) - np.asarray(BACKGROUNDS[background])).sum(-1) > 60


def _circular_centre(mask: np.ndarray) -> tuple[float, float]:
    """(y, x) of a mask's centre on the torus (a circular mean per axis)."""
    out = []
    for axis, n in ((0, mask.shape[0]), (1, mask.shape[1])):
        pos = np.nonzero(mask)[axis] + 0.5
        angle = 2 * np.pi * pos / n
        out.append((np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) * n / (2 * np.pi)) % n)
    return tuple(out)


def test_clips_show_their_labels():
    rng = np.random.default_rng(0)
    areas = {}
    for colour, shape, direction in itertools.product(COLOURS, SHAPES, DIRECTIONS):
        labels = ClipLabels(colour, shape, direction, "gray")
        clip = render_clip(labels, 33, 64, 96, rng)
        assert clip.shape == (33, 64, 96, 3) and clip.dtype == np.uint8
        masks = [_object(frame, "gray") for frame in clip]
        sizes = np.array([m.sum() for m in masks])
        assert sizes.min() > 50 and sizes.max() - sizes.min() < 0.1 * sizes.mean()  # whole on the torus, every frame
        inner = clip[0][masks[0]]
        np.testing.assert_allclose(np.median(inner, axis=0), COLOURS[colour], atol=2)
        (y0, x0), (y1, x1) = _circular_centre(masks[0]), _circular_centre(masks[16])
        dx, dy = (x1 - x0 + 48) % 96 - 48, (y1 - y0 + 32) % 64 - 32  # wrapped displacement over 16 frames
        move = {"left": -dx, "right": dx, "up": -dy, "down": dy}
        want = SPEED * (96 if direction in ("left", "right") else 64) * 16  # a quarter of the frame
        assert abs(move[direction] - want) < 1.0 and all(
            abs(v) < 1.0 for d, v in move.items() if d not in (direction, _opposite(direction))
        )
        areas.setdefault(shape, []).append(sizes.mean())
    circle, square, triangle = (np.mean(areas[s]) for s in SHAPES)
    assert square > circle > triangle  # distinguishable by area alone: 3.61 r^2 > pi r^2 > 1.62 r^2


def test_numpy_and_jax_draw_the_same_clips():
    labels, captions = draw_labels(np.random.default_rng(1), 4, 32, 48)
    batch = np.asarray(render_batch(labels, 9, 32, 48))
    assert batch.shape == (4, 9, 32, 48, 3) and len(captions) == 4
    for i, caption in enumerate(captions):
        want = draw_frames(np, *(labels[k][i] for k in ("colour", "shape", "direction", "background", "x0", "y0")), 9, 32, 48)
        np.testing.assert_allclose(batch[i], want / 127.5 - 1.0, atol=1e-4)  # float32 arithmetic in both
        parsed = parse_caption(caption)
        assert list(COLOURS).index(parsed["colour"]) == labels["colour"][i]
        assert list(BACKGROUNDS).index(parsed["background"]) == labels["background"][i]


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
