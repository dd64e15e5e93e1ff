"""`causal-dit serve` without a browser: a real uvicorn server on a free loopback port, driven over its
WebSocket (the protocol, the session limit, bad input, stop, pause, disconnects, isolation, pacing,
memory over consecutive sessions) and HTTP (the page, the mp4 download)."""

import concurrent.futures
import gc
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from serve_fixtures import FRAMES, Client, decode_jpeg, embedded_pipeline, serving

from causal_dit_jax.app.serve import ServerConfig, create_app, uvicorn_config

RED, BLUE = "a red square moving right", "a blue circle moving left"
RED_SQUARE, BLUE_SQUARE = "a red square moving right", "a blue square moving right"
SWITCH_FRAMES = 45  # 4 chunks: a cut at chunk 1, blue two chunks later (chunk 3, frames 33-44)
CONFIG = ServerConfig(max_sessions=2, max_fps=60, queue_frames=16)
JPEG_ERROR = 4.0  # mean |difference| (0-255) of a JPEG'd frame (quality 85) from the frame itself


@pytest.fixture(scope="module")
def server():
    with serving(CONFIG) as s:
        yield s


@pytest.fixture(scope="module")
def red(server):
    """One whole session: its statuses, its frames decoded, and its mp4 downloaded before it closed."""
    with Client(server) as c:
        hello = c.until("hello")
        c.send({"type": "start", "prompt": RED, "seed": 1, "frames": FRAMES, "fps": 60})
        done = c.until("done")
        with urllib.request.urlopen(server.url + done["video"]) as r:
            mp4 = r.read()
        video_dir = server.manager.get(hello["session"]).dir
    return {"hello": hello, "statuses": c.statuses, "frames": [decode_jpeg(f) for f in c.frames], "mp4": mp4, "dir": video_dir}


def reference(prompt: str, seed: int, frames: int = FRAMES) -> np.ndarray:
    return embedded_pipeline().generate(prompt, frames, seed=seed)[0]


