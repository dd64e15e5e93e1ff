"""Live-server probe: the first-frame latency and generation fps of `causal-dit serve` as the server
itself reports them, over a real WebSocket, for a few sessions run one after another (the first
compiles, the later ones are warm); prints a table and the server's log lines about each session.

    python benchmarks/serve_probe.py --model embedded --sessions 3 --json out.json
    python benchmarks/serve_probe.py --model random-1.3b [--decoder taehv] --json out.json
    python benchmarks/serve_probe.py --checkpoint DIR [--frames 81 --height 480 --width 832] --json out.json

--model embedded: the package's trained default (33 frames at 128x192); random-1.3b: random bf16
weights of the real shapes (Wan2.1-T2V-1.3B DiT, umT5-XXL, the Wan2.1 VAE or taew2.1), untrained,
81 frames at 480x832 by default; --checkpoint: a folder from `causal-dit convert`. The app is the real
one (`create_app`, uvicorn, on 127.0.0.1 at a free port); the pipeline is made by the server from a
factory, as `causal-dit serve` makes it. Per session: the server's `first_frame` latency_s, its `done`
message (first_frame_s, fps: frames per second of device time after the first frames, frames, sent,
dropped), and on the client the wall time from the start message to the first JPEG and to `done`,
and the JPEGs received. The JSON: {"device", "date", "what", "settings", "load_s", "server_log",
"sessions": [...], "summary"}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pathlib
import statistics
import threading
import time

MODELS = ("embedded", "random-1.3b")
DEFAULT_PROMPT = "a red circle moving left on a white background"  # the embedded default's words
LOGGER = "causal_dit_jax.serve"  # the server's session lines (app.py, session.py, worker.py)


# ---------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked against the model's configs (no weights loaded); frames, height and
    width resolved to the model's default video where not given."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", choices=MODELS, default=None, help="default: embedded")
    which.add_argument("--checkpoint", default=None, help="a folder from `causal-dit convert`")
    ap.add_argument("--decoder", choices=("wan", "taehv"), default="wan")
    ap.add_argument(
        "--vae-dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="random-1.3b's decoder dtype (default bfloat16, as the bench's end to end)",
    )
    ap.add_argument("--frames", type=int, default=None, help="default: the model's default video")
    ap.add_argument("--height", type=int, default=None, help="with --width; default: the model's default size")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="every session's seed")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--sessions", type=int, default=3, help="one after another; the first compiles")
    ap.add_argument(
        "--playback-fps",
        type=int,
        default=1000,
        help="the rate the server paces frames at (the start message's fps; the page asks 16): high by "
        "default, so pacing does not hold back the client's timings",
    )
    ap.add_argument("--no-video", action="store_true", help="the server writes no mp4 (it does by default)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a session may take")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.model is None and args.checkpoint is None:
        args.model = "embedded"
    if args.vae_dtype is not None and args.model != "random-1.3b":
        ap.error("--vae-dtype is random-1.3b's (the embedded default and a checkpoint have their own)")
    args.vae_dtype = args.vae_dtype or "bfloat16"
    if args.sessions < 1:
        ap.error(f"--sessions must be >= 1, got {args.sessions}")
    if args.playback_fps < 1:
        ap.error(f"--playback-fps must be >= 1, got {args.playback_fps}")
    if args.timeout <= 0:
        ap.error(f"--timeout must be positive, got {args.timeout}")
    if (args.height is None) != (args.width is None):
        ap.error("give --height and --width together (or neither: the model's default size)")
    if args.json and not pathlib.Path(args.json).expanduser().absolute().parent.is_dir():
        ap.error(f"--json {args.json}: its folder does not exist")

    from causal_dit_jax.app.pipeline import video_spec
    from causal_dit_jax.app.serve.config import MAX_SEED, ServerConfig
    from causal_dit_jax.app.serve.protocol import ProtocolError, check_prompt
    from causal_dit_jax.model.config import InferenceConfig

    if not 0 <= args.seed <= MAX_SEED:
        ap.error(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    try:
        args.prompt = check_prompt(args.prompt, ServerConfig())
        model, decoder, size = model_configs(args)
        args.frames = size[0] if args.frames is None else args.frames
        args.default_size = args.height is None
        args.height, args.width = (size[1], size[2]) if args.height is None else (args.height, args.width)
        video_spec(args.frames, args.height, args.width, model, decoder, InferenceConfig().frames_per_chunk)
    except (ValueError, OSError, ProtocolError) as e:
        ap.error(str(e))
    return args


def model_configs(args):
    """(DiT config, decoder config, default (frames, height, width)) of the model the options name,
    read without weights (ValueError: the model cannot serve them, e.g. the embedded default with taehv)."""
    from causal_dit_jax.app.pipeline import DEFAULT_SIZE, pipeline_configs, pipeline_default_size

    if args.model == "random-1.3b":
        dit, _, vae, *_ = random_configs(args.decoder, args.vae_dtype)
        return dit, vae, DEFAULT_SIZE
    ckpt = args.checkpoint  # None: the embedded default
    model, decoder = pipeline_configs(ckpt, args.decoder)
    return model, decoder, pipeline_default_size(ckpt)


# ---------------------------------------------------------------------------------------- pipelines
def random_configs(decoder: str, vae_dtype: str, dit_preset: str = "wan2.1-t2v-1.3b", t5_preset: str = "umt5-xxl"):
    """The configs of random_pipeline: the DiT's and umT5's presets, and the decoder's real size
    in vae_dtype as the bench's end to end makes it (`bench.rollout.run_e2e`, first_frame_probe.py)."""
    from causal_dit_jax.autoencoders.taehv import get_taehv_preset
    from causal_dit_jax.autoencoders.wan_vae import get_vae_preset
    from causal_dit_jax.model.config import get_preset
    from causal_dit_jax.text.umt5 import get_t5_preset

    base = get_vae_preset("wan2.1") if decoder == "wan" else get_taehv_preset("taew2.1")
    return get_preset(dit_preset), get_t5_preset(t5_preset), base.replace(dtype=vae_dtype, param_dtype=vae_dtype)


