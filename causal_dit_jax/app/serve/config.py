"""The server's settings: one frozen dataclass, checked when made."""

from __future__ import annotations

import dataclasses

from causal_dit_jax.app.video import SAMPLE_FPS

MAX_SEED = 2**31 - 1
# what a prompt switch does to the KV cache: the stream's (recache, recache_chunks)
SWITCH_MODES = {
    "recache": (True, None),  # re-run the chunks the cache attends with the new prompt (LongLive)
    "cut": (True, 0),  # the next chunk starts a new stream from the new prompt alone (a new sink)
    "keep": (False, None),  # the keys made under the old prompt stay
}


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How `causal-dit serve` runs.

    host, port: where it listens (loopback by default: reachable from this machine only).
    max_sessions: WebSocket sessions at once; one more is answered "busy" and closed.
    queue_frames: frames a session's socket may hold ready ahead of playback. When full, its
    generation waits (so it runs at most this far ahead of what the page shows, and a prompt switch
    shows within this many frames plus one chunk); a prompt switch or stop drops the queued frames.
    device_users: generations that may run a step on the device at once (1: the sessions take turns,
    one decoded frame batch each).
    max_prompt_length: characters of a prompt.
    max_frames: frames of one video (the pipeline's own rules decide which counts fit).
    height, width: the videos' size (None: the model's default).
    model_fps: the model's frame rate: the mp4's and the default playback rate.
    max_fps: the fastest playback a page may ask for.
    jpeg_quality: the frames' JPEG quality (1-95).
    decoders: the decoders a page may choose, the first the default (with a factory; a pipeline
    given as is offers its own).
    switch: what a prompt switch does by default (a page may choose another): one of SWITCH_MODES.
    record_video: write each video to an mp4 the page may download (deleted when its session ends).
    stats_interval_s: how often a playing session reports its counters.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_sessions: int = 4
    queue_frames: int = 16
    device_users: int = 1
    max_prompt_length: int = 400
    max_frames: int = 481
    height: int | None = None
    width: int | None = None
    model_fps: int = SAMPLE_FPS
    max_fps: int = 60
    jpeg_quality: int = 85
    decoders: tuple[str, ...] = ("wan",)
    switch: str = "recache"
    record_video: bool = True
    stats_interval_s: float = 0.25

    def __post_init__(self):
        positive = ("max_sessions", "queue_frames", "device_users", "max_prompt_length", "max_frames", "model_fps", "max_fps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerConfig.{name} must be a positive integer, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port must be in [0, 65535] (0: any free port), got {self.port}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"ServerConfig.jpeg_quality must be in [1, 95], got {self.jpeg_quality}")
        if (self.height is None) != (self.width is None):
            raise ValueError("give ServerConfig.height and width together (or neither: the model's default)")
        if not self.decoders or len(set(self.decoders)) != len(self.decoders):
            raise ValueError(f"ServerConfig.decoders must name at least one decoder, each once, got {self.decoders}")
        if self.switch not in SWITCH_MODES:
            raise ValueError(f"ServerConfig.switch must be one of {list(SWITCH_MODES)}, got {self.switch!r}")
        if self.stats_interval_s <= 0:
            raise ValueError(f"ServerConfig.stats_interval_s must be positive, got {self.stats_interval_s}")

    def replace(self, **kw) -> ServerConfig:
        return dataclasses.replace(self, **kw)


__all__ = ["MAX_SEED", "SWITCH_MODES", "ServerConfig"]
