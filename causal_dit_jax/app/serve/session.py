"""Sessions: one per WebSocket, each with its own outbox, temp folder and at most one generation at a
time; the manager holds them, refuses one past the limit and cleans each up when it ends."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import secrets
import shutil
import tempfile

from causal_dit_jax.app.serve.config import ServerConfig
from causal_dit_jax.app.serve.outbox import Outbox
from causal_dit_jax.app.serve.worker import Generation

log = logging.getLogger("causal_dit_jax.serve")


class Session:
    """A page's connection: its id (unguessable: it names the session's mp4 URL), its outbox, a temp
    folder for its videos, and its current (or last) generation."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: ServerConfig):
        self.id = secrets.token_urlsafe(12)
        self.outbox = Outbox(loop, config.queue_frames)
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix=f"causal-dit-serve-{self.id}-"))
        self.generation: Generation | None = None
        self.videos = 0  # one mp4 file per generation: a new one never overwrites one being downloaded
        self.sent = 0  # frames of the current generation sent
        self.fps = float(config.model_fps)  # the playback rate its frames are sent at

    def next_video_path(self) -> pathlib.Path:
        for old in self.dir.glob("*.mp4"):
            old.unlink(missing_ok=True)
        self.videos += 1
        return self.dir / f"video-{self.videos}.mp4"

    @property
    def video(self) -> pathlib.Path | None:
        """The finished mp4 of the last generation, if there is one."""
        g = self.generation
        return g.video_path if g is not None and g.video_ready else None  # ready: closed and moved into place

    @property
    def generating(self) -> bool:
        """Its generation runs (and takes controls)."""
        g = self.generation
        return g is not None and not g.finished.is_set() and not g.cancelled.is_set()

    @property
    def playing(self) -> bool:
        """It generates, or frames of its finished generation still wait to be sent (and may be paused)."""
        g = self.generation
        return self.generating or (g is not None and not g.cancelled.is_set() and self.outbox.buffered > 0)


class SessionManager:
    """At most `config.max_sessions` sessions; used from the event loop only."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.sessions: dict[str, Session] = {}

    def open(self, loop: asyncio.AbstractEventLoop) -> Session | None:
        """A new session, or None when max_sessions are open."""
        if len(self.sessions) >= self.config.max_sessions:
            return None
        session = Session(loop, self.config)
        self.sessions[session.id] = session
        log.info("session %s opened (%d of %d)", session.id, len(self.sessions), self.config.max_sessions)
        return session

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    async def stop_generation(self, session: Session) -> None:
        """Stop the session's generation (it ends before its next pull: within one chunk) and wait for it."""
        g = session.generation
        if g is not None:
            g.stop()
            session.outbox.flush()
            await asyncio.to_thread(g.join)

    async def close(self, session: Session) -> None:
        """End a session: its generation stopped and waited for, its outbox closed, its folder deleted."""
        await self.stop_generation(session)
        session.outbox.close()
        shutil.rmtree(session.dir, ignore_errors=True)
        self.sessions.pop(session.id, None)
        log.info("session %s closed", session.id)

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(s) for s in list(self.sessions.values())))


__all__ = ["Session", "SessionManager"]
