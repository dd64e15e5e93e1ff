"""The embedded default: a small text-to-video model shipped inside the package.

Trained by `train/recipe.py` (`recipes/embedded_default.json`) on the procedural world: captions
`a {colour} {shape} moving {direction}`, optionally `... on a {background} background`. The folder
`embedded_default/` holds dit.npz, text.npz (umT5), vae.npz (the Wan-architecture VAE's encoder and
decoder) and config.json (their configs with the VAE's own latent statistics, the byte tokenizer's
length, the default video size, the recipe and the steps it ran). `TextToVideoPipeline.embedded_default()`
loads it; `TextToVideoPipeline.from_embedded(folder)` loads any folder the recipe exports.
"""

from __future__ import annotations

import json
import pathlib

EMBEDDED_DIR = pathlib.Path(__file__).parent / "embedded_default"
FILES = ("config.json", "dit.npz", "text.npz", "vae.npz")


def embedded_folder(folder: str | pathlib.Path | None = None) -> pathlib.Path:
    """The folder (default: the package's own), checked to hold every file."""
    d = EMBEDDED_DIR if folder is None else pathlib.Path(folder).expanduser()
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d} is not an embedded model folder: missing {missing} (export one with train/recipe.py)")
    return d


def read_embedded_config(folder: str | pathlib.Path | None = None) -> dict:
    """config.json of an embedded model folder: {'dit', 't5', 'vae' config dicts, 'tokenizer',
    'default_size': {'frames', 'height', 'width'}, 'recipe', 'steps_run', ...}."""
    return json.loads((embedded_folder(folder) / "config.json").read_text())


def default_size(folder: str | pathlib.Path | None = None) -> tuple[int, int, int]:
    """(frames, height, width) the embedded model was trained at: its default video."""
    s = read_embedded_config(folder)["default_size"]
    return int(s["frames"]), int(s["height"]), int(s["width"])


__all__ = ["EMBEDDED_DIR", "FILES", "default_size", "embedded_folder", "read_embedded_config"]
