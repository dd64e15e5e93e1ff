"""Our bench figures against a peer's measured ones (`causal-dit bench --compare FILE.json`).

A peer file (e.g. `benchmarks/peers/*.json`) is one JSON object:

    {"name": "Self-Forcing PyTorch, eager, H200 (2026-12-01)",     # required: who measured what, where
     "figures": {"dit_s": 2.749, "e2e_fps_wan": 18.4},              # required: at least one figure
     "source": "where the figures come from",                       # optional
     "setting": {"preset": "wan2.1-t2v-1.3b", "latent_frames": 21,  # optional: the bench refuses to
                 "height": 480, "width": 832},                      #   compare a run of another setting
     "notes": ["how a figure was measured", ...]}                   # optional

The figure names (`FIGURES`; the unit is the name's suffix: _s seconds, _ms milliseconds, _fps
frames per second), each read from our `BenchResult` (`run_dit_bench`; the decoders' figures from its
`run_e2e` results, which `--e2e` runs):

    dit_s               BenchResult.total_s: the DiT rollout, every forward (cache fill of the last chunk included)
    dit_fps             BenchResult.frames_per_second: video frames / DiT rollout time
    first_chunk_ms      BenchResult.first_chunk_ms: the first chunk's denoising forwards
    vae_decode_s        vae["decode_total_s"]: the Wan VAE's streaming decode of the whole video
    first_frame_s       vae["first_frame_s"]: encoded prompt -> first frames on the host, Wan VAE
    e2e_fps_wan         vae["e2e_fps"]: end to end frames/s, DiT + Wan VAE
    tiny_decode_s       tiny_vae["decode_total_s"]: the tiny TAEHV decoder's streaming decode
    first_frame_tiny_s  tiny_vae["first_frame_s"]: first frame with the tiny decoder
    e2e_fps_tiny        tiny_vae["e2e_fps"]: end to end frames/s, DiT + tiny decoder

Each row's `speedup` is oriented so that > 1 means we are faster: theirs / ours for a time,
ours / theirs for a rate.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Figure:
    label: str
    kind: str  # "time" (lower is faster) or "rate" (higher is faster)
    read: Callable[[Any], float | None]  # the figure from a BenchResult (None: not measured in this run)


def _decoder(attr: str, key: str) -> Callable[[Any], float | None]:
    def read(result) -> float | None:
        measured = getattr(result, attr)
        return None if not measured else measured[key]

    return read


FIGURES: dict[str, Figure] = {
    "dit_s": Figure("DiT rollout (s)", "time", lambda r: r.total_s),
    "dit_fps": Figure("video frames / s, DiT only", "rate", lambda r: r.frames_per_second),
    "first_chunk_ms": Figure("first chunk (ms)", "time", lambda r: r.first_chunk_ms),
    "vae_decode_s": Figure("Wan VAE decode, streaming (s)", "time", _decoder("vae", "decode_total_s")),
    "first_frame_s": Figure("first frame, Wan VAE (s)", "time", _decoder("vae", "first_frame_s")),
    "e2e_fps_wan": Figure("end to end, DiT + Wan VAE (frames/s)", "rate", _decoder("vae", "e2e_fps")),
    "tiny_decode_s": Figure("tiny decoder decode, streaming (s)", "time", _decoder("tiny_vae", "decode_total_s")),
    "first_frame_tiny_s": Figure("first frame, tiny decoder (s)", "time", _decoder("tiny_vae", "first_frame_s")),
    "e2e_fps_tiny": Figure("end to end, DiT + tiny decoder (frames/s)", "rate", _decoder("tiny_vae", "e2e_fps")),
}
SETTING_KEYS = ("preset", "latent_frames", "height", "width")
PEER_KEYS = ("name", "figures", "source", "setting", "notes")


@dataclasses.dataclass(frozen=True)
class Peer:
    """A peer's measured figures (`FIGURES` names), from a peer file (`load_peer`)."""

    name: str
    figures: dict[str, float]
    source: str = ""
    setting: dict = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def check_setting(self, **ours) -> None:
        """Refuse a run whose setting (`SETTING_KEYS`) differs from the one the peer measured."""
        differ = [f"{k}: ours {ours[k]!r}, theirs {v!r}" for k, v in self.setting.items() if k in ours and ours[k] != v]
        if differ:
            raise ValueError(
                f"peer {self.name!r} measured another setting ({'; '.join(differ)}): run the bench in its setting to compare"
            )


