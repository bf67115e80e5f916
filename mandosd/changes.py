"""Wake waiting approvals when the state changes, instead of polling.

``mandos-ctl --approve`` writes to the SQLite state from another process.
An inotify watch on the state directory notices the write (the WAL file or
the database itself), and every request waiting for an approval re-reads its
client's state once.  Bursts of writes are coalesced.  A shared database
(PostgreSQL) calls :meth:`Changes.notify` from its LISTEN/NOTIFY channel.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mandos_core.inotify import IN_CLOSE_WRITE, IN_MODIFY, IN_MOVED_TO, Inotify, InotifyError

log = logging.getLogger("mandosd.changes")

#: Writes closer together than this wake the waiters once.
COALESCE = 0.02


class Changes:
    def __init__(self, loop: asyncio.AbstractEventLoop, statedir: Path | None) -> None:
        self.loop = loop
        self._fut: asyncio.Future[None] = loop.create_future()
        self._pending: asyncio.TimerHandle | None = None
        self._ino: Inotify | None = None
        if statedir is not None:
            try:
                self._ino = Inotify()
                self._ino.add_watch(str(statedir), IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO)
                loop.add_reader(self._ino.fileno(), self._on_inotify)
            except (InotifyError, OSError) as e:
                log.warning("cannot watch %s for changes (%s); waiting approvals re-check "
                            "on a timer", statedir, e)
                if self._ino is not None:
                    self._ino.close()
                self._ino = None

    def _on_inotify(self) -> None:
        if self._ino is None:
            return
        if self._ino.read():
            self.notify()

    def notify(self) -> None:
        """Wake everyone waiting (soon, once for a burst of changes)."""
        if self._pending is None:
            self._pending = self.loop.call_later(COALESCE, self._fire)

    def _fire(self) -> None:
        self._pending = None
        fut, self._fut = self._fut, self.loop.create_future()
        if not fut.done():
            fut.set_result(None)

    def next(self) -> asyncio.Future[None]:
        """A future resolved at the next change."""
        return self._fut

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if self._ino is not None:
            self.loop.remove_reader(self._ino.fileno())
            self._ino.close()
            self._ino = None
