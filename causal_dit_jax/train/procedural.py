"""A procedural world of captioned clips: one coloured shape moving across a plain background.

Captions follow the grammar `a {colour} {shape} moving {direction}`, optionally `... on a {background}
background` (black when none is named), with a few synonyms in training ("a red ball going left").
The shape travels at a constant speed on a torus (what leaves one side enters the other), so a clip
of any length keeps the object and its motion. Clips are drawn anti-aliased by a signed distance,
by one function in numpy (`render_clip`, the grain source `ProceduralClips`, seeded per record:
record i is the same clip on every host and every epoch) or in JAX on the accelerator
(`render_batch`, for a trainer that draws its own batches with `draw_labels`).
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


SPEED = 1.0 / 64  # of the frame's side per frame: half the frame over a 33-frame clip
SIZE = 0.2  # the shape's radius, of the frame's shorter side
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _signed_inside(xp, shape: int, x, y, r):
    """Pixels inside minus outside (a signed distance, positive inside) of shape SHAPES[shape] of radius
    r centred at 0; x, y broadcast. xp: numpy or jax.numpy (shape may then be traced: all three are
    computed and one selected)."""
    circle = r - xp.sqrt(x**2 + y**2)
    square = xp.minimum(r * 0.95 - xp.abs(x), r * 0.95 - xp.abs(y))
    # an upward triangle, apex (0, -r), base corners (+-0.9 r, 0.8 r): the least distance to its edges
    corners = [(0.0, -1.0), (0.9, 0.8), (-0.9, 0.8)]
    cx, cy = np.mean(corners, axis=0)
    triangle = None
    for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]):
        nx, ny = by - ay, ax - bx  # a normal of the edge a -> b
        norm = np.hypot(nx, ny)
        sign = np.sign(nx * (cx - ax) + ny * (cy - ay))  # pointing inwards
        d = sign * (nx * (x - ax * r) + ny * (y - ay * r)) / norm
        triangle = d if triangle is None else xp.minimum(triangle, d)
    return xp.where(shape == 0, circle, xp.where(shape == 1, square, triangle))


def _wrapped(xp, d, period):
    """Offsets d taken to the nearest copy on a torus of `period`: in [-period / 2, period / 2)."""
    return (d + period / 2) % period - period / 2


def draw_frames(xp, colour, shape, direction, background, x0, y0, frames: int, height: int, width: int):
    """float32 [frames, height, width, 3] in 0..255: shape SHAPES[shape] in COLOURS[colour] starting at
    pixel (x0, y0), moving SPEED of the frame per frame in DIRECTIONS[direction], on the background.
    The frame is a torus: what leaves one side enters the other, so any clip length keeps the object
    and its motion. Label arguments are indices (traceable under jax)."""
    colours = xp.asarray(np.asarray(list(COLOURS.values()), np.float32))
    backgrounds = xp.asarray(np.asarray(list(BACKGROUNDS.values()), np.float32))
    steps = xp.asarray(np.asarray([_STEP[d] for d in DIRECTIONS], np.float32))
    r = SIZE * min(height, width)
    t = xp.arange(frames, dtype=xp.float32)[:, None, None]  # f 1 1
    step = steps[direction]
    cx = x0 + step[0] * SPEED * width * t
    cy = y0 + step[1] * SPEED * height * t
    ys = (xp.arange(height, dtype=xp.float32) + 0.5)[None, :, None]  # 1 h 1
    xs = (xp.arange(width, dtype=xp.float32) + 0.5)[None, None, :]  # 1 1 w
    inside = _signed_inside(xp, shape, _wrapped(xp, xs - cx, width), _wrapped(xp, ys - cy, height), r)
    alpha = xp.clip(0.5 + inside, 0.0, 1.0)[..., None]  # f h w 1
    return alpha * colours[colour] + (1.0 - alpha) * backgrounds[background]


def render_clip(labels: ClipLabels, frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [frames, height, width, 3]: the labelled clip from a random start anywhere in the frame."""
    x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
    out = draw_frames(
        np,
        list(COLOURS).index(labels.colour),
        SHAPES.index(labels.shape),
        DIRECTIONS.index(labels.direction),
        list(BACKGROUNDS).index(labels.background),
        x0,
        y0,
        frames,
        height,
        width,
    )
    return np.round(out).astype(np.uint8)


def render_batch(labels: dict, frames: int, height: int, width: int):
    """Clips on the accelerator: labels {'colour', 'shape', 'direction', 'background': int [B], 'x0',
    'y0': float [B] start pixels} -> float32 [B, frames, height, width, 3] in [-1, 1] (jit-able)."""
    import jax
    import jax.numpy as jnp

    def one(c, s, d, b, x0, y0):
        return draw_frames(jnp, c, s, d, b, x0, y0, frames, height, width)

    keys = ("colour", "shape", "direction", "background", "x0", "y0")
    out = jax.vmap(one)(*(jnp.asarray(labels[k]) for k in keys))
    return out / 127.5 - 1.0


def draw_labels(rng: np.random.Generator, n: int, height: int, width: int, backgrounds=tuple(BACKGROUNDS), synonyms=True):
    """n random clips' labels and captions: ({'colour', 'shape', 'direction', 'background': int [n],
    'x0', 'y0': float32 [n]}, [caption]) for `render_batch`."""
    out = {k: np.zeros(n, np.int32) for k in ("colour", "shape", "direction", "background")}
    captions = []
    for i in range(n):
        labels = ClipLabels(
            colour=str(rng.choice(list(COLOURS))),
            shape=str(rng.choice(SHAPES)),
            direction=str(rng.choice(DIRECTIONS)),
            background=str(rng.choice(list(backgrounds))),
        )
        out["colour"][i] = list(COLOURS).index(labels.colour)
        out["shape"][i] = SHAPES.index(labels.shape)
        out["direction"][i] = DIRECTIONS.index(labels.direction)
        out["background"][i] = list(BACKGROUNDS).index(labels.background)
        captions.append(labels.caption(rng if synonyms else None))
    out["x0"] = rng.uniform(0, width, n).astype(np.float32)
    out["y0"] = rng.uniform(0, height, n).astype(np.float32)
    return out, captions


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
    "SIZE",
    "SPEED",
    "COLOURS",
    "DIRECTIONS",
    "SHAPES",
    "SYNONYMS",
    "ClipLabels",
    "ProceduralClips",
    "draw_frames",
    "draw_labels",
    "parse_caption",
    "render_batch",
    "render_clip",
]
