"""A procedural world of captioned clips: one coloured shape moving across a plain background.

Captions follow the grammar `a {colour} {shape} moving {direction}`, optionally `... on a {background}
background` (black when none is named), with a few synonyms in training ("a red ball going left").
Clips are rendered in numpy, anti-aliased by a signed distance, seeded per record: record i of a
source is the same clip on every host and every epoch, so the source shards and resumes like any
other (`train.data.make_dataset`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {  # saturated and clearly apart in hue
    "red": (230, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 190, 70),
    "blue": (40, 90, 240),
    "purple": (150, 55, 220),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}

SYNONYMS = {  # words a caption may use instead of the grammar's own
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "moving": ("moving", "going", "travelling", "sliding"),
    "gray": ("gray", "grey"),
}
_WORDS = {w: canon for canon, words in SYNONYMS.items() for w in words}


@dataclasses.dataclass(frozen=True)
class ClipLabels:
    """What a clip shows: indices into COLOURS, SHAPES, DIRECTIONS and BACKGROUNDS (in their order)."""

    colour: str
    shape: str
    direction: str
    background: str = "black"

    def __post_init__(self):
        for name, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("direction", self.direction, DIRECTIONS),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")

    def caption(self, rng: np.random.Generator | None = None) -> str:
        """The grammar's caption; with an rng, synonyms and the optional background phrase vary."""
        shape, moving, background = self.shape, "moving", self.background
        if rng is not None:
            shape = str(rng.choice(SYNONYMS.get(shape, (shape,))))
            moving = str(rng.choice(SYNONYMS["moving"]))
            background = str(rng.choice(SYNONYMS.get(background, (background,))))
        text = f"a {self.colour} {shape} {moving} {self.direction}"
        named = self.background != "black" or (rng is not None and rng.random() < 0.5)
        return f"{text} on a {background} background" if named else text


def parse_caption(text: str) -> dict[str, str | None]:
    """The labels a caption names (None where it names none; unknown words are ignored), e.g. for
    scoring a generated video against its prompt."""
    words = [_WORDS.get(w, w) for w in text.lower().replace(",", " ").split()]
    found: dict[str, str | None] = {"colour": None, "shape": None, "direction": None, "background": None}
    for i, w in enumerate(words):
        if w in COLOURS and found["colour"] is None:
            found["colour"] = w
        elif w in SHAPES:
            found["shape"] = w
        elif w in DIRECTIONS:
            found["direction"] = w
        elif w in BACKGROUNDS and i + 1 < len(words) and words[i + 1] == "background":
            found["background"] = w
    if found["background"] is None and found["colour"] is not None:
        found["background"] = "black"  # the grammar's default
    return found


def _signed_inside(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Pixels inside minus outside (a signed distance, positive inside) of a shape of radius r at 0."""
    if shape == "circle":
        return r - np.sqrt(x**2 + y**2)
    if shape == "square":
        return np.minimum(r * 0.95 - np.abs(x), r * 0.95 - np.abs(y))
    # an upward triangle, apex (0, -r), base corners (+-0.9 r, 0.8 r): the least distance to its edges
    corners = [(0.0, -r), (0.9 * r, 0.8 * r), (-0.9 * r, 0.8 * r)]
    centroid = np.mean(corners, axis=0)
    inside = None
    for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]):
        nx, ny = by - ay, ax - bx  # a normal of the edge a -> b
        norm = np.hypot(nx, ny)
        sign = np.sign(nx * (centroid[0] - ax) + ny * (centroid[1] - ay))  # pointing inwards
        d = sign * (nx * (x - ax) + ny * (y - ay)) / norm
        inside = d if inside is None else np.minimum(inside, d)
    return inside


def render_clip(
    labels: ClipLabels, frames: int, height: int, width: int, rng: np.random.Generator, size: float = 0.2
) -> np.ndarray:
    """uint8 [frames, height, width, 3]: the shape (radius size * min(height, width)) crossing about
    half the frame in its direction, from a random start that keeps it in view, on the background."""
    r = size * min(height, width)
    travel_x, travel_y = 0.5 * width, 0.5 * height
    dx, dy = {"left": (-travel_x, 0), "right": (travel_x, 0), "up": (0, -travel_y), "down": (0, travel_y)}[labels.direction]
    lo_x, hi_x = r + max(-dx, 0), width - r - max(dx, 0)
    lo_y, hi_y = r + max(-dy, 0), height - r - max(dy, 0)
    x0 = rng.uniform(lo_x, max(lo_x, hi_x))
    y0 = rng.uniform(lo_y, max(lo_y, hi_y))
    t = np.linspace(0.0, 1.0, frames)[:, None, None]  # f 1 1
    cx, cy = x0 + dx * t, y0 + dy * t
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    alpha = np.clip(0.5 + _signed_inside(labels.shape, xs[None] - cx, ys[None] - cy, r), 0.0, 1.0)[..., None]  # f h w 1
    colour = np.asarray(COLOURS[labels.colour], np.float32)
    background = np.asarray(BACKGROUNDS[labels.background], np.float32)
    return np.round(alpha * colour + (1.0 - alpha) * background).astype(np.uint8)


class ProceduralClips:
    """A random-access source of `num_clips` rendered clips: record i -> {"frames": uint8 [frames,
    height, width, 3], "caption": str, "colour", "shape", "direction", "background": int label
    indices}, from seed and i alone. backgrounds: the backgrounds drawn (all three by default)."""

    def __init__(
        self,
        num_clips: int,
        frames: int,
        height: int,
        width: int,
        seed: int = 0,
        backgrounds: tuple[str, ...] = tuple(BACKGROUNDS),
        synonyms: bool = True,
    ):
        if min(num_clips, frames, height, width) < 1:
            raise ValueError(f"num_clips, frames, height and width must be >= 1, got {num_clips, frames, height, width}")
        unknown = [b for b in backgrounds if b not in BACKGROUNDS]
        if unknown or not backgrounds:
            raise ValueError(f"unknown backgrounds {unknown}; expected some of {list(BACKGROUNDS)}")
        self.num_clips, self.frames, self.height, self.width = num_clips, frames, height, width
        self.seed, self.backgrounds, self.synonyms = seed, tuple(backgrounds), synonyms

    def __len__(self) -> int:
        return self.num_clips

    def labels(self, index: int) -> ClipLabels:
        rng = np.random.default_rng([self.seed, index, 0])
        return ClipLabels(
            colour=str(rng.choice(list(COLOURS))),
            shape=str(rng.choice(SHAPES)),
            direction=str(rng.choice(DIRECTIONS)),
            background=str(rng.choice(self.backgrounds)),
        )

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_clips:
            raise IndexError(f"record {index} of {self.num_clips}")
        labels = self.labels(index)
        rng = np.random.default_rng([self.seed, index, 1])
        frames = render_clip(labels, self.frames, self.height, self.width, rng)
        return {
            "frames": frames,
            "caption": labels.caption(rng if self.synonyms else None),
            "colour": list(COLOURS).index(labels.colour),
            "shape": SHAPES.index(labels.shape),
            "direction": DIRECTIONS.index(labels.direction),
            "background": list(BACKGROUNDS).index(labels.background),
        }

    def __repr__(self) -> str:
        return f"ProceduralClips({self.num_clips} clips, {self.frames}x{self.height}x{self.width}, seed {self.seed})"


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DIRECTIONS",
    "SHAPES",
    "SYNONYMS",
    "ClipLabels",
    "ProceduralClips",
    "parse_caption",
    "render_clip",
]
