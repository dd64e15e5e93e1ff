"""The generation worker: one video's `TextToVideoPipeline.stream` run in a thread, its frames
encoded to JPEG for the page and written to an mp4; and the pipelines the sessions share."""

from __future__ import annotations

import concurrent.futures
import io
import logging
import pathlib
import threading
import time
from collections.abc import Callable

import numpy as np

from causal_dit_jax.app.serve.config import SWITCH_MODES
from causal_dit_jax.app.serve.outbox import Outbox
from causal_dit_jax.app.serve.protocol import Start, error

log = logging.getLogger("causal_dit_jax.serve")


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decoder_name(pipe) -> str:
    """'wan' or 'taehv': the kind of a pipeline's video decoder."""
    from causal_dit_jax.autoencoders.taehv import TAEHVDecoder

    return "taehv" if isinstance(pipe.vae, TAEHVDecoder) else "wan"


class PipelinePool:
    """The pipelines the server runs, one per decoder, made on first use by `factory(decoder)` (a
    pipeline given as is serves its own decoder only), and the device they take turns on: a
    generation holds `device` while it computes (`users` at once), and runs in one of `threads`."""

    def __init__(self, source, decoders: tuple[str, ...], users: int = 1, threads: int = 1):
        if callable(source) and not hasattr(source, "stream"):
            self._factory: Callable[[str], object] | None = source
            self._pipes: dict[str, object] = {}
            self.decoders = tuple(decoders)
        else:
            self._factory = None
            self._pipes = {decoder_name(source): source}
            self.decoders = (decoder_name(source),)
        self._loading = threading.Lock()
        self.device = threading.BoundedSemaphore(users)
        self.threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="generation")

    def get(self, decoder: str):
        """The pipeline for a decoder (loaded now if it is the first use)."""
        if decoder not in self.decoders:
            raise ValueError(f"decoder {decoder!r} is not offered here; choose one of {list(self.decoders)}")
        with self._loading:
            if decoder not in self._pipes:
                t = time.perf_counter()
                self._pipes[decoder] = self._factory(decoder)
                log.info("loaded the %s pipeline in %.1f s", decoder, time.perf_counter() - t)
            return self._pipes[decoder]