def random_pipeline(decoder: str, vae_dtype: str = "bfloat16", seed: int = 0, **presets):
    """A `TextToVideoPipeline` of random weights, untrained, 81 x 480 x 832 by default: the DiT as
    `bench.run_dit_bench` makes it (`jax.jit(dit.init)`, bf16), the decoder as `bench.run_e2e`
    (`random_params(..., 7)`), and umT5 by its own `init` (the bench feeds the DiT a random text
    context instead; a server needs the encoder, and its time counts in the first frame); the
    tokenizer is bytes (the encoder's cost is its fixed text_len, whatever the ids).
    presets: dit_preset / t5_preset for `random_configs` (smaller ones for a test of this path)."""
    import jax

    from causal_dit_jax.app.pipeline import TextToVideoPipeline
    from causal_dit_jax.autoencoders.taehv import TAEHVDecoder
    from causal_dit_jax.autoencoders.wan_vae import WanVAE
    from causal_dit_jax.model.config import InferenceConfig
    from causal_dit_jax.model.dit import CausalWanDiT
    from causal_dit_jax.model.random_params import random_params
    from causal_dit_jax.text.tokenizer import ByteTokenizer
    from causal_dit_jax.text.umt5 import UMT5Encoder

    dit_config, t5_config, vae_config = random_configs(decoder, vae_dtype, **presets)
    key = jax.random.key(seed)
    dit = CausalWanDiT(dit_config)
    t5 = UMT5Encoder(t5_config)
    vae = WanVAE(vae_config) if decoder == "wan" else TAEHVDecoder(vae_config)
    return TextToVideoPipeline(
        dit,
        jax.jit(dit.init)(key),
        t5,
        jax.jit(t5.init)(jax.random.fold_in(key, 1)),
        ByteTokenizer(max_length=t5_config.text_len),
        vae,
        random_params(vae.abstract_params(), 7),
        InferenceConfig(),
        untrained=True,
    )


def pipeline_factory(args):
    """decoder -> pipeline, for `create_app` (it makes the first before it listens, and logs the time)."""
    from causal_dit_jax.app.pipeline import TextToVideoPipeline

    def make(decoder: str):
        if args.model == "random-1.3b":
            return random_pipeline(decoder, args.vae_dtype)
        if args.model == "embedded":
            return TextToVideoPipeline.embedded_default(decoder=decoder)
        return TextToVideoPipeline.from_checkpoint(args.checkpoint, decoder=decoder)

    return make


