"""Per-client state, crash-safe in SQLite (WAL, one transaction per change).

The server, the checker pass and ``mandos-ctl`` all open the same database;
each request reads it afresh, so a change by ``mandos-ctl`` takes effect for
the next request without a restart.  :class:`StateStore` is the interface a
shared database (PostgreSQL, for a pool of servers) would implement too.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .config import Client

SCHEMA_VERSION = 2
DB_NAME = "clients.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY,
    key_id TEXT,
    enabled INTEGER NOT NULL,
    deadline REAL,
    last_enabled REAL,
    last_checked_ok REAL,
    last_checker_status INTEGER,
    last_checker_time REAL,
    checker_started REAL,
    next_check REAL,
    last_secret_sent REAL,
    approved_until REAL,
    approval_decision TEXT,
    approval_decided_at REAL,
    overrides TEXT NOT NULL DEFAULT '{}',
    source TEXT NOT NULL DEFAULT 'config',
    section TEXT
);
CREATE INDEX IF NOT EXISTS clients_key_id ON clients(key_id);
"""

#: Schema migrations: (version reached, statements).  Applied in order to a
#: database whose ``PRAGMA user_version`` is lower; never edit a released step.
_MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (2, (
        # what mandos-ctl shows as Created, Last Approval Request, Approval Is Pending
        "ALTER TABLE clients ADD COLUMN created REAL",
        "ALTER TABLE clients ADD COLUMN last_approval_request REAL",
        "ALTER TABLE clients ADD COLUMN approval_pending_until REAL",
        # mandos-ctl --stop-checker: a running pass kills checkers started before this
        "ALTER TABLE clients ADD COLUMN checker_stop_requested REAL",
        "CREATE INDEX IF NOT EXISTS clients_next_check ON clients(next_check)",
    )),
)


class StateError(Exception):
    pass


@dataclass(frozen=True)
class ClientState:
    name: str
    key_id: str | None
    enabled: bool
    deadline: float | None
    last_enabled: float | None = None
    last_checked_ok: float | None = None
    last_checker_status: int | None = None
    last_checker_time: float | None = None
    checker_started: float | None = None
    next_check: float | None = None
    last_secret_sent: float | None = None
    approved_until: float | None = None
    approval_decision: str | None = None
    approval_decided_at: float | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    source: str = "config"
    section: str | None = None
    created: float | None = None
    last_approval_request: float | None = None
    approval_pending_until: float | None = None
    checker_stop_requested: float | None = None


class StateStore(Protocol):
    def sync_clients(self, clients: Iterable[Client], now: float) -> None: ...
    def get(self, name: str) -> ClientState | None: ...
    def get_by_key_id(self, key_id: str) -> ClientState | None: ...
    def all(self) -> list[ClientState]: ...
    def update(self, name: str, **changes: Any) -> None: ...
    def record_secret_sent(self, name: str, now: float, deadline: float) -> None: ...
    def claim_checks(self, candidates: Mapping[str, float], now: float,
                     force: bool = False) -> list[str]: ...
    def record_checks(self, results: Iterable[CheckRecord]) -> None: ...
    def disable_expired(self, now: float) -> list[ClientState]: ...
    def stop_requested(self, names: Iterable[str], since: float) -> set[str]: ...
    def add_client(self, name: str, key_id: str | None, section: str, now: float,
                   timeout: float, enabled: bool = True) -> None: ...
    def remove(self, name: str) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class CheckRecord:
    """One finished checker run, as the pass records it."""

    name: str
    started: float
    finished: float
    #: exit code; -1 killed (by us at the interval, or by a signal), -2 never completed
    status: int
    next_check: float
    #: set on success: the deadline it earns (now + timeout); never moves a deadline back
    deadline: float | None = None


_COLUMNS = [f for f in ClientState.__dataclass_fields__]


def _row_to_state(row: sqlite3.Row) -> ClientState:
    values = {k: row[k] for k in _COLUMNS}
    values["enabled"] = bool(values["enabled"])
    values["overrides"] = json.loads(values["overrides"] or "{}")
    return ClientState(**values)