def peer_from_dict(data: Any, origin: str = "peer") -> Peer:
    """Validate a peer file's object (see the module docstring); errors name the valid keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{origin}: a peer file holds one JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(PEER_KEYS))
    if unknown:
        raise ValueError(f"{origin}: unknown keys {unknown}; a peer file has {list(PEER_KEYS)}")
    if not isinstance(data.get("name"), str) or not data["name"].strip():
        raise ValueError(f"{origin}: 'name' (who measured what, where) is required")
    figures = data.get("figures")
    if not isinstance(figures, dict) or not figures:
        raise ValueError(f"{origin}: 'figures' must be a non-empty object of figures, valid names: {list(FIGURES)}")
    unknown = sorted(set(figures) - set(FIGURES))
    if unknown:
        raise ValueError(f"{origin}: unknown figures {unknown}; valid figure names: {list(FIGURES)}")
    for k, v in figures.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{origin}: figure {k!r} must be a positive number, got {v!r}")
    setting = data.get("setting", {})
    if not isinstance(setting, dict) or set(setting) - set(SETTING_KEYS):
        raise ValueError(f"{origin}: 'setting' must be an object with keys among {list(SETTING_KEYS)}, got {setting!r}")
    notes = data.get("notes", [])
    notes = [notes] if isinstance(notes, str) else list(notes)
    return Peer(
        name=data["name"],
        figures={k: float(v) for k, v in figures.items()},
        source=str(data.get("source", "")),
        setting=dict(setting),
        notes=tuple(str(n) for n in notes),
    )


def load_peer(path: str | os.PathLike) -> Peer:
    """Read and validate a peer file (raises ValueError, naming the valid keys, or FileNotFoundError)."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
    return peer_from_dict(data, str(path))


def measured_figures(result) -> dict[str, float]:
    """Our figures (`FIGURES` names) from a BenchResult: those this run measured."""
    out = {}
    for name, fig in FIGURES.items():
        value = fig.read(result)
        if value is not None:
            out[name] = float(value)
    return out


def speedup(name: str, ours: float, theirs: float) -> float:
    """> 1: we are faster (theirs / ours for a time figure, ours / theirs for a rate)."""
    return theirs / ours if FIGURES[name].kind == "time" else ours / theirs


def compare(ours: Mapping[str, float], peer: Peer) -> dict:
    """{"name", "source", "figures": {figure: {"ours", "theirs", "speedup"}}} for each of the peer's
    figures; "ours" and "speedup" are None for a figure this run did not measure."""
    rows = {}
    for name, theirs in peer.figures.items():
        mine = ours.get(name)
        rows[name] = {"ours": mine, "theirs": theirs, "speedup": None if mine is None else speedup(name, mine, theirs)}
    return {"name": peer.name, "source": peer.source, "figures": rows}


def comparison_table(comparison: dict) -> str:
    """The rows of `compare` as text: figure, ours, theirs, speed-up."""
    head = ("figure", "ours", "theirs", "speed-up (>1: ours faster)")
    rows = []
    for name, r in comparison["figures"].items():
        ours = "not measured" if r["ours"] is None else f"{r['ours']:.4g}"
        ratio = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        rows.append((FIGURES[name].label, ours, f"{r['theirs']:.4g}", ratio))
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(3)]
    lines = [f"compared with {comparison['name']}"]
    for row in [head, *rows]:
        lines.append("  ".join(f"{c:<{w}}" for c, w in zip(row[:3], widths)) + "  " + row[3])
    return "\n".join(lines)


__all__ = [
    "FIGURES",
    "Figure",
    "Peer",
    "compare",
    "comparison_table",
    "load_peer",
    "measured_figures",
    "peer_from_dict",
    "speedup",
]
