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

SCHEMA_VERSION = 3
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
    (3, (
        # the clients.conf values of the last load (JSON), so that a value changed in the
        # file since then wins over stored state (mandosd/merge.py)
        "ALTER TABLE clients ADD COLUMN config TEXT",
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
    #: clients.conf's values for this client at the last load (see mandosd/merge.py)
    config: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)


class StateStore(Protocol):
    def sync_clients(self, clients: Iterable[Client], now: float) -> None: ...
    def merged(self, clients: Iterable[Client], now: float) -> list[ClientState]: ...
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
                   timeout: float, enabled: bool = True) -> bool | None: ...
    def remove(self, name: str) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class CheckRecord:
    """One finished checker run, as the pass records it."""

    name: str
    started: float
    finished: float
    #: exit code; -1 killed (by us at the interval, or by a signal)
    status: int
    next_check: float
    #: set on success: the deadline it earns (now + timeout); never moves a deadline back
    deadline: float | None = None


_COLUMNS = [f for f in ClientState.__dataclass_fields__]


def _row_to_state(row: sqlite3.Row) -> ClientState:
    have = set(row.keys())  # a read-only view of an older schema lacks the newer columns
    values = {k: row[k] for k in _COLUMNS if k in have}
    values["enabled"] = bool(values["enabled"])
    values["overrides"] = json.loads(values["overrides"] or "{}")
    values["config"] = json.loads(values["config"]) if values.get("config") else None
    return ClientState(**values)


