"""Writing uint8 frames to an mp4 while they stream in; the file appears only when complete."""

from __future__ import annotations

import contextlib
import os
import pathlib
import uuid

import numpy as np

from causal_dit_jax.ffmpeg import ffmpeg_without_preexec

SAMPLE_FPS = 16  # Wan2.1's frame rate


def check_mp4_backend() -> None:
    """Fail before any model work if imageio cannot write an mp4: without imageio-ffmpeg it would
    pick another plugin for the suffix and fail at the first frame with an unrelated error."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise RuntimeError(
            "writing mp4 needs the imageio-ffmpeg package (a dependency of causal-dit-jax: pip install imageio-ffmpeg)"
        ) from None
    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as e:
        raise RuntimeError(f"writing mp4 needs an ffmpeg executable: {e}") from None


def check_writable(path: str | pathlib.Path, overwrite: bool = True) -> pathlib.Path:
    """Fail before any model work if an mp4 cannot be written to `path`."""
    check_mp4_backend()
    p = pathlib.Path(path).expanduser().absolute()
    if p.is_dir():
        raise ValueError(f"output {p} is a directory; give an .mp4 file path (e.g. {p / 'video.mp4'})")
    if p.suffix.lower() != ".mp4":
        raise ValueError(f"output must be an .mp4 file, got {p.name!r}")
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} already exists (pass --overwrite to replace it)")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"output folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise PermissionError(f"output folder {p.parent} is not writable")
    return p


class Mp4Writer:
    """Append frame chunks [T, H, W, 3] uint8; `close()` moves the finished file into place.

    Used as a context manager, an exception (KeyboardInterrupt included) deletes the partial file.
    ffmpeg starts with the first frames.
    """

    def __init__(self, path: str | pathlib.Path, fps: int = SAMPLE_FPS, quality: float | None = 8):
        import imageio.v2 as imageio

        self.path = check_writable(path)
        self.tmp = self.path.parent / f".{self.path.stem}.partial-{uuid.uuid4().hex[:8]}.mp4"
        self._writer = imageio.get_writer(
            str(self.tmp), format="FFMPEG", fps=fps, codec="libx264", quality=quality, macro_block_size=1, pixelformat="yuv420p"
        )
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        for f in frames:
            if self.frames == 0:  # the first frame starts ffmpeg
                with ffmpeg_without_preexec():
                    self._writer.append_data(f)
            else:
                self._writer.append_data(f)
            self.frames += 1

    def close(self) -> pathlib.Path:
        self._writer.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and delete the partial file; errors of a writer that is going away anyway (an
        ffmpeg already stopped by the same Ctrl-C) do not hide the exception that aborted it."""
        try:
            with contextlib.suppress(Exception):  # the partial file is deleted either way
                self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_mp4(path: str | pathlib.Path) -> np.ndarray:
    """All frames of an mp4 as uint8 [T, H, W, 3] (for tests and notebooks)."""
    import imageio.v2 as imageio

    with ffmpeg_without_preexec():  # the reader starts ffmpeg too
        return np.stack(list(imageio.mimread(str(path), memtest=False)))
