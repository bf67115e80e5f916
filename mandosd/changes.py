"""Wake waiting approvals when the state changes, instead of polling.

``mandos-ctl --approve`` writes to the SQLite state from another process.
An inotify watch on the state directory notices the write (the WAL file or
the database itself), and every request waiting for an approval re-reads its
client's state once.  Bursts of writes are coalesced.  A pool's PostgreSQL
state has its own waker with the same interface (LISTEN/NOTIFY,
:class:`mandosd.pglisten.ChangeListener`).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mandos_core.inotify import IN_CLOSE_WRITE, IN_MODIFY, IN_MOVED_TO, Inotify, InotifyError

log = logging.getLogger("mandosd.changes")

#: Writes closer together than this wake the waiters once.
COALESCE = 0.02


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Changes:
    """``waiter(name)``: a future set at the next change of the state directory.

    :attr:`live` is false when the directory cannot be watched; waiters then
    re-read on a timer (the server's approval poll)."""

    def __init__(self, statedir: Path) -> None:
        self.statedir = statedir
        self.live = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fut: asyncio.Future[None] | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._ino: Inotify | None = None

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            try:
                self._ino = Inotify()
                self._ino.add_watch(str(self.statedir), IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO)
                self._loop.add_reader(self._ino.fileno(), self._on_inotify)
            except (InotifyError, OSError) as e:
                log.warning("cannot watch %s for changes (%s); waiting approvals re-check "
                            "on a timer", self.statedir, e)
                if self._ino is not None:
                    self._ino.close()
                self._ino = None
                self.live = False
        return self._loop

    def _on_inotify(self) -> None:
        if self._ino is not None and self._ino.read():
            self.notify()

    def notify(self) -> None:
        """Wake everyone waiting (soon, once for a burst of changes)."""
        if self._pending is None and self._loop is not None:
            self._pending = self._loop.call_later(COALESCE, self._fire)

    def _fire(self) -> None:
        self._pending = None
        fut, self._fut = self._fut, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def waiter(self, name: str) -> asyncio.Future[None]:
        """A future set at the next change (of any client: the directory is one file)."""
        loop = self._start()
        if self._fut is None or self._fut.done():
            self._fut = loop.create_future()
        # each waiter gets its own future, so cancelling one never cancels the others
        mine: asyncio.Future[None] = loop.create_future()
        self._fut.add_done_callback(lambda _f: _resolve(mine))
        return mine

    async def aclose(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if self._ino is not None and self._loop is not None:
            self._loop.remove_reader(self._ino.fileno())
            self._ino.close()
            self._ino = None