def _encode(changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(changes)
    for key in ("overrides", "config"):
        if key in out and out[key] is not None:
            out[key] = json.dumps(out[key], sort_keys=True)
    if "enabled" in out:
        out["enabled"] = int(out["enabled"])
    return out


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
        raise StateError(db_error(statedir / name, e)) from None
    finally:
        os.umask(old_umask)


def prepare_statedir(statedir: Path) -> None:
    try:
        statedir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if statedir.stat().st_mode & 0o077:
            os.chmod(statedir, 0o700)
    except OSError as e:
        raise StateError(f"{statedir}: {e.strerror}") from None


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """Open for reading only: nothing created, migrated or changed (mandos-ctl listings)."""
    if not path.exists():
        raise StateError(f"{path}: no state store here (mandosd creates it when it first "
                         "starts; wrong --statedir?)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10,
                             isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        version = db.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as e:
        raise StateError(f"{path}: {e}") from None
    if version > SCHEMA_VERSION:
        db.close()
        raise StateError(f"{path}: made by a newer mandosd (schema {version} > "
                         f"{SCHEMA_VERSION})")
    return db


class SQLiteStore:
    """The embedded default: ``STATEDIR/clients.sqlite`` (0600, directory 0700)."""

    def __init__(self, statedir: Path, *, durable: bool = True, readonly: bool = False) -> None:
        self.path = statedir / DB_NAME
        if readonly:
            self.db = _connect_readonly(self.path)
            return
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
            raise StateError(db_error(self.path, e)) from None
        except StateError:
            self.db.close()
            raise

    def _tx(self) -> _Transaction:
        return _Transaction(self.db, self.path)

    def sync_clients(self, clients: Iterable[Client], now: float) -> None:
        """Merge the configured clients with stored state, as Mandos does (mandosd/merge.py).

        A value changed in clients.conf since the last load wins over stored state; an
        unchanged one leaves it alone; a client gone from the config is kept as a
        tombstone.  One transaction; each change applied is audited once committed.
        """
        from .audit import audit
        from .merge import plan

        with self._tx():
            pending, rows = self._pending(clients)
            todo = plan(pending, rows, now)
            for row in todo.inserts:
                row = _encode(row)
                cols = ", ".join(row)
                self.db.execute(f"INSERT INTO clients ({cols}) VALUES "  # noqa: S608
                                f"({', '.join('?' * len(row))})", tuple(row.values()))
            for name, changes in todo.updates:
                changes = _encode(changes)
                cols = ", ".join(f"{k}=?" for k in changes)
                self.db.execute(f"UPDATE clients SET {cols} WHERE name=?",  # noqa: S608
                                (*changes.values(), name))
        for e in todo.events:
            audit(e.kind, e.message, client=e.client, key_id=e.key_id, **e.fields)

    def merged(self, clients: Iterable[Client], now: float) -> list[ClientState]:
        """The states as :meth:`sync_clients` would leave them, without writing anything."""
        from .merge import plan

        pending, rows = self._pending(clients)
        return plan(pending, rows, now).apply(self.all())

    def _pending(self, clients: Iterable[Client]) -> tuple[list[Client], list[ClientState]]:
        """The clients whose merge may change something, and the stored rows it needs.

        A configured client whose values are those of the last load is left out: with
        10,000 clients a reload then decodes only what changed.
        """
        from .merge import config_values

        clients = list(clients)
        try:
            try:
                cur = self.db.execute("SELECT name, config, source FROM clients")
            except sqlite3.OperationalError:  # a read-only look at a store before schema 3
                cur = self.db.execute("SELECT name, NULL AS config, source FROM clients")
            brief = {r["name"]: (r["config"], r["source"]) for r in cur}
        except sqlite3.Error as e:
            raise StateError(f"{self.path}: {e}") from None
        pending: list[Client] = []
        for c in clients:
            stored = brief.get(c.name)
            if (stored is None or stored[1] not in ("config", "removed")
                    or stored[0] != json.dumps(config_values(c), sort_keys=True)):
                pending.append(c)
        needed = {c.name for c in pending} | (set(brief) - {c.name for c in clients})
        if not needed:
            return pending, []
        rows = [_row_to_state(r) for r in self.db.execute("SELECT * FROM clients")
                if r["name"] in needed]
        return pending, rows

    def get(self, name: str) -> ClientState | None:
        try:
            row = self.db.execute("SELECT * FROM clients WHERE name=?", (name,)).fetchone()
        except sqlite3.Error as e:
            raise StateError(db_error(self.path, e)) from None
        return _row_to_state(row) if row else None

    def get_by_key_id(self, key_id: str) -> ClientState | None:
        try:
            row = self.db.execute("SELECT * FROM clients WHERE key_id=? ORDER BY"
                                  " source='gone' LIMIT 1", (key_id,)).fetchone()
        except sqlite3.Error as e:
            raise StateError(db_error(self.path, e)) from None
        return _row_to_state(row) if row else None

    def all(self) -> list[ClientState]:
        try:
            rows = self.db.execute("SELECT * FROM clients ORDER BY name").fetchall()
        except sqlite3.Error as e:
            raise StateError(db_error(self.path, e)) from None
        return [_row_to_state(r) for r in rows]

    def update(self, name: str, **changes: Any) -> None:
        bad = set(changes) - set(_COLUMNS) or ({"name"} & set(changes))
        if bad:
            raise ValueError(f"unknown state fields: {sorted(bad)}")
        changes = _encode(changes)
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
        """Disable every enabled client whose deadline has passed; return them.

        Tombstones (clients gone from clients.conf) are left as they are: if one comes
        back after its deadline, it is disabled then, when it is a client again.
        """
        with self._tx():
            rows = self.db.execute(
                "UPDATE clients SET enabled=0 WHERE enabled=1 AND deadline IS NOT NULL"
                " AND deadline<? AND source!='gone' RETURNING *", (now,)).fetchall()
        return [_row_to_state(r) for r in rows]

    def stop_requested(self, names: Iterable[str], since: float) -> set[str]:
        """Those of *names* whose checker ``mandos-ctl --stop-checker`` stopped after *since*."""
        wanted = set(names)
        rows = self.db.execute(
            "SELECT name FROM clients WHERE checker_stop_requested>=?", (since,)).fetchall()
        return {r["name"] for r in rows} & wanted

    # -- mandos-ctl ---------------------------------------------------------

    def add_client(self, name: str, key_id: str | None, section: str, now: float,
                   timeout: float, enabled: bool = True) -> bool | None:
        """A client added with ``mandos-ctl --add``: kept across config reloads.

        If its key belongs to a client that left clients.conf (a tombstone), that
        client's state is taken over, so a machine disabled before cannot return enabled
        by being added again; returns its enabled state then, else None.
        """
        with self._tx():
            if self.db.execute("SELECT 1 FROM clients WHERE name=? AND source!='gone'",
                               (name,)).fetchone():
                raise StateError(f"client {name} exists already")
            if key_id is not None and self.db.execute(
                    "SELECT name FROM clients WHERE key_id=? AND source!='gone'",
                    (key_id,)).fetchone():
                raise StateError(f"client {name}: another client has key_id {key_id}")
            old = self.db.execute(
                "SELECT name, enabled FROM clients WHERE source='gone' AND (key_id=? OR"
                " name=?) ORDER BY key_id=? DESC LIMIT 1", (key_id, name, key_id)).fetchone()
            if old is not None:
                self.db.execute("DELETE FROM clients WHERE name=? AND source='gone' AND"
                                " name!=?", (name, old["name"]))
                self.db.execute("UPDATE clients SET name=?, key_id=?, source='ctl', section=?,"
                                " config=NULL WHERE name=?", (name, key_id, section, old["name"]))
                return bool(old["enabled"])
            self.db.execute(
                "INSERT INTO clients (name, key_id, enabled, deadline, last_enabled,"
                " next_check, created, source, section) VALUES (?,?,?,?,?,?,?,'ctl',?)",
                (name, key_id, int(enabled), now + timeout, now, now, now, section))
        return None

    def remove(self, name: str) -> None:
        with self._tx():
            cur = self.db.execute("DELETE FROM clients WHERE name=?", (name,))
            if cur.rowcount == 0:
                raise StateError(f"no such client: {name}")

    def close(self) -> None:
        self.db.close()


def db_error(path: Path, e: sqlite3.Error, what: str = "") -> str:
    """One line for a database error; SQLite says "disk I/O error" for a full disk."""
    line = f"{path}: {what}{e}"
    try:
        full = os.statvfs(path.parent).f_bavail == 0
    except OSError:
        full = False
    return line + " (the file system is full)" if full else line


class _Transaction:
    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    def __enter__(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StateError(db_error(self.path, e)) from None

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
            raise StateError(db_error(self.path, e, "cannot save state: ")) from None


def known_clients(configured: Mapping[str, Client], states: Iterable[ClientState],
                  configdir: Path, defaults: Mapping[str, str] | None = None
                  ) -> dict[str, Client]:
    """Configured clients plus those added with ``mandos-ctl --add`` (kept in the store).

    An added client gets clients.conf's [DEFAULT] (*defaults*, read from *configdir*
    when not given); its section is parsed in memory, never written to a file.
    """
    import logging

    from . import added
    from .config import ConfigError, load_defaults

    out = dict(configured)
    extra = [st for st in states if st.source == "ctl" and st.section and st.name not in out]
    if not extra:
        return out
    log = logging.getLogger("mandosd.state")
    if defaults is None:
        try:
            defaults = load_defaults(configdir)
        except ConfigError as e:
            log.error("clients added with mandos-ctl: %s", e)
            return out
    for st in extra:
        try:
            out[st.name] = added.client(st.section or "", defaults,
                                        f"client {st.name} (added with mandos-ctl)")
        except ConfigError as e:
            log.error("%s", e)
    return out


def added_client(store: StateStore, key_id: str, defaults: Mapping[str, str]) -> Client | None:
    """The client with *key_id* added by ``mandos-ctl --add`` (not in clients.conf), if any."""
    import logging

    from . import added
    from .config import ConfigError

    st = store.get_by_key_id(key_id)
    if st is None or st.source != "ctl" or not st.section:
        return None
    try:
        return added.client(st.section, defaults, f"client {st.name} (added with mandos-ctl)")
    except ConfigError as e:
        logging.getLogger("mandosd.state").error("%s", e)
        return None
