"""The FastAPI app: the page, its WebSocket (one per session) and the finished videos."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from causal_dit_jax.app.serve.config import SWITCH_MODES, ServerConfig
from causal_dit_jax.app.serve.protocol import (
    Control,
    PromptChange,
    ProtocolError,
    Start,
    error,
    max_message_chars,
    parse_message,
)
from causal_dit_jax.app.serve.session import Session, SessionManager
from causal_dit_jax.app.serve.worker import Generation, PipelinePool

STATIC = pathlib.Path(__file__).parent / "static"
# the page loads nothing from elsewhere; frames are drawn from blobs
CSP = "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; frame-ancestors 'none'"
log = logging.getLogger("causal_dit_jax.serve")


def create_app(pipelines, config: ServerConfig = ServerConfig()) -> FastAPI:
    """The server's app. pipelines: a `TextToVideoPipeline` (serves its own decoder), or a factory
    `decoder -> TextToVideoPipeline` for the decoders config.decoders names (the first is made now,
    the others on first use). Nothing is global: each app has its own sessions and pipelines."""
    if config.record_video:
        from causal_dit_jax.app.video import check_mp4_backend

        check_mp4_backend()  # before any model is loaded, not at a session's first frame
    pool = PipelinePool(pipelines, config.decoders, config.device_users, threads=config.max_sessions)
    config = config.replace(decoders=pool.decoders)
    pipe = pool.get(config.decoders[0])  # the default is loaded before the server listens
    height, width = (config.height, config.width) if config.height is not None else pipe.default_size[1:]
    default_frames = min(pipe.default_size[0], config.max_frames)
    pipe.plan(1, default_frames, height, width)  # the server's size fits the model
    counts = [n for n in range(1, config.max_frames + 1) if _fits(pipe, n, height, width)]
    info = {
        "decoders": list(config.decoders),
        "frames": default_frames,
        "frame_counts": counts,
        "height": height,
        "width": width,
        "model_fps": config.model_fps,
        "max_fps": config.max_fps,
        "max_prompt_length": config.max_prompt_length,
        "queue_frames": config.queue_frames,
        "switch_modes": list(SWITCH_MODES),
        "switch": config.switch,
        "untrained": bool(pipe.untrained),
    }
    manager = SessionManager(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await manager.close_all()
        pool.threads.shutdown(wait=False)

    app = FastAPI(title="causal-dit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config, app.state.manager, app.state.pool, app.state.info = config, manager, pool, info

    @app.middleware("http")
    async def security_headers(request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/config")
    async def server_info():
        return JSONResponse({**info, "sessions": len(manager.sessions), "max_sessions": config.max_sessions})

    @app.get("/sessions/{session_id}/video.mp4")
    async def video(session_id: str):
        session = manager.get(session_id)
        path = None if session is None else session.video
        if path is None or not path.exists():
            raise HTTPException(404, "no finished video for this session")
        return FileResponse(path, media_type="video/mp4", filename="causal-dit.mp4")

    @app.websocket("/ws")
    async def socket(ws: WebSocket):
        if not _same_origin(ws):  # another site's page may not drive this server from a visitor's browser
            await ws.close(code=1008)
            return
        await ws.accept()
        session = manager.open(asyncio.get_running_loop())
        if session is None:
            await ws.send_text(
                json.dumps(
                    {
                        "type": "busy",
                        "message": f"the server is busy: all {config.max_sessions} sessions are in use; try again later",
                    }
                )
            )
            await ws.close(code=1013)  # try again later
            return
        session.outbox.put_status({"type": "hello", "session": session.id, **info})
        tasks = {
            asyncio.create_task(_send(ws, session, config)),
            asyncio.create_task(_receive(ws, session, manager, pool, config, (height, width))),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if not t.cancelled() and t.exception() is not None and not _disconnected(t.exception()):
                    log.error("session %s: %r", session.id, t.exception())
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await manager.close(session)
            with contextlib.suppress(Exception):
                await ws.close()

    return app


def _fits(pipe, frames: int, height: int, width: int) -> bool:
    try:
        pipe.plan(1, frames, height, width)
    except ValueError:
        return False
    return True


def _same_origin(ws: WebSocket) -> bool:
    origin = ws.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == ws.headers.get("host")  # no Origin: not a browser


def _disconnected(e: BaseException) -> bool:
    return isinstance(e, WebSocketDisconnect) or "close message has been sent" in str(e)


async def _receive(ws: WebSocket, session: Session, manager: SessionManager, pool: PipelinePool, config, size) -> None:
    """The page's control messages, each checked; a refused one is answered with an error message."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            session.outbox.put_status(error("binary messages are not taken: send JSON text"))
            continue
        try:
            await _handle(parse_message(text, config), session, manager, pool, config, size)
        except ProtocolError as e:
            session.outbox.put_status(error(str(e)))