# ---------------------------------------------------------------------------------------- the server
class LogLines(logging.Handler):
    """The server's log lines, kept (time, text) and echoed to stderr as `causal-dit serve` shows them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []
        self._echo = logging.StreamHandler()
        self._echo.setFormatter(self.formatter)

    def emit(self, record) -> None:
        self.lines.append(self.format(record))
        self._echo.emit(record)

    def about(self, session_id: str) -> list[str]:
        return [line for line in self.lines if session_id in line]


@contextlib.contextmanager
def capture_server_log():
    log = logging.getLogger(LOGGER)
    handler, level = LogLines(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@contextlib.contextmanager
def running_server(app, config):
    """uvicorn serving the app in a daemon thread; yields (server, 'ws://127.0.0.1:PORT/ws')."""
    import uvicorn

    from causal_dit_jax.app.serve import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield server, f"ws://{host}:{port}/ws"
    finally:
        server.should_exit = True
        thread.join(60)


def run_session(url: str, args, manager, log: LogLines, index: int) -> dict:
    """One session over a WebSocket: hello, start, every frame until done; the server's and the
    client's figures and the server's log lines about it."""
    from websockets.sync.client import connect

    deadline = time.monotonic() + args.timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"session {index} took over --timeout {args.timeout:g} s")
        return remaining

    start = {
        "type": "start",
        "prompt": args.prompt,
        "seed": args.seed,
        "frames": args.frames,
        "fps": args.playback_fps,
        "decoder": args.decoder,
    }
    jpegs, jpeg_bytes, not_jpeg = 0, 0, 0
    first_jpeg = last_jpeg = first_frame_msg = None
    latency = done = done_at = None
    # no client pings: the first session's compilation may keep the server busy for minutes
    with connect(url, proxy=None, compression=None, max_size=2**24, ping_interval=None, legacy=True) as ws:
        hello = json.loads(ws.recv(left()))
        if hello.get("type") != "hello":
            raise RuntimeError(f"the server answered {hello} instead of hello")
        sid = hello["session"]
        t0 = time.perf_counter()
        ws.send(json.dumps(start))
        while done is None:
            m = ws.recv(left())
            now = time.perf_counter() - t0
            if isinstance(m, bytes):
                jpegs, jpeg_bytes, not_jpeg = jpegs + 1, jpeg_bytes + len(m), not_jpeg + (not m.startswith(b"\xff\xd8"))
                first_jpeg = now if first_jpeg is None else first_jpeg
                last_jpeg = now
                continue
            status = json.loads(m)
            kind = status.get("type")
            if kind == "error":
                raise RuntimeError(f"session {index}: the server said: {status['message']}")
            if kind == "first_frame":
                latency, first_frame_msg = status["latency_s"], now
            elif kind == "done":
                done, done_at = status, now
    closing = time.monotonic() + 30  # its 'closed' line comes once the server has cleaned it up
    while sid in manager.sessions and time.monotonic() < closing:
        time.sleep(0.02)
    client_fps = (jpegs - 1) / (last_jpeg - first_jpeg) if jpegs > 1 and last_jpeg > first_jpeg else None
    return {
        "session": index,
        "warm": index > 0,
        "id": sid,
        "first_frame_latency_s": latency,
        "done": {k: done.get(k) for k in ("reason", "first_frame_s", "fps", "frames", "sent", "dropped")},
        "client": {
            "first_frame_message_s": first_frame_msg,
            "first_jpeg_s": first_jpeg,
            "done_s": done_at,
            "jpegs": jpegs,
            "not_jpeg": not_jpeg,
            "jpeg_kb_mean": None if not jpegs else round(jpeg_bytes / jpegs / 1024, 1),
            "fps_after_first": client_fps,
        },
        "server_log": log.about(sid),
    }


# ---------------------------------------------------------------------------------------- report
def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(sessions: list[dict]) -> str:
    head = (
        "session",
        "server first frame s",
        "done first_frame_s",
        "server fps",
        "frames",
        "sent",
        "dropped",
        "JPEGs",
        "client first JPEG s",
        "client done s",
        "client fps",
    )
    rows = [head]
    for s in sessions:
        d, c = s["done"], s["client"]
        rows.append(
            (
                f"{s['session']} ({'warm' if s['warm'] else 'cold'})",
                _f(s["first_frame_latency_s"], ".3f"),
                _f(d["first_frame_s"], ".3f"),
                _f(d["fps"], ".2f"),
                str(d["frames"]),
                str(d["sent"]),
                str(d["dropped"]),
                str(c["jpegs"]),
                _f(c["first_jpeg_s"], ".3f"),
                _f(c["done_s"], ".3f"),
                _f(c["fps_after_first"], ".2f"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows)


def summary(sessions: list[dict]) -> dict:
    """Medians of the warm sessions' figures (None with one session)."""
    warm = [s for s in sessions if s["warm"]]

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    return {
        "warm_sessions": len(warm),
        "warm_first_frame_s_median": median(s["done"]["first_frame_s"] for s in warm),
        "warm_fps_median": median(s["done"]["fps"] for s in warm),
        "warm_client_first_jpeg_s_median": median(s["client"]["first_jpeg_s"] for s in warm),
        "cold_first_frame_s": sessions[0]["done"]["first_frame_s"],
    }


