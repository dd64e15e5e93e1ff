"""Shared by tests/test_serve.py and tests/test_serve_browser.py: one embedded-default pipeline per
test process (its compiled functions shared by both files), a real uvicorn server on a free loopback
port in a thread, and a small synchronous WebSocket client."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import threading
import time
from collections.abc import Iterator

import numpy as np

from causal_dit_jax.app.serve import ServerConfig, create_app, uvicorn_config

FRAMES = 33  # the embedded default's own length: one compiled size for every test


@functools.cache
def embedded_pipeline():
    from causal_dit_jax.app.pipeline import TextToVideoPipeline

    return TextToVideoPipeline.embedded_default()


class ServerThread:
    """uvicorn serving `create_app(pipeline, config)` on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, pipeline, config: ServerConfig = ServerConfig()):
        import uvicorn

        self.config = config.replace(port=0)
        self.app = create_app(pipeline, self.config)
        self.server = uvicorn.Server(uvicorn_config(self.app, self.config, log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.address = self.server.servers[0].sockets[0].getsockname()[:2]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    @property
    def manager(self):
        return self.app.state.manager

    def wait_sessions(self, n: int, timeout: float = 30) -> None:
        """Until the server holds n sessions (a closed one is cleaned up asynchronously)."""
        deadline = time.monotonic() + timeout
        while len(self.manager.sessions) != n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.manager.sessions)} sessions open, expected {n}")
            time.sleep(0.02)


class Client:
    """One session's socket: JSON out, status messages (dicts) and frames (JPEG bytes) in."""

    def __init__(self, server: ServerThread, **kw):
        from websockets.sync.client import connect

        ws_url = server.url.replace("http://", "ws://") + "/ws"
        self.ws = connect(ws_url, proxy=None, compression=None, max_size=2**24, legacy=True, **kw)
        self.statuses: list[dict] = []
        self.frames: list[bytes] = []

    def send(self, message) -> None:
        self.ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))

    def recv(self, timeout: float = 300) -> dict | bytes:  # generous: a busy CI machine
        m = self.ws.recv(timeout)
        if isinstance(m, bytes):
            self.frames.append(m)
            return m
        status = json.loads(m)
        self.statuses.append(status)
        return status

    def until(self, kind: str, timeout: float = 600) -> dict:
        """Receive until a status message of this type (frames and other statuses are kept)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.recv(max(deadline - time.monotonic(), 0.01))
            if isinstance(m, dict) and m["type"] == kind:
                return m

    def of(self, kind: str) -> list[dict]:
        return [s for s in self.statuses if s["type"] == kind]

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@contextlib.contextmanager
def serving(config: ServerConfig = ServerConfig()) -> Iterator[ServerThread]:
    with ServerThread(embedded_pipeline(), config) as server:
        yield server


__all__ = ["FRAMES", "Client", "ServerThread", "decode_jpeg", "embedded_pipeline", "serving"]