async def _handle(message, session: Session, manager: SessionManager, pool: PipelinePool, config, size) -> None:
    outbox, g = session.outbox, session.generation
    if isinstance(message, Start):
        if session.playing:
            raise ProtocolError("a video is playing: stop it first")
        await manager.stop_generation(session)  # one that is stopping ends within a chunk
        pipe = await asyncio.to_thread(pool.get, message.decoder)
        try:
            plan = pipe.plan(1, message.frames, *size)  # the pipeline's own checks, before any model work
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        outbox.flush()
        outbox.reset_counts()
        session.sent, session.fps = 0, message.fps
        path = session.next_video_path() if config.record_video else None
        g = Generation(session.id, message, pipe, size, outbox, pool.device, config.jpeg_quality, path, config.model_fps)
        session.generation = g
        outbox.put_status(
            {
                "type": "started",
                "prompt": message.prompt,
                "seed": message.seed,
                "frames": plan.output_frames,
                "height": size[0],
                "width": size[1],
                "fps": message.fps,
                "decoder": message.decoder,
                "switch": message.switch,
            },
            ordered=True,
        )
        g.start(pool.threads)
        return
    if not session.playing:
        raise ProtocolError("nothing is playing: press Start")
    if isinstance(message, PromptChange):
        if not session.generating:
            raise ProtocolError("this video is generated to its end: the prompt box is used at the next Start")
        g.switch(message.prompt)
        outbox.put_status({"type": "prompt", "prompt": message.prompt, "dropped": outbox.flush()})
    elif isinstance(message, Control) and message.type == "stop":
        await manager.stop_generation(session)
    elif isinstance(message, Control) and message.type == "pause":
        g.pause()
        outbox.put_status({"type": "paused"})
    elif isinstance(message, Control) and message.type == "resume":
        g.resume()
        outbox.put_status({"type": "resumed"})


def _stats(session: Session) -> dict:
    g = session.generation
    fps = None if g is None else g.fps
    return {
        "type": "stats",
        "generated": 0 if g is None else g.generated,
        "sent": session.sent,
        "buffered": session.outbox.buffered,
        "dropped": session.outbox.dropped,
        "fps": None if fps is None else round(fps, 2),
    }


async def _send(ws: WebSocket, session: Session, config: ServerConfig) -> None:
    """Everything the session sends, from its outbox: urgent messages at once; frames (binary JPEG)
    paced at the page's playback rate, in order with their status messages; counters now and then."""
    loop = asyncio.get_running_loop()
    outbox = session.outbox
    due = last_stats = 0.0
    while True:
        outbox.begin()
        message = outbox.pop_urgent()
        if message is not None:
            await ws.send_text(json.dumps(message))
            continue
        g = session.generation
        head = outbox.peek()
        if head is None or (g is not None and g.paused and isinstance(head, bytes)):
            await outbox.wait()
            continue
        now = loop.time()
        if isinstance(head, bytes):
            if now < due:
                await outbox.wait(due - now)
                continue
            outbox.pop()
            await ws.send_bytes(head)
            session.sent += 1
            due = max(due, now) + 1.0 / session.fps
            if now - last_stats >= config.stats_interval_s:
                last_stats = now
                await ws.send_text(json.dumps(_stats(session)))
            continue
        outbox.pop()
        if head["type"] == "started":
            due = 0.0
        elif head["type"] == "done":
            head = {**head, "sent": session.sent, "dropped": outbox.dropped}
        await ws.send_text(json.dumps(head))


def uvicorn_config(app: FastAPI, config: ServerConfig, log_level: str = "info"):
    """uvicorn's settings for the app: config's host and port, control messages capped at their size."""
    import uvicorn

    return uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level, ws_max_size=4 * max_message_chars(config), lifespan="on"
    )


def serve(pipelines, config: ServerConfig = ServerConfig(), log_level: str = "info") -> None:
    """Run the server until interrupted (`causal-dit serve`); each session's first-frame latency and
    generation fps go to the log."""
    import uvicorn

    if not log.handlers and not logging.getLogger().handlers:  # the sessions' lines, beside uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    uvicorn.Server(uvicorn_config(create_app(pipelines, config), config, log_level)).run()


__all__ = ["create_app", "serve", "uvicorn_config"]