def main(argv=None) -> dict:
    """Serve the model, run the sessions, print the table; return (and with --json write) the record."""
    args = parse_args(argv)
    from causal_dit_jax.app.serve import ServerConfig, create_app
    from causal_dit_jax.bench.results import device_kind, utc_date, write_json

    config = ServerConfig(
        port=0,  # any free port
        max_frames=max(ServerConfig.max_frames, args.frames),
        height=None if args.default_size else args.height,
        width=None if args.default_size else args.width,
        max_fps=max(ServerConfig.max_fps, args.playback_fps),
        decoders=(args.decoder,),
        record_video=not args.no_video,
    )
    model = args.model or f"checkpoint {args.checkpoint}"
    size = f"{args.frames} frames at {args.height}x{args.width}"
    print(f"serving {model} ({args.decoder} decoder): {args.sessions} session(s) of {size}", flush=True)
    with capture_server_log() as log:
        t = time.perf_counter()
        app = create_app(pipeline_factory(args), config)  # the pipeline is made (and logged) here
        load_s = time.perf_counter() - t
        hello = app.state.info
        if (hello["height"], hello["width"]) != (args.height, args.width):
            raise RuntimeError(f"the server serves {hello['height']}x{hello['width']}, not {args.height}x{args.width}")
        with running_server(app, app.state.config) as (_, url):
            sessions = []
            for i in range(args.sessions):
                sessions.append(run_session(url, args, app.state.manager, log, i))
        ids = [s["id"] for s in sessions]
        server_log = [line for line in log.lines if not any(sid in line for sid in ids)]
    print()
    print(format_table(sessions))
    print("\nthe server's log, before the sessions:")
    for line in server_log:
        print(f"  {line}")
    for s in sessions:
        print(f"\nsession {s['session']} ({s['id']}), the server's log:")
        for line in s["server_log"]:
            print(f"  {line}")
    settings = {
        "model": args.model,
        "checkpoint": args.checkpoint,
        "decoder": args.decoder,
        "vae_dtype": args.vae_dtype if args.model == "random-1.3b" else None,
        "untrained": hello["untrained"],
        "frames": args.frames,
        "height": args.height,
        "width": args.width,
        "seed": args.seed,
        "prompt": args.prompt,
        "sessions": args.sessions,
        "playback_fps": args.playback_fps,
        "record_video": config.record_video,
        "queue_frames": config.queue_frames,
        "jpeg_quality": config.jpeg_quality,
    }
    what = (
        f"the live server's first-frame latency and generation fps as it reports them (benchmarks/serve_probe.py): "
        f"{model}, {args.decoder} decoder, {args.frames} frames at {args.height}x{args.width}, {args.sessions} "
        "sessions one after another over a WebSocket (the first compiles)"
    )
    fields = {
        "what": what,
        "settings": settings,
        "load_s": load_s,
        "server_log": server_log,
        "sessions": sessions,
        "summary": summary(sessions),
    }
    if args.json:
        return write_json(args.json, **fields)
    return {"device": device_kind(), "date": utc_date(), **fields}


if __name__ == "__main__":
    main()