class Generation:
    """One video of a session, generated in a thread of the pool.

    Between two pulls of the stream (one decoded frame batch, 1 or 4 frames with the pipeline's
    default decoding: at most one chunk of DiT work) it looks at its controls: `stop` ends it before
    the next pull, `pause` holds it there, a prompt given to `switch` is handed to the stream at its
    next chunk boundary. Frames go to the outbox as JPEGs (waiting while it is full) and to an mp4 at
    `video_path` (None: no mp4).

    Counters, for the status messages: generated frames; first_frame_s (start -> first frames, with
    prompt encoding and, for a new size, compilation); fps (frames per second of device time after
    the first frames: how fast the model makes them, whatever the page's playback rate).
    """

    def __init__(
        self,
        session_id: str,
        request: Start,
        pipe,
        size: tuple[int, int],
        outbox: Outbox,
        device: threading.Semaphore,
        jpeg_quality: int,
        video_path: pathlib.Path | None,
        model_fps: int,
    ):
        self.session_id, self.request, self.pipe, self.size = session_id, request, pipe, size
        self.outbox, self.device, self.jpeg_quality = outbox, device, jpeg_quality
        self.video_path, self.model_fps = video_path, model_fps
        self.cancelled = threading.Event()
        self.finished = threading.Event()  # set when it ends, before its 'done' message is queued
        self._running = threading.Event()
        self.holding = threading.Event()  # set while a pause holds the generation between pulls
        self._running.set()
        self._lock = threading.Lock()
        self._pending_prompt: str | None = None
        self.prompt = request.prompt
        self.generated = 0
        self.first_frame_s: float | None = None
        self._first_frames = 0
        self._device_s = 0.0  # device time after the first pull
        self.video_ready = False
        self.reason: str | None = None  # 'finished', 'stopped' or 'error' once done
        self._t0 = time.perf_counter()
        self._future: concurrent.futures.Future | None = None

    # ------------------------------------------------------------------ controls (any thread)
    def start(self, threads: concurrent.futures.Executor) -> None:
        """Run in one of `threads` (a fixed pool: a thread per video would each leave the allocator
        an arena of its own)."""
        self._future = threads.submit(self._run)

    def stop(self) -> None:
        self.cancelled.set()
        self._running.set()
        self.outbox.notify()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        self.outbox.notify()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def switch(self, prompt: str) -> None:
        with self._lock:
            self._pending_prompt = prompt

    def join(self, timeout: float | None = None) -> None:
        if self._future is not None:
            concurrent.futures.wait([self._future], timeout)

    @property
    def alive(self) -> bool:
        return self._future is not None and not self._future.done()

    @property
    def fps(self) -> float | None:
        n = self.generated - self._first_frames
        return n / self._device_s if n > 0 and self._device_s > 0 else None

    # ------------------------------------------------------------------ the thread
    def _poll_prompt(self, chunk: int) -> str | None:
        """The stream's prompt schedule: a prompt switched to since the last chunk, else None."""
        with self._lock:
            prompt, self._pending_prompt = self._pending_prompt, None
        if prompt == self.prompt:  # no switch (the stream ignores it too)
            return None
        if prompt is not None:
            self.prompt = prompt
            self.outbox.put_status(
                {"type": "switched", "prompt": prompt, "chunk": chunk, "frame": self.generated}, ordered=True
            )
        return prompt

    def _run(self) -> None:
        from causal_dit_jax.app.video import Mp4Writer

        r = self.request
        height, width = self.size
        writer = None
        self.reason = "finished"
        recache, recache_chunks = SWITCH_MODES[r.switch]
        stream = self.pipe.stream(
            r.prompt,
            r.frames,
            height,
            width,
            r.seed,
            prompt_schedule=self._poll_prompt,
            recache=recache,
            recache_chunks=recache_chunks,
        )
        try:
            while True:
                while not self._running.wait(0.1):  # paused
                    self.holding.set()
                self.holding.clear()
                if self.cancelled.is_set():
                    self.reason = "stopped"
                    break
                with self.device:
                    t = time.perf_counter()
                    try:
                        batch = next(stream)
                    except StopIteration:
                        break
                    now = time.perf_counter()
                frames = np.asarray(batch)[0]  # n h w 3, of the one prompt
                if self.first_frame_s is None:
                    self.first_frame_s, self._first_frames = now - self._t0, len(frames)
                    self.outbox.put_status({"type": "first_frame", "latency_s": round(self.first_frame_s, 3)}, ordered=True)
                else:
                    self._device_s += now - t
                self.generated += len(frames)
                if self.video_path is not None:
                    if writer is None:
                        writer = Mp4Writer(self.video_path, fps=self.model_fps)
                    writer.write(frames)
                for frame in frames:
                    if not self.outbox.put_frame(encode_jpeg(frame, self.jpeg_quality), self.cancelled):
                        break
        except Exception as e:  # the page is told; the server goes on
            self.reason = "error"
            log.exception("session %s: generation failed", self.session_id)
            self.outbox.put_status(error(f"generation failed: {type(e).__name__}: {e}"))
        finally:
            stream.close()
            if writer is not None:
                if self.reason == "error":
                    writer.abort()
                else:
                    try:
                        writer.close()
                        self.video_ready = True
                    except Exception:
                        log.exception("session %s: the mp4 could not be finished", self.session_id)
                        writer.abort()
            self._report()

    def _report(self) -> None:
        self.finished.set()
        fps = self.fps
        first = "n/a" if self.first_frame_s is None else f"{self.first_frame_s:.2f} s"
        log.info(
            "session %s: %s, %d frames (seed %d): first frame after %s, generation %s frames/s, %d dropped",
            self.session_id,
            self.reason,
            self.generated,
            self.request.seed,
            first,
            "n/a" if fps is None else f"{fps:.1f}",
            self.outbox.dropped,
        )
        self.outbox.put_status(
            {
                "type": "done",
                "reason": self.reason,
                "frames": self.generated,
                "first_frame_s": None if self.first_frame_s is None else round(self.first_frame_s, 3),
                "fps": None if fps is None else round(fps, 2),
                "video": f"/sessions/{self.session_id}/video.mp4" if self.video_ready else None,
            },
            ordered=True,
        )


__all__ = ["Generation", "PipelinePool", "decoder_name", "encode_jpeg"]
