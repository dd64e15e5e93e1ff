"""Starting ffmpeg (through imageio-ffmpeg) from a process that runs JAX: shared by the mp4 writer
(`app/video.py`) and the training data's video reader (`train/data.py`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def ffmpeg_without_preexec() -> Iterator[None]:
    """imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp (its own process group, so a Ctrl-C does
    not reach it); a preexec_fn makes Python run its at-fork hooks, and JAX's warns that os.fork() was
    called. IMAGEIO_FFMPEG_NO_PREVENT_SIGINT=1 drops the preexec_fn: ffmpeg then shares our process group
    and a Ctrl-C reaches it too, which is fine: an interrupted writer deletes its partial file anyway.
    Set only while the writer spawns ffmpeg; the previous value is restored after."""
    key = "IMAGEIO_FFMPEG_NO_PREVENT_SIGINT"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


__all__ = ["ffmpeg_without_preexec"]
