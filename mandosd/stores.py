"""Which state store: SQLite under the state directory, or a pool's PostgreSQL.

The one place that reads ``--state-url`` / ``state_url =``; everything else
takes a :class:`mandosd.state.StateStore`.  psycopg is imported only when a
URL is given, so a single server needs nothing beyond the standard library.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .config import ServerConfig
from .state import SQLiteStore, StateError, StateStore

if TYPE_CHECKING:
    from .escrow import Store as EscrowStore


def state_url_from(arg: str | None, server: ServerConfig) -> str | None:
    """--state-url, else state_url= from mandos.conf, else None (SQLite)."""
    url = arg if arg is not None else getattr(server, "state_url", None)
    return url.strip() or None if url else None


def server_name(arg: str | None = None) -> str:
    """How this server signs the pool's audit rows: --server-name, else the host name."""
    return arg or socket.gethostname()


def open_store(state_url: str | None, statedir: Path, *, durable: bool = True,
               name: str | None = None, lazy: bool = False) -> StateStore:
    """The store for *state_url* if given (PostgreSQL), else SQLite in *statedir*.

    *lazy* (servers): a database unreachable now is not an error; the store
    refuses until it can connect.
    """
    if not state_url:
        return SQLiteStore(statedir, durable=durable)
    if not state_url.startswith(("postgresql:", "postgres:")) and "=" not in state_url:
        raise StateError(f"state URL must be a PostgreSQL connection string "
                         f"(postgresql://…), not {state_url.split(':')[0]!r}")
    try:
        from .pgstate import PostgresStore
    except ImportError:
        raise StateError("--state-url needs psycopg 3 (Debian: python3-psycopg; "
                         "pip: mandos-nbde[postgresql])") from None
    return PostgresStore(state_url, server_name=server_name(name), lazy=lazy,
                         config_key=config_key(statedir))


def config_key(statedir: Path) -> str:
    """Whose clients.conf a load in a pool is: this host's, as its state directory's.

    mandosd, its checker pass and mandos-ctl on one host read the same clients.conf
    (and share the state directory, whatever ``--server-name`` each was given): one
    key, so that a change in that file is applied once, by whichever loads it first.
    """
    return f"{socket.gethostname()}:{statedir.resolve()}"


class EscrowOpener:
    """How a server opens its escrow store: in a pool, the pool's PostgreSQL on a
    connection of its own, made at the first escrow session and shared by all (closed
    with the server); else ``STATEDIR/escrow.sqlite``, one connection per session.

    Not the state store's connection: an escrow session waits for its machine's turn
    (an advisory lock, which any role of the database may hold) while holding the
    connection, and secret requests must never wait behind it.
    """

    def __init__(self, state_url: str | None, store: StateStore, statedir: Path) -> None:
        self.state_url = state_url
        self.store = store
        self.statedir = statedir
        self._pool: EscrowStore | None = None
        self._pool_state: StateStore | None = None
        self._lock = threading.Lock()  # two first sessions at once make one connection

    def __call__(self) -> EscrowStore:
        """The store for one session (called off the event loop: it may connect)."""
        if not self.state_url:
            from .escrow import EscrowStore as SQLiteEscrow

            return SQLiteEscrow(self.statedir)
        with self._lock:
            if self._pool is None:
                from .pgescrow import PostgresEscrowStore
                from .pgstate import PostgresStore

                assert isinstance(self.store, PostgresStore)
                state = PostgresStore(self.store.url, server_name=self.store.server_name,
                                      lazy=True)
                self._pool_state, self._pool = state, PostgresEscrowStore(state)
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool_state is not None:
                self._pool_state.close()


class Waiter(Protocol):
    """Wakes requests that wait for approval when their client changes."""

    live: bool

    def waiter(self, name: str) -> asyncio.Future[None]: ...

    async def aclose(self) -> None: ...


def change_listener(state_url: str) -> Waiter:
    """The pool's waker (LISTEN/NOTIFY); SQLite uses :class:`mandosd.changes.Changes`."""
    from .pglisten import ChangeListener

    return ChangeListener(state_url)


def copy_audit(state_url: str | None, name: str | None = None) -> Callable[[], None]:
    """With a pool, copy audit entries into its audit table; returns the closer."""
    if not state_url:
        return lambda: None
    from .audit import add_sink, remove_sink
    from .pgaudit import AuditWriter

    writer = AuditWriter(state_url, server_name(name))
    add_sink(writer)

    def close() -> None:
        remove_sink(writer)
        writer.close()
    return close

