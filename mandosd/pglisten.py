"""Wake on change for a pool of key servers: PostgreSQL's LISTEN/NOTIFY.

A trigger in the pool's schema (:mod:`mandosd.pgstate`) sends ``NOTIFY
mandos_clients, '<name>'`` when a client's enabled or approval columns change,
on whichever server or admin host changed them; :class:`ChangeListener` turns
that into asyncio wake-ups for the requests that wait for approval here.  It
never logs the connection string (messages name the database by
:func:`mandosd.pgstate.describe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg

from .pgstate import BACKOFF_MAX, BACKOFF_MIN, NOTIFY_CHANNEL, connect_args, describe, first_line

log = logging.getLogger("mandosd.pglisten")


class ChangeListener:
    """Wakes requests waiting for approval when their client's row changes anywhere.

    One asyncio task holds a LISTEN connection.  While it is not connected
    (:attr:`live` false), waiters fall back to re-reading at the server's poll
    interval; when the connection comes back, every waiter is woken once.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = describe(url)
        self.live = False
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None

    def waiter(self, name: str) -> asyncio.Future[None]:
        """A future set at the next change of *name* (register before reading state)."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._run())
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.setdefault(name, set()).add(fut)
        fut.add_done_callback(lambda f: self._waiters.get(name, set()).discard(f))
        return fut

    def _wake(self, name: str | None) -> None:
        names = [name] if name is not None else list(self._waiters)
        for n in names:
            for fut in list(self._waiters.get(n, ())):
                if not fut.done():
                    fut.set_result(None)

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    **connect_args(self.url, 5, "mandosd listener"), autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.live = True
                    backoff = BACKOFF_MIN
                    self._wake(None)  # anything may have changed while we were away
                    async for note in conn.notifies():
                        self._wake(note.payload)
            except Exception as e:  # whatever it was: fall back to polling, retry
                log.debug("%s: change listener: %s", self.where, first_line(e))
            self.live = False
            self._wake(None)
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(Exception):
                await self._task