def mean_diff(a, b) -> float:
    return float(np.mean(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def run(client: Client, **start) -> dict:
    client.send({"type": "start", "fps": 60, **start})
    return client.until("done")


def test_a_session_streams_jpeg_frames_in_order_then_done(red):
    hello = red["hello"]
    assert hello["decoders"] == ["wan"] and hello["frames"] == FRAMES and (hello["height"], hello["width"]) == (128, 192)
    assert hello["frame_counts"][:3] == [9, 21, 33] and hello["model_fps"] == 16 and not hello["untrained"]
    kinds = [s["type"] for s in red["statuses"] if s["type"] != "stats"]
    assert kinds == ["hello", "started", "first_frame", "done"]
    done = red["statuses"][-1]
    assert done["reason"] == "finished" and done["frames"] == done["sent"] == FRAMES and done["dropped"] == 0
    assert done["first_frame_s"] > 0 and done["fps"] > 0
    frames = red["frames"]
    assert len(frames) == FRAMES and all(f.shape == (128, 192, 3) for f in frames)
    assert mean_diff(frames[0], frames[-1]) > 2, "the frames should change over time (the square moves)"
    # the frames are the pipeline's own for this prompt and seed (up to JPEG), in order
    assert mean_diff(np.stack(frames), reference(RED, 1)) < JPEG_ERROR
    stats = [s for s in red["statuses"] if s["type"] == "stats"]
    assert stats and all(0 <= s["buffered"] <= CONFIG.queue_frames for s in stats)


def test_the_mp4_has_every_frame_at_the_models_fps_and_goes_with_its_session(red, server, tmp_path):
    import imageio.v2 as imageio

    from causal_dit_jax.app.video import read_mp4
    from causal_dit_jax.ffmpeg import ffmpeg_without_preexec

    path = tmp_path / "video.mp4"
    path.write_bytes(red["mp4"])
    video = read_mp4(path)
    assert video.shape == (FRAMES, 128, 192, 3)
    with ffmpeg_without_preexec(), imageio.get_reader(str(path)) as r:
        assert r.get_meta_data()["fps"] == 16
    assert mean_diff(video, np.stack(red["frames"])) < 2 * JPEG_ERROR
    # the session has ended: its folder is gone and its video no longer served
    assert not red["dir"].exists()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{server.url}/sessions/{red['hello']['session']}/video.mp4")
    assert e.value.code == 404


def test_one_session_past_the_limit_is_told_busy(server):
    from websockets.exceptions import ConnectionClosed

    with Client(server) as a, Client(server) as b:
        a.until("hello"), b.until("hello")
        with Client(server) as c:
            busy = c.recv()
            assert busy["type"] == "busy" and "busy" in busy["message"] and "2 sessions" in busy["message"]
            with pytest.raises(ConnectionClosed):
                c.recv(5)
            assert c.ws.close_code == 1013
    server.wait_sessions(0)
    with Client(server) as d:  # a freed place is taken again
        assert d.until("hello")["type"] == "hello"


@pytest.mark.parametrize(
    "message, says",
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ({"type": "dance"}, "unknown message type 'dance'"),
        ({"prompt": RED}, "unknown message type None"),
        ({"type": "start", "prompt": ""}, "the prompt is empty"),
        ({"type": "start", "prompt": "   "}, "the prompt is empty"),
        ({"type": "start", "prompt": 7}, "the prompt must be text"),
        ({"type": "start", "prompt": "x" * 401}, "401 characters long; at most 400"),
        ({"type": "start", "prompt": RED, "frames": 34}, "34 frames do not fit the decoder"),
        ({"type": "start", "prompt": RED, "frames": 25}, "not a multiple of the chunk size"),
        ({"type": "start", "prompt": RED, "frames": 0}, "frames must be in [1, 481]"),
        ({"type": "start", "prompt": RED, "frames": 100000}, "frames must be in [1, 481]"),
        ({"type": "start", "prompt": RED, "frames": "33"}, "frames must be a whole number"),
        ({"type": "start", "prompt": RED, "seed": -1}, "seed must be in [0, 2147483647]"),
        ({"type": "start", "prompt": RED, "seed": 1.5}, "seed must be a whole number"),
        ({"type": "start", "prompt": RED, "fps": 0}, "fps (playback frames per second) must be"),
        ({"type": "start", "prompt": RED, "fps": 1000}, "must be a number in (0, 60]"),
        ({"type": "start", "prompt": RED, "decoder": "taehv"}, "decoder 'taehv' is not offered here; choose one of ['wan']"),
        ({"type": "start", "prompt": RED, "steps": 2}, "unknown field(s) ['steps']"),
        ({"type": "start", "prompt": RED, "switch": "blend"}, "switch 'blend' is not a switch mode"),
        ({"type": "prompt", "prompt": RED}, "nothing is playing"),
        ({"type": "pause"}, "nothing is playing"),
        ({"type": "prompt", "prompt": ""}, "the prompt is empty"),
        (b"\xff\xd8", "binary messages are not taken"),
        ("x" * 10_000, "message too long"),
    ],
)
def test_bad_input_is_answered_with_a_clear_error(server, message, says):
    with Client(server) as c:
        c.until("hello")
        c.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
        answer = c.recv(10)
        assert answer["type"] == "error" and says in answer["message"], answer
        c.send({"type": "stop"})  # the session still answers, and nothing was started
        assert c.recv(10) == {"type": "error", "message": "nothing is playing: press Start"}
        assert not c.frames


def test_stop_mid_stream_ends_within_one_chunk(server):
    with Client(server) as c:
        session = server.manager.get(c.until("hello")["session"])
        c.send({"type": "start", "prompt": RED, "frames": FRAMES, "fps": 60})
        while not c.frames:
            c.recv()
        made = session.generation.generated
        c.send({"type": "stop"})
        done = c.until("done")
        assert done["reason"] == "stopped" and done["frames"] < FRAMES
        assert done["frames"] <= made + 12, "at most one more chunk (12 frames) after the stop"
        session.generation.join(10)
        assert not session.generation.alive, "the generation thread (and the device) is free"
        assert done["video"] is not None  # the frames made so far, as an mp4
        c.send({"type": "start", "prompt": RED, "frames": 9, "fps": 60})  # and the session starts again
        assert c.until("done")["frames"] == 9


def test_pause_holds_the_generation_and_resume_finishes_it(server):
    with Client(server) as c:
        session = server.manager.get(c.until("hello")["session"])
        c.send({"type": "start", "prompt": RED, "frames": FRAMES, "fps": 60})
        while not c.frames:
            c.recv()
        c.send({"type": "pause"})
        c.until("paused")
        assert session.generation.holding.wait(60)  # the pull under way has ended; the next waits
        held, sent = session.generation.generated, len(c.frames)
        time.sleep(1.0)
        assert session.generation.generated == held and session.sent <= sent + 1
        c.send({"type": "resume"})
        done = c.until("done")
        assert done["reason"] == "finished" and len(c.frames) == FRAMES


def test_a_disconnect_frees_the_session_and_its_generation(server):
    c = Client(server)
    session = server.manager.get(c.until("hello")["session"])
    c.send({"type": "start", "prompt": RED, "frames": FRAMES, "fps": 60})
    while not c.frames:
        c.recv()
    c.ws.socket.close()  # the page goes away without a goodbye
    server.wait_sessions(0)
    assert not session.generation.alive and not session.dir.exists()
    with Client(server) as d:  # the device is free for the next one
        d.until("hello")
        assert run(d, prompt=RED, frames=9)["frames"] == 9


def test_two_sessions_at_once_each_get_their_own_frames(server):
    def session(prompt: str, seed: int):
        with Client(server) as c:
            c.until("hello")
            run(c, prompt=prompt, seed=seed, frames=FRAMES)
            return [decode_jpeg(f) for f in c.frames]

    server.wait_sessions(0)  # an earlier test's closed session is cleaned up asynchronously: both places free
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(session, RED, 3), pool.submit(session, BLUE, 4)
        a, b = np.stack(a.result(900)), np.stack(b.result(900))  # one device user: one after the other, on a busy CI
    ra, rb = reference(RED, 3), reference(BLUE, 4)
    assert a.shape == b.shape == (FRAMES, 128, 192, 3)
    assert mean_diff(a, ra) < JPEG_ERROR and mean_diff(b, rb) < JPEG_ERROR
    assert mean_diff(ra, rb) > 3 * JPEG_ERROR  # so a frame of the other session would show


def test_a_prompt_switch_mid_stream_is_followed_from_the_next_chunk(server, tmp_path):
    """Red, switched to blue (a cut) as it starts playing: the stream's first chunk boundary takes the new
    prompt, the frames are the pipeline's own for that schedule (the mp4 has them all; the page got all
    but the stale ones dropped at the switch), and the object ends blue (two chunks after a cut, on the
    embedded default). The browser test switches once frames are on the screen."""
    from causal_dit_jax.app.video import read_mp4
    from causal_dit_jax.bench.prompt_following import read_clip

    with Client(server) as c:
        c.until("hello")
        c.send({"type": "start", "prompt": RED_SQUARE, "seed": 0, "frames": SWITCH_FRAMES, "fps": 60, "switch": "cut"})
        c.send({"type": "prompt", "prompt": BLUE_SQUARE})  # before chunk 1, whenever the first frames come
        ack, switched, done = c.until("prompt"), c.until("switched"), c.until("done")
        with urllib.request.urlopen(server.url + done["video"]) as r:
            (tmp_path / "switch.mp4").write_bytes(r.read())
    assert ack["prompt"] == switched["prompt"] == BLUE_SQUARE
    chunk = switched["chunk"]
    assert chunk == 1 and switched["frame"] == 9  # chunk 0's frames were made with the first prompt
    assert done["reason"] == "finished" and done["frames"] == SWITCH_FRAMES
    assert len(c.frames) == SWITCH_FRAMES - ack["dropped"] == done["sent"]
    video = read_mp4(tmp_path / "switch.mp4")
    want = embedded_pipeline().generate(
        RED_SQUARE, SWITCH_FRAMES, seed=0, prompt_schedule=[(chunk, BLUE_SQUARE)], recache_chunks=0
    )[0]
    assert video.shape == want.shape and mean_diff(video, want) < 2 * JPEG_ERROR
    assert mean_diff(decode_jpeg(c.frames[-1]), want[-1]) < JPEG_ERROR
    assert read_clip(video[:9])["colour"] == "red" and read_clip(video[-12:])["colour"] == "blue"


def test_frames_are_paced_at_the_playback_rate(server):
    with Client(server) as c:
        c.until("hello")
        c.send({"type": "start", "prompt": RED, "frames": 9, "fps": 4})
        times = []
        while True:
            m = c.recv()
            if isinstance(m, bytes):
                times.append(time.monotonic())
            elif m["type"] == "done":
                break
        # 8 intervals of 1/4 s (made in well under a second, unpaced they would come together)
        assert len(times) == 9 and times[-1] - times[0] >= 0.75 * 8 / 4
        assert max(s["buffered"] for s in c.of("stats")) > 0  # made ahead, held for playback


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_memory_stays_flat_over_ten_consecutive_sessions(server):
    """The server's own memory (Python objects and arrays: frames, JPEGs, outboxes, sessions, traced by
    tracemalloc) stays within 2 MB over 10 sessions, every session and generation is freed, no thread
    or temp folder is left. RSS is bounded loosely: XLA's CPU runtime (8 simulated devices) grows it
    with `pipeline.generate` alone by some 10-20 MB a run before it levels off, server or not."""
    import threading
    import tracemalloc
    import weakref

    refs = []

    def one():
        with Client(server) as c:
            session = server.manager.get(c.until("hello")["session"])
            assert run(c, prompt=RED, seed=5, frames=9)["frames"] == 9
            refs.extend([weakref.ref(session), weakref.ref(session.generation)])
            folder, session = session.dir, None
        server.wait_sessions(0)
        assert not folder.exists()

    tracemalloc.start()
    try:
        for _ in range(2):  # compiled, caches and thread pools warm
            one()
        refs.clear()
        gc.collect()
        traced, rss, threads = tracemalloc.get_traced_memory()[0], _rss_mb(), threading.active_count()
        for _ in range(10):
            one()
        gc.collect()
        traced, rss = tracemalloc.get_traced_memory()[0] - traced, _rss_mb() - rss
    finally:
        tracemalloc.stop()
    assert traced < 2 * 2**20, f"the server's traced memory grew by {traced / 2**20:.2f} MB over 10 sessions"
    assert all(r() is None for r in refs), "a session or generation outlived its socket"
    assert threading.active_count() == threads
    assert rss < 250, f"RSS grew by {rss:.0f} MB over 10 sessions"
    print(f"10 sessions: traced memory {traced / 2**20:+.2f} MB, RSS {rss:+.0f} MB")


def test_the_page_is_served_self_contained(server):
    with urllib.request.urlopen(server.url + "/") as r:
        html = r.read().decode()
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert 'id="prompt"' in html and 'id="screen"' in html and "/static/app.js" in html
    for name in ("app.js", "style.css"):
        with urllib.request.urlopen(f"{server.url}/static/{name}") as r:
            text = r.read().decode()
        assert "http://" not in text and "https://" not in text  # nothing from elsewhere (no CDN)


def test_it_listens_on_loopback_by_default_and_refuses_other_sites_pages(server):
    from websockets.exceptions import InvalidStatus

    from causal_dit_jax.app.cli import build_parser

    assert ServerConfig().host == "127.0.0.1" and ServerConfig().port == 8000
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.checkpoint, args.decoder) == ("127.0.0.1", 8000, None, "wan")
    assert uvicorn_config(create_app(embedded_pipeline()), ServerConfig()).host == "127.0.0.1"
    assert server.address[0] == "127.0.0.1"
    with pytest.raises(InvalidStatus) as e:
        Client(server, origin="http://elsewhere.example")
    assert e.value.response.status_code == 403


