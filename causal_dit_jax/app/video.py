"""Writing uint8 frames to an mp4 while they stream in; the file appears only when complete."""

from __future__ import annotations

import os
import pathlib
import uuid
from typing import Optional

import numpy as np

SAMPLE_FPS = 16  # Wan2.1's frame rate


def check_writable(path: str | pathlib.Path, overwrite: bool = True) -> pathlib.Path:
    """Fail before any model work if `path` cannot be written."""
    p = pathlib.Path(path).expanduser().absolute()
    if p.suffix.lower() != ".mp4":
        raise ValueError(f"output must be an .mp4 file, got {p.name!r}")
    if p.is_dir():
        raise ValueError(f"{p} is a directory")
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} already exists")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"output folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise PermissionError(f"output folder {p.parent} is not writable")
    return p


class Mp4Writer:
    """Append frame chunks [T, H, W, 3] uint8; `close()` moves the finished file into place.

    Used as a context manager, an exception deletes the partial file.
    """

    def __init__(self, path: str | pathlib.Path, fps: int = SAMPLE_FPS, quality: Optional[float] = 8):
        import imageio.v2 as imageio

        self.path = check_writable(path)
        self.tmp = self.path.parent / f".{self.path.stem}.partial-{uuid.uuid4().hex[:8]}.mp4"
        self._writer = imageio.get_writer(str(self.tmp), fps=fps, codec="libx264", quality=quality,
                                          macro_block_size=1, pixelformat="yuv420p")
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        for f in frames:
            self._writer.append_data(f)
        self.frames += len(frames)

    def close(self) -> pathlib.Path:
        self._writer.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_mp4(path: str | pathlib.Path) -> np.ndarray:
    """All frames of an mp4 as uint8 [T, H, W, 3] (for tests and notebooks)."""
    import imageio.v2 as imageio

    return np.stack(list(imageio.mimread(str(path), memtest=False)))
