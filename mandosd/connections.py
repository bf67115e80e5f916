"""Accepting connections without letting one peer crowd out the others.

- The soft file-descriptor limit is raised to the hard one at start (a server
  started outside its unit has 1024).
- Connections are capped per peer address and in total.  When a cap is
  reached, the oldest connection that has not yet proved a key is dropped to
  make room (a stalling peer loses, the newcomer is served); only when every
  connection has proved a key is the newcomer refused.
- Out of file descriptors, ``accept`` drops the oldest unproved connection
  instead of spinning, and repeated error lines are rate-limited.

Nothing here reads or writes a byte of the protocol.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any

log = logging.getLogger("mandosd.connections")


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class RateLimitedLog:
    """At most one line per key every *interval* seconds, then a count of the rest."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        n = self._suppressed.pop(key, 0)
        self._last[key] = now
        self.logger.log(level, "%s%s", msg, f" ({n} similar lines suppressed)" if n else "")
        return True


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    peername: str
    address: str
    proved: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def drop(self) -> None:
        """Abort the connection: its task ends and closes the socket."""
        if self.task is not None and not self.task.done():
            self.task.cancel()


def format_peer(addr: object) -> tuple[str, str]:
    """(``ADDR:PORT`` as users write it, ``ADDR``) for a socket address."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = str(addr[0]), addr[1]
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), host
    return "?", "?"


class ConnectionTable:
    """The open connections, by age, with per-address and total caps."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self._all: OrderedDict[Conn, None] = OrderedDict()
        self._count: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._all)

    def _oldest_unproved(self, address: str | None) -> Conn | None:
        for c in self._all:
            if not c.proved and (address is None or c.address == address):
                return c
        return None

    def admit(self, conn: Conn) -> tuple[bool, Conn | None]:
        """Add *conn* if the caps allow, evicting the oldest unproved one if needed.

        Returns (admitted, evicted)."""
        evicted = None
        if self._count.get(conn.address, 0) >= self.per_address:
            evicted = self._oldest_unproved(conn.address)
            if evicted is None:
                return False, None
            self.remove(evicted)
        elif len(self._all) >= self.total:
            evicted = self._oldest_unproved(None)
            if evicted is None:
                return False, None
            self.remove(evicted)
        self._all[conn] = None
        self._count[conn.address] = self._count.get(conn.address, 0) + 1
        return True, evicted

    def evict_oldest_unproved(self) -> Conn | None:
        c = self._oldest_unproved(None)
        if c is not None:
            self.remove(c)
        return c

    def remove(self, conn: Conn) -> None:
        if conn in self._all:
            del self._all[conn]
            n = self._count.get(conn.address, 1) - 1
            if n:
                self._count[conn.address] = n
            else:
                self._count.pop(conn.address, None)

    def all(self) -> list[Conn]:
        return list(self._all)


_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


async def accept_loop(lsock: socket.socket, table: ConnectionTable,
                      handle: Callable[[Conn], Coroutine[Any, Any, None]],
                      on_refused: Callable[[Conn, str], None],
                      errors: RateLimitedLog) -> None:
    """Accept on *lsock* for ever, handing each admitted connection to *handle*."""
    loop = asyncio.get_running_loop()
    lsock.setblocking(False)
    while True:
        try:
            sock, addr = await loop.sock_accept(lsock)
        except OSError as e:
            if e.errno in _OUT_OF_FDS:
                errors.log(logging.WARNING, "accept-fds",
                           f"accept: {e.strerror}; dropping the oldest connection that has "
                           "not proved a key")
                victim = table.evict_oldest_unproved()
                if victim is not None:
                    victim.drop()
                    await asyncio.sleep(0)  # let it close and free its descriptor
                else:
                    await asyncio.sleep(0.05)
                continue
            if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                continue
            errors.log(logging.ERROR, "accept", f"accept: {e.strerror or e}")
            await asyncio.sleep(0.05)
            continue
        sock.setblocking(False)
        peername, address = format_peer(addr)
        conn = Conn(sock, peername, address)
        admitted, evicted = table.admit(conn)
        if evicted is not None:
            evicted.drop()
            on_refused(evicted, "evicted")
        if not admitted:
            on_refused(conn, "too-many-connections")
            sock.close()
            continue
        conn.task = loop.create_task(handle(conn))
        # a done-callback, not a finally: a task cancelled before it ever ran (evicted
        # in a burst of accepts) never enters its body, yet its socket must be closed
        conn.task.add_done_callback(partial(_closed, conn, table))


def _closed(conn: Conn, table: ConnectionTable, _task: object) -> None:
    table.remove(conn)
    conn.sock.close()