def test_server_config_is_checked():
    with pytest.raises(ValueError, match="max_sessions must be a positive integer"):
        ServerConfig(max_sessions=0)
    with pytest.raises(ValueError, match="height and width together"):
        ServerConfig(height=128)
    with pytest.raises(ValueError, match="jpeg_quality"):
        ServerConfig(jpeg_quality=100)
    with pytest.raises(ValueError, match="multiples of 16"):  # the server's size is the model's to accept
        create_app(embedded_pipeline(), ServerConfig(height=120, width=192))


def test_recording_without_an_mp4_backend_fails_before_any_model_loads(monkeypatch):
    import sys

    def factory(decoder):
        raise AssertionError("no pipeline should be made")

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(RuntimeError, match="needs the imageio-ffmpeg package"):
        create_app(factory, ServerConfig())


def test_the_cli_checks_its_options_before_loading_and_passes_them_on(monkeypatch, capsys):
    import causal_dit_jax.app.serve as serve_package
    from causal_dit_jax.app.cli import main

    seen = {}
    monkeypatch.setattr(serve_package, "serve", lambda pipelines, config: seen.update(pipelines=pipelines, config=config))
    assert main(["serve", "--port", "8123", "--max-sessions", "3", "--switch-mode", "cut"]) == 0
    c = seen["config"]
    assert (c.host, c.port, c.max_sessions, c.decoders, c.switch) == ("127.0.0.1", 8123, 3, ("wan",), "cut")
    assert callable(seen["pipelines"])  # decoder -> pipeline, made by the server (the default before it listens)
    for argv, says in [
        (["--decoder", "taehv"], "the embedded default has its own Wan VAE only"),
        (["--max-sessions", "0"], "max_sessions must be a positive integer"),
        (["--port", "70000"], "port must be in [0, 65535]"),
        (["--strategy", "ring"], "--strategy ring needs --mesh N"),
    ]:
        assert main(["serve", *argv]) == 2
        assert says in capsys.readouterr().err


def test_the_serve_probe_reports_the_servers_own_figures(tmp_path):
    """benchmarks/serve_probe.py (the GPU report's tool) on the embedded default: one session over a
    real WebSocket, every frame received, the server's first-frame and fps figures in the JSON."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).parents[1]
    out = tmp_path / "probe.json"
    cmd = [sys.executable, "benchmarks/serve_probe.py", "--model", "embedded", "--sessions", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    (session,) = result["sessions"]
    done, client = session["done"], session["client"]
    assert done["reason"] == "finished" and client["jpegs"] == done["frames"] == FRAMES and client["not_jpeg"] == 0
    assert 0 < session["first_frame_latency_s"] == done["first_frame_s"] <= client["first_jpeg_s"] and done["fps"] > 0
    assert any("finished" in line for line in session["server_log"])
