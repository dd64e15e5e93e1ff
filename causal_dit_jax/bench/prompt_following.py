"""Prompt following of generated videos, scored in the procedural world (`train/procedural.py`).

A prompt names a colour, a shape, a direction and a background (`a red circle moving left on a gray
background`); `read_clip` reads those four back off the pixels of a video, and `evaluate` scores a
generator (any callable, `pipeline_generate` makes one from a `TextToVideoPipeline`) on balanced
`prompt_pairs`: the fraction of videos that show each named attribute, and all four at once.

How a clip is read (the frame is a torus, as in the world: the object may straddle the edges):
- background: the nearest of BACKGROUNDS to the clip's per-channel median (the object covers well
  under a fifth of the frame), if most pixels lie near it (a noise-like video has no background);
- object: per frame, the pixels (box-blurred 3x3, which averages noise away) whose distance from the
  clip's median colour is over half the object's contrast, then the largest connected component on
  the torus (stray blobs dropped), if it holds most of them (scattered noise is no object);
- colour: the nearest of COLOURS to the median colour of the objects' interiors (eroded by a pixel);
- shape: the fill ratio of the object in its bounding box, taken with the object rolled to the frame's
  centre (triangle ~0.5, circle ~0.785, square ~1.0; cut at FILL_THRESHOLDS), median over frames;
- direction: the median per-frame velocity of the object's circular centre (displacements wrapped on
  the torus), its dominant axis and sign; None when slower than a fifth of the world's speed.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from causal_dit_jax.train.procedural import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SPEED,
    ClipLabels,
    parse_caption,
    render_clip,
)

ATTRIBUTES = ("colour", "shape", "direction", "background")
# Shape cuts of the fill ratio: triangle < 0.66 < circle < 0.86 < square (ideal 0.5, 0.785, 1.0). Blur rounds
# corners, raising a triangle's ratio and lowering a square's while a circle's stays, so both cuts sit
# above the midpoints: a square reads as one until its corners round to 0.4 of its side.
FILL_THRESHOLDS = (0.66, 0.86)
MIN_CONTRAST = 40.0  # an object differs from the background by at least this (RGB distance, 0..441)
MIN_AREA = 0.002  # of the frame: smaller components are no object
MIN_PLAIN = 0.75  # of the pixels within MIN_CONTRAST of the median colour: fewer, no plain background
MIN_COMPACT = 0.5  # of a frame's object pixels in its largest component: less is scattered noise
MIN_SPEED = 0.2  # of the world's SPEED: slower objects have no direction

Generate = Callable[[list[str], int, int, int, int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PromptPair:
    """One prompt to generate from, the seed to generate it with, and the labels it names."""

    prompt: str
    seed: int
    labels: ClipLabels


# ---------------------------------------------------------------------------------------- reading
def _nearest(colour: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    """The name in `table` whose RGB is nearest (Euclidean) to colour [3]."""
    names = list(table)
    d = np.linalg.norm(np.asarray(list(table.values()), np.float32) - colour, axis=-1)
    return names[int(np.argmin(d))]


def distances(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """float32 [F, H, W]: the RGB distance of frames [F, H, W, 3] from background [3], the frames
    box-blurred 3x3 on the torus first (averaging noise away; an edge, where the colour blends linearly
    into the background, keeps its place)."""
    diff = ndimage.uniform_filter(frames.astype(np.float32), size=(1, 3, 3, 1), mode="wrap") - background  # f h w 3
    return np.sqrt(np.einsum("fhwc,fhwc->fhw", diff, diff))


def object_masks(dist: np.ndarray) -> np.ndarray:
    """bool [F, H, W]: the pixels whose `distances` dist [F, H, W] are over half the object's contrast
    (the clip's 99th percentile of the distance), and at least MIN_CONTRAST."""
    level = np.percentile(dist[:, ::2, ::2], 99)  # every 4th pixel is plenty
    return dist > max(0.5 * level, MIN_CONTRAST)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """bool [H, W]: the largest 4-connected component of mask [H, W] on the torus (components that
    meet across the edges are one)."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    parent = np.arange(n + 1)

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    a = np.concatenate([labels[0], labels[:, 0]])  # the pixels on the first row and column ...
    b = np.concatenate([labels[-1], labels[:, -1]])  # ... and their neighbours across the edges
    for i, j in set(zip(a[(a > 0) & (b > 0)].tolist(), b[(a > 0) & (b > 0)].tolist())):
        parent[root(i)] = root(j)
    roots = np.asarray([root(i) for i in range(n + 1)])
    merged = roots[labels]  # h w
    sizes = np.bincount(merged.ravel(), minlength=n + 1)
    sizes[0] = 0
    return merged == np.argmax(sizes)


def circular_centre(mask: np.ndarray) -> tuple[float, float]:
    """(y, x) pixel centre of mask [H, W] on the torus: the circular mean of its rows and columns."""
    out = []
    for axis in (0, 1):
        n = mask.shape[axis]
        counts = mask.sum(axis=1 - axis)  # n
        angle = 2 * np.pi * (np.arange(n) + 0.5) / n
        mean = np.arctan2((counts * np.sin(angle)).sum(), (counts * np.cos(angle)).sum())
        out.append(float(mean * n / (2 * np.pi) % n))
    return out[0], out[1]


def _centred(x: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """x [H, W, ...] rolled so that the pixel at centre (y, x) sits at the frame's centre."""
    h, w = x.shape[:2]
    return np.roll(x, (h // 2 - int(centre[0]), w // 2 - int(centre[1])), axis=(0, 1))


def fill_ratio(mask: np.ndarray) -> float:
    """Area / bounding-box area of a mask [H, W] that does not wrap (e.g. one `_centred`)."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return float(mask.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)))


def shape_of(ratio: float) -> str:
    """The shape a fill ratio (area / bounding-box area) reads as: cut at FILL_THRESHOLDS."""
    return SHAPES[2] if ratio < FILL_THRESHOLDS[0] else SHAPES[0] if ratio < FILL_THRESHOLDS[1] else SHAPES[1]


def direction_of(track: np.ndarray, times: np.ndarray, height: int, width: int) -> str | None:
    """The direction of a centre track [T, 2] (y, x pixels at frame indices times [T]): the median
    velocity's dominant axis and sign (as a fraction of the side, per frame); None when slower than
    MIN_SPEED * SPEED or with fewer than two points."""
    if len(track) < 2:
        return None
    side = np.asarray([height, width], np.float32)
    step = np.diff(track, axis=0)
    step = (step + side / 2) % side - side / 2  # wrapped on the torus, [-side/2, side/2)
    vy, vx = np.median(step / side / np.diff(times)[:, None], axis=0)
    if max(abs(vx), abs(vy)) < MIN_SPEED * SPEED:
        return None
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def read_clip(frames: np.ndarray) -> dict[str, str | None]:
    """What a clip shows: uint8 frames [F, H, W, 3] -> {'colour', 'shape', 'direction', 'background'},
    vocabulary names (None where nothing can be read: all four without a plain background, the object's
    three without a compact object, the direction without motion)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"expected frames [F, H, W, 3] (none empty), got shape {frames.shape}")
    h, w = frames.shape[1:3]
    median = np.median(frames[:, ::2, ::2].reshape(-1, 3), axis=0).astype(np.float32)  # 3, of every 4th pixel
    found: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    dist = distances(frames, median)  # f h w
    if np.mean(dist[:, ::2, ::2] < MIN_CONTRAST) < MIN_PLAIN:
        return found  # no plain background (e.g. noise): nothing to read
    found["background"] = _nearest(median, BACKGROUNDS)
    track, times, ratios, interior = [], [], [], []
    for t, pixels in enumerate(object_masks(dist)):
        mask = largest_component(pixels)
        if mask.sum() < max(MIN_AREA * h * w, MIN_COMPACT * pixels.sum()):
            continue  # no object, or scattered noise
        centre = circular_centre(mask)
        centred = _centred(mask, centre)
        track.append(centre)
        times.append(t)
        ratios.append(fill_ratio(centred))
        inner = ndimage.binary_erosion(centred)
        interior.append(_centred(frames[t], centre)[inner if inner.any() else centred])  # n 3
    if not track:
        return found
    found["colour"] = _nearest(np.median(np.concatenate(interior), axis=0), COLOURS)
    found["shape"] = shape_of(float(np.median(ratios)))
    found["direction"] = direction_of(np.asarray(track, np.float32), np.asarray(times), h, w)
    return found


# ---------------------------------------------------------------------------------------- prompts
def prompt_pairs(n: int = 48, seed: int = 0, per_seed: int = 8) -> list[PromptPair]:
    """n prompts in the grammar `a {colour} {shape} moving {direction} [on a {background} background]`,
    balanced over each attribute (every value n / len(values) times, +-1; the combinations shuffled),
    deterministic in seed. Black backgrounds alternate between the short and the named form. Pairs
    share a seed in runs of `per_seed` (one batched generate call each)."""
    if n < 1 or per_seed < 1:
        raise ValueError(f"n and per_seed must be >= 1, got {n}, {per_seed}")
    rng = np.random.default_rng([seed, n])
    columns = {
        name: [str(v) for v in rng.permutation(np.resize(np.asarray(list(values)), n))]
        for name, values in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS), ("background", BACKGROUNDS))
    }
    seeds = rng.integers(0, 2**31 - 1, size=-(-n // per_seed))
    pairs, blacks = [], 0
    for i in range(n):
        labels = ClipLabels(**{name: column[i] for name, column in columns.items()})
        prompt = labels.caption()
        if labels.background == "black":
            blacks += 1
            prompt = f"{prompt} on a black background" if blacks % 2 == 0 else prompt
        pairs.append(PromptPair(prompt, int(seeds[i // per_seed]), labels))
    return pairs


# ---------------------------------------------------------------------------------------- scoring
def reference_generate(pipe=None) -> Generate:
    """A `generate` that draws each prompt's clip from its caption (`render_clip`, seeded like a
    model's video); with a pipeline, the clip goes through its VAE encoder and decoder."""

    def generate(prompts: list[str], seed: int, frames: int, height: int, width: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        clips = np.stack([render_clip(ClipLabels(**parse_caption(p)), frames, height, width, rng) for p in prompts])
        return clips if pipe is None else pipe.decode_latents(pipe.encode_frames(clips))

    return generate


def pipeline_generate(pipe) -> Generate:
    """A `generate(prompts, seed, frames, height, width) -> uint8 [B, F, H, W, 3]` from a
    `TextToVideoPipeline`."""

    def generate(prompts: list[str], seed: int, frames: int, height: int, width: int) -> np.ndarray:
        return pipe.generate(list(prompts), frames, height, width, seed=seed)

    return generate


def evaluate(
    generate: Generate, pairs: Sequence[PromptPair], frames: int, height: int, width: int, batch: int = 8, progress: bool = True
) -> dict:
    """Generate every pair's video (pairs of one seed batched, up to `batch` prompts a call), read it and
    score it: {'accuracy': {'colour', 'shape', 'direction', 'background', 'all': fraction right},
    'pairs': n, 'records': [{'prompt', 'seed', 'want': labels, 'got': `read_clip`}] in pairs' order}."""
    from tqdm import tqdm

    if not pairs or batch < 1:
        raise ValueError(f"need at least one pair and batch >= 1, got {len(pairs)} pairs, batch {batch}")
    by_seed = collections.defaultdict(list)  # seed -> indices into pairs
    for i, pair in enumerate(pairs):
        by_seed[pair.seed].append(i)
    got: list[dict | None] = [None] * len(pairs)
    with tqdm(total=len(pairs), unit="video", desc="prompt following", disable=not progress) as bar:
        for seed, indices in by_seed.items():
            for start in range(0, len(indices), batch):
                chunk = indices[start : start + batch]
                videos = np.asarray(generate([pairs[i].prompt for i in chunk], seed, frames, height, width))
                if videos.shape[:2] != (len(chunk), frames) or videos.shape[2:] != (height, width, 3):
                    raise ValueError(f"generate gave shape {videos.shape}, expected {(len(chunk), frames, height, width, 3)}")
                for i, video in zip(chunk, videos):
                    got[i] = read_clip(video)
                bar.update(len(chunk))
    records = [{"prompt": p.prompt, "seed": p.seed, "want": dataclasses.asdict(p.labels), "got": g} for p, g in zip(pairs, got)]
    right = {a: [r["want"][a] == r["got"][a] for r in records] for a in ATTRIBUTES}
    accuracy = {a: float(np.mean(right[a])) for a in ATTRIBUTES}
    accuracy["all"] = float(np.mean(np.all([right[a] for a in ATTRIBUTES], axis=0)))
    return {"accuracy": accuracy, "pairs": len(pairs), "records": records}


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table of `evaluate` results by model name: the accuracies as percentages."""
    columns = (*ATTRIBUTES, "all")
    name_width = max(len("model"), *(len(name) for name in results))
    widths = [max(len(c), 6) for c in columns]
    lines = [" ".join(["model".ljust(name_width), *(c.rjust(wd) for c, wd in zip(columns, widths)), "pairs".rjust(5)])]
    for name, result in results.items():
        cells = (f"{100 * result['accuracy'][c]:.1f}%".rjust(wd) for c, wd in zip(columns, widths))
        lines.append(" ".join([name.ljust(name_width), *cells, str(result["pairs"]).rjust(5)]))
    return "\n".join(lines)


__all__ = [
    "ATTRIBUTES",
    "PromptPair",
    "circular_centre",
    "direction_of",
    "evaluate",
    "fill_ratio",
    "format_table",
    "distances",
    "largest_component",
    "object_masks",
    "pipeline_generate",
    "prompt_pairs",
    "read_clip",
    "reference_generate",
    "shape_of",
]