def connect(statedir: Path, name: str, *, durable: bool) -> sqlite3.Connection:
    """Open ``STATEDIR/name`` (directory 0700, file 0600) in WAL mode.

    *durable* (synchronous=FULL): an acknowledged change survives even a power cut;
    otherwise (NORMAL) it survives the process being killed.
    """
    prepare_statedir(statedir)
    old_umask = os.umask(0o077)
    try:
        db = sqlite3.connect(statedir / name, timeout=10, isolation_level=None,
                             check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        db.execute("PRAGMA busy_timeout=10000")
        return db
    except sqlite3.Error as e:
        raise StateError(f"{statedir / name}: {e}") from None
    finally:
        os.umask(old_umask)


def prepare_statedir(statedir: Path) -> None:
    try:
        statedir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if statedir.stat().st_mode & 0o077:
            os.chmod(statedir, 0o700)
    except OSError as e:
        raise StateError(f"{statedir}: {e.strerror}") from None


class SQLiteStore:
    """The embedded default: ``STATEDIR/clients.sqlite`` (0600, directory 0700)."""

    def __init__(self, statedir: Path, *, durable: bool = True) -> None:
        self.path = statedir / DB_NAME
        self.db = connect(statedir, DB_NAME, durable=durable)
        try:
            with self._tx():
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StateError(f"{self.path}: made by a newer mandosd (schema "
                                     f"{version} > {SCHEMA_VERSION}); refusing to touch it")
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                for target, statements in _MIGRATIONS:
                    if version < target:
                        for stmt in statements:
                            self.db.execute(stmt)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as e:
            self.db.close()
            raise StateError(f"{self.path}: {e}") from None
        except StateError:
            self.db.close()
            raise

    def _tx(self) -> _Transaction:
        return _Transaction(self.db, self.path)

    def sync_clients(self, clients: Iterable[Client], now: float) -> None:
        """Merge the configured clients with stored state, as Mandos does on restart.

        New clients start enabled (or as configured) with deadline now + timeout;
        known clients keep their state (enabled, deadline, history); a changed
        key_id is taken from the config; clients gone from the config are forgotten,
        except those added with ``mandos-ctl --add``.
        """
        clients = list(clients)
        with self._tx():
            names = set()
            for c in clients:
                names.add(c.name)
                cur = self.db.execute("SELECT key_id FROM clients WHERE name=?", (c.name,))
                row = cur.fetchone()
                if row is None:
                    self.db.execute(
                        "INSERT INTO clients (name, key_id, enabled, deadline, last_enabled,"
                        " next_check, created) VALUES (?,?,?,?,?,?,?)",
                        (c.name, c.key_id, int(c.enabled), now + c.timeout, now, now, now))
                elif row["key_id"] != c.key_id:
                    self.db.execute("UPDATE clients SET key_id=? WHERE name=?",
                                    (c.key_id, c.name))
            # 'removed': hidden by mandos-ctl --remove until its section goes away
            stored = [r["name"] for r in self.db.execute(
                "SELECT name FROM clients WHERE source IN ('config', 'removed')")]
            for name in stored:
                if name not in names:
                    self.db.execute("DELETE FROM clients WHERE name=?", (name,))

    def get(self, name: str) -> ClientState | None:
        try:
            row = self.db.execute("SELECT * FROM clients WHERE name=?", (name,)).fetchone()
        except sqlite3.Error as e:
            raise StateError(f"{self.path}: {e}") from None
        return _row_to_state(row) if row else None

    def get_by_key_id(self, key_id: str) -> ClientState | None:
        try:
            row = self.db.execute("SELECT * FROM clients WHERE key_id=?", (key_id,)).fetchone()
        except sqlite3.Error as e:
            raise StateError(f"{self.path}: {e}") from None
        return _row_to_state(row) if row else None

    def all(self) -> list[ClientState]:
        try:
            rows = self.db.execute("SELECT * FROM clients ORDER BY name").fetchall()
        except sqlite3.Error as e:
            raise StateError(f"{self.path}: {e}") from None
        return [_row_to_state(r) for r in rows]

    def update(self, name: str, **changes: Any) -> None:
        bad = set(changes) - set(_COLUMNS) or ({"name"} & set(changes))
        if bad:
            raise ValueError(f"unknown state fields: {sorted(bad)}")
        if "overrides" in changes:
            changes["overrides"] = json.dumps(changes["overrides"], sort_keys=True)
        if "enabled" in changes:
            changes["enabled"] = int(changes["enabled"])
        cols = ", ".join(f"{k}=?" for k in changes)
        with self._tx():
            cur = self.db.execute(f"UPDATE clients SET {cols} WHERE name=?",  # noqa: S608
                                  (*changes.values(), name))
            if cur.rowcount == 0:
                raise StateError(f"no such client: {name}")

    def record_secret_sent(self, name: str, now: float, deadline: float) -> None:
        self.update(name, last_secret_sent=now, deadline=deadline)

    # -- the checker pass -------------------------------------------------

    def claim_checks(self, candidates: Mapping[str, float], now: float,
                     force: bool = False) -> list[str]:
        """Mark as running those of *candidates* (name: interval) that are due.

        Due: enabled, ``next_check`` reached (or *force*), and no checker running
        (one started more than twice its interval ago counts as lost).  Done in
        one transaction, so two passes never run the same client's checker.
        """
        claimed: list[str] = []
        with self._tx():
            for name, interval in candidates.items():
                cur = self.db.execute(
                    "UPDATE clients SET checker_started=? WHERE name=? AND enabled=1"
                    " AND (? OR next_check IS NULL OR next_check<=?)"
                    " AND (checker_started IS NULL OR checker_started<?)",
                    (now, name, int(force), now, now - 2 * interval))
                if cur.rowcount:
                    claimed.append(name)
        return claimed

    def record_checks(self, results: Iterable[CheckRecord]) -> None:
        """Record finished checkers in one transaction; success moves the deadline."""
        # A success extends the deadline only while it has not passed: once passed, the
        # client is timed out until an admin enables it, even if a checker that started
        # in time succeeds afterwards (or the pass has not disabled it yet).
        rows = [(r.status, r.finished, r.next_check,
                 r.finished if r.deadline is not None else None,
                 r.deadline, r.finished, r.deadline, r.name) for r in results]
        if not rows:
            return
        with self._tx():
            self.db.executemany(
                "UPDATE clients SET last_checker_status=?, last_checker_time=?,"
                " checker_started=NULL, next_check=?,"
                " last_checked_ok=COALESCE(?, last_checked_ok),"
                " deadline=CASE WHEN ? IS NOT NULL AND enabled=1"
                "   AND (deadline IS NULL OR deadline >= ?)"
                "   THEN MAX(COALESCE(deadline, 0), ?) ELSE deadline END"
                " WHERE name=?", rows)

    def disable_expired(self, now: float) -> list[ClientState]:
        """Disable every enabled client whose deadline has passed; return them."""
        with self._tx():
            rows = self.db.execute(
                "UPDATE clients SET enabled=0 WHERE enabled=1 AND deadline IS NOT NULL"
                " AND deadline<? RETURNING *", (now,)).fetchall()
        return [_row_to_state(r) for r in rows]

    def stop_requested(self, names: Iterable[str], since: float) -> set[str]:
        """Those of *names* whose checker ``mandos-ctl --stop-checker`` stopped after *since*."""
        wanted = set(names)
        rows = self.db.execute(
            "SELECT name FROM clients WHERE checker_stop_requested>=?", (since,)).fetchall()
        return {r["name"] for r in rows} & wanted

    # -- mandos-ctl ---------------------------------------------------------

    def add_client(self, name: str, key_id: str | None, section: str, now: float,
                   timeout: float, enabled: bool = True) -> None:
        """A client added with ``mandos-ctl --add``: kept across config reloads."""
        with self._tx():
            if self.db.execute("SELECT 1 FROM clients WHERE name=?", (name,)).fetchone():
                raise StateError(f"client {name} exists already")
            if key_id is not None and self.db.execute(
                    "SELECT name FROM clients WHERE key_id=?", (key_id,)).fetchone():
                raise StateError(f"client {name}: another client has key_id {key_id}")
            self.db.execute(
                "INSERT INTO clients (name, key_id, enabled, deadline, last_enabled,"
                " next_check, created, source, section) VALUES (?,?,?,?,?,?,?,'ctl',?)",
                (name, key_id, int(enabled), now + timeout, now, now, now, section))

    def remove(self, name: str) -> None:
        with self._tx():
            cur = self.db.execute("DELETE FROM clients WHERE name=?", (name,))
            if cur.rowcount == 0:
                raise StateError(f"no such client: {name}")

    def close(self) -> None:
        self.db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    def __enter__(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StateError(f"{self.path}: {e}") from None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.db.execute("COMMIT")
            else:
                self.db.execute("ROLLBACK")
        except sqlite3.Error as e:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise StateError(f"{self.path}: cannot save state: {e}") from None


def section_client(section: str, configdir: Path) -> Client:
    """Parse one clients.conf section (as ``mandos-ctl --add`` stores it) into a Client.

    Raises :class:`mandosd.config.ConfigError` if it is not exactly one valid section.
    """
    import tempfile

    from . import config as configmod

    with tempfile.TemporaryDirectory(prefix="mandosd-section-") as tmp:
        path = Path(tmp) / "clients.conf"
        path.write_text(section, encoding="utf-8")
        clients = configmod.load_clients(path, configdir)
    if len(clients) != 1:
        raise configmod.ConfigError(f"expected exactly one client section, found "
                                    f"{len(clients)}")
    return next(iter(clients.values()))


def known_clients(configured: Mapping[str, Client], states: Iterable[ClientState],
                  configdir: Path) -> dict[str, Client]:
    """Configured clients plus those added with ``mandos-ctl --add`` (kept in the store)."""
    import logging

    from .config import ConfigError

    out = dict(configured)
    for st in states:
        if st.source == "ctl" and st.section and st.name not in out:
            try:
                out[st.name] = section_client(st.section, configdir)
            except ConfigError as e:
                logging.getLogger("mandosd.state").error(
                    "client %s (added with mandos-ctl): %s", st.name, e)
    return out


def added_client(store: StateStore, key_id: str, configdir: Path) -> Client | None:
    """The client with *key_id* added by ``mandos-ctl --add`` (not in clients.conf), if any."""
    from .config import ConfigError

    st = store.get_by_key_id(key_id)
    if st is None or st.source != "ctl" or not st.section:
        return None
    try:
        return section_client(st.section, configdir)
    except ConfigError:
        return None
