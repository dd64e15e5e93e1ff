"""The WebSocket protocol: the page's JSON control messages, parsed and checked, and the server's
status messages.

Page -> server (text, JSON):
  {"type": "start", "prompt": str, "seed"?: int, "frames"?: int, "fps"?: number, "decoder"?: str,
   "switch"?: "recache" | "cut" | "keep"}
  {"type": "prompt", "prompt": str}   switch the playing video's prompt at its next chunk
  {"type": "pause"} / {"type": "resume"} / {"type": "stop"}
Server -> page: each frame as one binary message holding a JPEG, and JSON status messages (text):
  hello      on connecting: session (its id), decoders, frames (the default), frame_counts, height,
             width, model_fps, max_fps, max_prompt_length, queue_frames, switch_modes, switch, untrained
  busy       max_sessions are open; the socket is then closed (code 1013)
  error      message: why a message was refused, or why a generation failed
  started    prompt, seed, frames, height, width, fps, decoder, switch
  first_frame  latency_s: start -> first frames (with compilation for a new size)
  stats      generated, sent, buffered (frames queued on the server), dropped (stale), fps (generation)
  prompt     prompt, dropped: a switch taken (applied at the next chunk)
  switched   prompt, chunk, frame: the frames from here on follow it (in order among the frames)
  paused / resumed
  done       reason ('finished', 'stopped', 'error'), frames, first_frame_s, fps, sent, dropped,
             video (the mp4's URL, or None)
"""

from __future__ import annotations

import dataclasses
import json
import math

from causal_dit_jax.app.serve.config import MAX_SEED, SWITCH_MODES, ServerConfig


class ProtocolError(ValueError):
    """A message the server refuses, with the text the page shows."""


@dataclasses.dataclass(frozen=True)
class Start:
    prompt: str
    seed: int
    frames: int | None  # None: the model's default length
    fps: float  # playback rate the frames are sent at
    decoder: str
    switch: str  # what a prompt switch does to the KV cache (SWITCH_MODES)


@dataclasses.dataclass(frozen=True)
class PromptChange:
    prompt: str


@dataclasses.dataclass(frozen=True)
class Control:
    type: str  # 'pause', 'resume' or 'stop'


Message = Start | PromptChange | Control
_FIELDS = {
    "start": {"type", "prompt", "seed", "frames", "fps", "decoder", "switch"},
    "prompt": {"type", "prompt"},
    "pause": {"type"},
    "resume": {"type"},
    "stop": {"type"},
}


def max_message_chars(config: ServerConfig) -> int:
    """The longest control message taken (a start with the longest prompt, JSON-escaped, fits)."""
    return 6 * config.max_prompt_length + 1024


def parse_message(text: str, config: ServerConfig) -> Message:
    """One control message from the page, checked field by field (ProtocolError names what is wrong)."""
    if len(text) > max_message_chars(config):
        raise ProtocolError(f"message too long ({len(text)} characters; at most {max_message_chars(config)})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"not JSON: {e.msg} at character {e.pos}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"a message is a JSON object with a 'type', got {type(data).__name__}")
    kind = data.get("type")
    if kind not in _FIELDS:
        raise ProtocolError(f"unknown message type {kind!r}; expected one of {sorted(_FIELDS)}")
    unknown = sorted(set(data) - _FIELDS[kind])
    if unknown:
        raise ProtocolError(f"unknown field(s) {unknown} in a {kind!r} message; it takes {sorted(_FIELDS[kind] - {'type'})}")
    if kind == "prompt":
        return PromptChange(check_prompt(data.get("prompt"), config))
    if kind != "start":
        return Control(kind)
    seed = _whole(data.get("seed", 0), "seed", 0, MAX_SEED)
    frames = data.get("frames")
    frames = None if frames is None else _whole(frames, "frames", 1, config.max_frames)
    fps = data.get("fps", config.model_fps)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or not 0 < fps <= config.max_fps:
        raise ProtocolError(f"fps (playback frames per second) must be a number in (0, {config.max_fps}], got {fps!r}")
    decoder = data.get("decoder", config.decoders[0])
    if decoder not in config.decoders:
        raise ProtocolError(f"decoder {decoder!r} is not offered here; choose one of {list(config.decoders)}")
    switch = data.get("switch", config.switch)
    if switch not in SWITCH_MODES:
        raise ProtocolError(f"switch {switch!r} is not a switch mode; choose one of {list(SWITCH_MODES)}")
    return Start(check_prompt(data.get("prompt"), config), seed, frames, float(fps), decoder, switch)


def check_prompt(prompt, config: ServerConfig) -> str:
    """The prompt, stripped: a non-empty string of at most max_prompt_length characters."""
    if not isinstance(prompt, str):
        raise ProtocolError(f"the prompt must be text, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if not prompt:
        raise ProtocolError("the prompt is empty: describe the video")
    if len(prompt) > config.max_prompt_length:
        raise ProtocolError(f"the prompt is {len(prompt)} characters long; at most {config.max_prompt_length}")
    return prompt


def _whole(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{name} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise ProtocolError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def error(message: str) -> dict:
    return {"type": "error", "message": message}


__all__ = [
    "Control",
    "Message",
    "PromptChange",
    "ProtocolError",
    "Start",
    "check_prompt",
    "error",
    "max_message_chars",
    "parse_message",
]
