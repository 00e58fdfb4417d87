"""Engine events (made in the stepping thread) handed to the requests' asyncio queues."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable


class EventRelay:
    """Hands engine events (made in the stepping thread) to the requests' asyncio queues with one event
    loop wake-up per burst instead of one per event: a 16-row decode step makes 16 events at once, and
    each wake-up is a system call plus a loop iteration competing with the engine for the same cores.

    Text for a stream that has had its first piece waits up to `interval` seconds for the next steps'
    pieces, so a busy server sends (and its clients parse) fewer, larger chunks: on 2 cores every
    millisecond of HTTP work steals one from the engine's threads. A request's first piece and its final
    event go at once. Nothing waits long: rows that still run post at every step, and rows that stop
    post their final event."""

    def __init__(self, interval: float = 0.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, object]] = []
        self._scheduled = False
        self._last = 0.0  # when the last delivery was scheduled (time.monotonic)
        self._started: set[int] = set()  # ids of the queues that have had their first piece
        self.loop: asyncio.AbstractEventLoop | None = None

    def listener(self, queue: asyncio.Queue) -> Callable[[object], None]:
        """The engine-side callback that posts one request's events to its queue (call on the loop)."""
        self.loop = self.loop or asyncio.get_running_loop()
        return lambda event: self._post(queue, event)

    def _post(self, queue: asyncio.Queue, event: object) -> None:
        now = time.monotonic()
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            urgent = not isinstance(event, str) or id(queue) not in self._started
            if not urgent and now - self._last < self.interval:
                return  # the next step's events bring it
            self._scheduled, self._last = True, now
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
            for queue, event in pending:
                if isinstance(event, str):
                    self._started.add(id(queue))
                else:
                    self._started.discard(id(queue))  # its last event: the id may be reused
        for queue, event in pending:
            queue.put_nowait(event)
