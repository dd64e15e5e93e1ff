"""A session's outgoing messages: the bounded frame queue between its generation thread and its
socket, with status messages in order among the frames and urgent ones ahead of them."""

from __future__ import annotations

import asyncio
import collections
import threading


class Outbox:
    """Filled from any thread (the generation's, the socket handler's); emptied by the socket's sender
    coroutine on the event loop `loop`.

    Frames (JPEG bytes) and ordered status messages share one FIFO; at most `max_frames` frames wait
    in it: `put_frame` blocks while it is full, so a generation runs at most that far ahead of what the
    page has been sent. `flush` drops the waiting frames (stale after a prompt switch or a stop) and
    counts them in `dropped`. Urgent messages (errors, acknowledgements) go before everything.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_frames: int):
        self._loop = loop
        self.max_frames = max_frames
        self._cond = threading.Condition()
        self._urgent: collections.deque[dict] = collections.deque()
        self._ordered: collections.deque[bytes | dict] = collections.deque()
        self._frames = 0
        self._closed = False
        self.dropped = 0
        self._changed = asyncio.Event()  # touched on the loop only

    # ------------------------------------------------------------------ any thread
    def put_status(self, message: dict, ordered: bool = False) -> None:
        """Queue a status message: after the frames already queued (ordered) or before them."""
        with self._cond:
            if self._closed:
                return
            (self._ordered if ordered else self._urgent).append(message)
        self._wake()

    def put_frame(self, jpeg: bytes, cancelled: threading.Event) -> bool:
        """Queue a frame, waiting while `max_frames` wait already; False (and nothing queued) once
        `cancelled` is set or the outbox is closed."""
        with self._cond:
            while self._frames >= self.max_frames and not (cancelled.is_set() or self._closed):
                self._cond.wait(0.1)
            if cancelled.is_set() or self._closed:
                return False
            self._ordered.append(jpeg)
            self._frames += 1
        self._wake()
        return True

    def flush(self) -> int:
        """Drop the queued frames (status messages stay); returns how many."""
        with self._cond:
            n = self._frames
            self._ordered = collections.deque(m for m in self._ordered if not isinstance(m, bytes))
            self._frames = 0
            self.dropped += n
            self._cond.notify_all()
        return n

    def notify(self) -> None:
        """Wake the sender and any waiting `put_frame` (to look at a stop or pause again)."""
        with self._cond:
            self._cond.notify_all()
        self._wake()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._urgent.clear()
            self._ordered.clear()
            self._frames = 0
            self._cond.notify_all()

    @property
    def buffered(self) -> int:
        """Frames waiting to be sent."""
        return self._frames

    def reset_counts(self) -> None:
        with self._cond:
            self.dropped = 0

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._changed.set)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # ------------------------------------------------------------------ the event loop
    def begin(self) -> None:
        """Start a look at the queue: a change made after this wakes the next `wait`."""
        self._changed.clear()

    def pop_urgent(self) -> dict | None:
        with self._cond:
            return self._urgent.popleft() if self._urgent else None

    def peek(self) -> bytes | dict | None:
        with self._cond:
            return self._ordered[0] if self._ordered else None

    def pop(self) -> bytes | dict | None:
        with self._cond:
            if not self._ordered:
                return None
            item = self._ordered.popleft()
            if isinstance(item, bytes):
                self._frames -= 1
                self._cond.notify_all()
            return item

    async def wait(self, timeout: float | None = None) -> None:
        """Until something changed since `begin` (or timeout seconds)."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass


__all__ = ["Outbox"]
