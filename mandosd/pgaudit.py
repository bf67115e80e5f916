"""The fleet audit table of a pool of key servers.

Every decision is one journald entry on the server that made it
(:mod:`mandosd.audit`) and, in a pool, also a row of the pool's ``audit`` table,
so that ``mandos-ctl log`` answers "who got what, when, from which server"
across the pool.  :class:`AuditWriter` is the audit sink that writes those rows,
from a thread of its own, never on a request's path.  It never logs the
connection string.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

import psycopg

from .pgstate import BACKOFF_MAX, BACKOFF_MIN, connect_args, describe, first_line
from .state import StateError

log = logging.getLogger("mandosd.pgaudit")

#: audit outcomes any peer causes without a known client's key (a new key per connection
#: costs nothing): each server copies at most NOISE_PER_MINUTE of them a minute into the
#: audit table, which has no rotation (journald has every one)
NOISE = frozenset({"protocol-error", "refused-unknown", "escrow-refused-unknown"})
NOISE_PER_MINUTE = 600


def _text(value: Any) -> Any:
    """*value* as PostgreSQL's text (and jsonb) can hold it: a NUL (a checker's reason
    may quote what a machine sent) or an undecodable byte would fail the whole batch,
    and every batch after it, since the writer retries.  Other values as they are."""
    if not isinstance(value, str):
        return value
    return value.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()


class AuditWriter:
    """Copies audit entries into the ``audit`` table from a thread of its own.

    Entries queue in memory (at most :attr:`limit`; beyond that the oldest are
    dropped, with one error) while the database is unreachable; :meth:`close`
    writes what is left, if it can.  Entries that no known client stands behind
    (:data:`NOISE`) are copied at a bounded rate: anyone who reaches the port could
    otherwise fill the database's disk, and with it stop every server of the pool.
    """

    def __init__(self, url: str, server_name: str, *, limit: int = 100_000) -> None:
        self.url = url
        self.where = describe(url)
        self.server_name = server_name
        self.limit = limit
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._conn: psycopg.Connection[Any] | None = None
        self._noise_lock = threading.Lock()
        self._noise_minute, self._noise_seen, self._noise_dropped = -1, 0, 0
        self._thread = threading.Thread(target=self._loop, name="mandosd-audit", daemon=True)
        self._thread.start()

    def _noise(self, entry: Mapping[str, Any]) -> bool:
        """Is *entry* one too many of :data:`NOISE` this minute (then it is not copied)?"""
        if entry["outcome"] not in NOISE or entry.get("client"):
            return False
        minute = int(entry["at"] // 60)
        with self._noise_lock:
            if minute != self._noise_minute:
                if self._noise_dropped:
                    log.warning("%s: %d audit entries of unknown peers not copied to the "
                                "audit table in a minute (over %d; journald has them)",
                                self.where, self._noise_dropped, NOISE_PER_MINUTE)
                self._noise_minute, self._noise_seen, self._noise_dropped = minute, 0, 0
            self._noise_seen += 1
            if self._noise_seen <= NOISE_PER_MINUTE:
                return False
            self._noise_dropped += 1
            return True

    def __call__(self, entry: Mapping[str, Any]) -> None:
        """The audit sink (see :func:`mandosd.audit.add_sink`)."""
        if self._noise(entry):
            return
        if self._queue.qsize() >= self.limit:
            with contextlib.suppress(Exception):
                self._queue.get_nowait()
            log.error("%s: audit table unreachable; dropping the oldest entry", self.where)
        fields = {k: _text(v) for k, v in entry["fields"].items() if v is not None}
        at = datetime.datetime.fromtimestamp(entry["at"], datetime.UTC)
        self._queue.put((at, self.server_name, entry["outcome"], entry["message_id"],
                         *(_text(entry.get(k)) for k in ("client", "key_id", "peer",
                                                         "reason", "message")),
                         json.dumps(fields, default=lambda v: _text(str(v)), sort_keys=True)))

    def _write(self, rows: list[tuple[Any, ...]]) -> bool:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(**connect_args(self.url, 5, "mandosd audit"),
                                             autocommit=True)
            # COPY: one round trip and little per-row work for a whole batch
            with self._conn.transaction(), self._conn.cursor() as cur, cur.copy(
                    "COPY audit (at, server, outcome, message_id, client, key_id, peer,"
                    " reason, message, fields) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            return True
        except (psycopg.Error, StateError) as e:
            log.debug("%s: audit table: %s", self.where, first_line(e))
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
            self._conn = None
            return False

    def _loop(self) -> None:
        pending: list[tuple[Any, ...]] = []
        backoff = BACKOFF_MIN
        next_try = 0.0  # while the database is away: no attempt before this (monotonic)
        stop = False
        while not stop or pending:
            try:
                # entries that arrive during the back-off join the batch; they do not
                # bring the next connection attempt forward
                item = self._queue.get(timeout=max(0.0, next_try - time.monotonic())
                                       if pending else None)
                if item is None:
                    stop = True
                else:
                    pending.append(item)
                while True:  # take whatever else is queued
                    item = self._queue.get_nowait()
                    if item is None:
                        stop = True
                    else:
                        pending.append(item)
            except queue.Empty:
                pass
            if not pending or (not stop and time.monotonic() < next_try):
                continue
            if self._write(pending):
                pending, backoff = [], BACKOFF_MIN
            elif stop:
                log.error("%s: %d audit entries not written to the audit table "
                          "(journald has them)", self.where, len(pending))
                return
            else:
                next_try = time.monotonic() + backoff
                backoff = min(BACKOFF_MAX, backoff * 2)
                pending = pending[-self.limit:]

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
