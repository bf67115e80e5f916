"""The state store of a pool of key servers: one PostgreSQL database (psycopg 3).

Same interface as :class:`mandosd.state.SQLiteStore`; every server of the pool,
its checker passes and ``mandos-ctl --state-url`` open the same database, so a
secret sent, a disable, an approval on any server holds for all at once.

- Schema: versioned migrations (:data:`MIGRATIONS`), applied by whichever
  server connects first, under a transaction-scoped advisory lock.
- Unreachable database: every call raises :class:`StateError` (the server
  refuses with reason ``state-unavailable``); the store reconnects on a later
  call, no sooner than its back-off allows.  Nothing is half-written: each
  change is one transaction.
- Wake on change: a trigger sends ``NOTIFY mandos_clients, '<name>'`` when a
  client's enabled/approval columns change; :class:`mandosd.pglisten.ChangeListener`
  turns that into asyncio wake-ups for requests that wait for approval.
- Fleet audit: :class:`mandosd.pgaudit.AuditWriter` copies every audit entry
  into the ``audit`` table from a thread of its own (bounded queue while the
  database is away); journald keeps the per-server record as before.

It must never log a connection string (it may hold a password): messages name
the database by :func:`describe` only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import psycopg
from psycopg.rows import dict_row

from .config import Client
from .state import CheckRecord, ClientState, StateError

log = logging.getLogger("mandosd.pgstate")

SCHEMA_VERSION = 3
#: pg_advisory_xact_lock key: "mandosd schema" (any constant all servers share)
SCHEMA_LOCK = 0x6D616E646F73
NOTIFY_CHANNEL = "mandos_clients"
#: the column ``config`` holds each server's last-loaded clients.conf values under this key
BY_SERVER = "by_server"

#: (version reached, statements): applied in order to a database at a lower version;
#: never edit a released step, add one.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE clients (
            name TEXT PRIMARY KEY,
            key_id TEXT,
            enabled BOOLEAN NOT NULL,
            deadline DOUBLE PRECISION,
            last_enabled DOUBLE PRECISION,
            last_checked_ok DOUBLE PRECISION,
            last_checker_status INTEGER,
            last_checker_time DOUBLE PRECISION,
            checker_started DOUBLE PRECISION,
            next_check DOUBLE PRECISION,
            last_secret_sent DOUBLE PRECISION,
            approved_until DOUBLE PRECISION,
            approval_decision TEXT,
            approval_decided_at DOUBLE PRECISION,
            overrides TEXT NOT NULL DEFAULT '{}',
            source TEXT NOT NULL DEFAULT 'config',
            section TEXT,
            created DOUBLE PRECISION,
            last_approval_request DOUBLE PRECISION,
            approval_pending_until DOUBLE PRECISION,
            checker_stop_requested DOUBLE PRECISION)""",
        "CREATE INDEX clients_key_id ON clients(key_id)",
        "CREATE INDEX clients_next_check ON clients(next_check)",
        """CREATE TABLE audit (
            id BIGSERIAL PRIMARY KEY,
            at TIMESTAMPTZ NOT NULL,
            server TEXT NOT NULL,
            outcome TEXT NOT NULL,
            message_id TEXT NOT NULL,
            client TEXT,
            key_id TEXT,
            peer TEXT,
            reason TEXT,
            message TEXT NOT NULL,
            fields JSONB NOT NULL DEFAULT '{}')""",
        "CREATE INDEX audit_client_at ON audit(client, at)",
        "CREATE INDEX audit_at ON audit(at)",
        f"""CREATE FUNCTION mandos_client_changed() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('{NOTIFY_CHANNEL}', NEW.name);
                RETURN NULL;
            END $$""",
        """CREATE TRIGGER clients_changed AFTER UPDATE OF enabled, approval_decision,
            approval_decided_at, approved_until, source, deadline ON clients
            FOR EACH ROW EXECUTE FUNCTION mandos_client_changed()""",
    )),
    # clients.conf's values at the last load, so that a value changed there wins over the
    # stored state (mandosd/merge.py), as in SQLite's schema 3
    (2, ("ALTER TABLE clients ADD COLUMN config TEXT",)),
    # escrow packets, whichever server of the pool received them (mandosd/pgescrow.py)
    (3, (
        """CREATE TABLE escrow_packets (
            sequence BIGSERIAL PRIMARY KEY,
            key_id TEXT NOT NULL,
            client_name TEXT NOT NULL,
            volume_uuid TEXT NOT NULL,
            created BIGINT NOT NULL,
            received DOUBLE PRECISION NOT NULL,
            sha256 TEXT NOT NULL,
            host_name TEXT NOT NULL,
            slot INTEGER,
            packet BYTEA NOT NULL,
            server TEXT NOT NULL)""",
        "CREATE INDEX escrow_packets_volume ON escrow_packets (key_id, volume_uuid, sequence)",
        """CREATE TABLE escrow_uploads (
            key_id TEXT NOT NULL,
            received DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX escrow_uploads_client ON escrow_uploads (key_id, received)",
    )),
)

_COLUMNS = list(ClientState.__dataclass_fields__)
_CONN_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)

#: a claim is lost (its server died mid-pass) after the check's interval plus this: a
#: checker is killed at its interval and its result written within a second after
CLAIM_SLACK = 2.0
#: back-off between reconnection attempts (seconds): doubles up to the maximum
BACKOFF_MIN = 0.2
BACKOFF_MAX = 10.0
#: a call to the database that runs longer than this (seconds) is cut off: its
#: connection is shut down, the call fails (StateError: the request is refused) and a
#: later call reconnects.  A database that hangs with its connections open (its
#: processes stopped, its disk stalled, a host that still acknowledges TCP) would
#: otherwise hold the server's database thread, and every request queued behind it, for
#: as long as it hangs.  statement_timeout (10 s, :func:`connect_args`) ends a healthy
#: statement sooner.
CALL_LIMIT = 15.0


def parse_url(url: str) -> dict[str, Any]:
    """libpq's parameters of a connection string.

    libpq's own message for one it cannot parse quotes the string (a bad %-escape
    in the password, a lone bracket): it is never passed on.
    """
    try:
        return dict(psycopg.conninfo.conninfo_to_dict(url))
    except psycopg.ProgrammingError:
        raise StateError("the state URL is not a PostgreSQL connection string that libpq "
                         "can read (check its %-escapes, quotes and brackets; "
                         "postgresql://USER@HOST/DBNAME)") from None


def describe(url: str) -> str:
    """The database a connection string names, without user or password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "PostgreSQL (unparsable connection string)"
    where = info.get("host") or "local socket"
    port = f":{info['port']}" if info.get("port") else ""
    return f"PostgreSQL {info.get('dbname') or '(default database)'} on {where}{port}"


def check_passfile(url: str) -> None:
    """A password file the URL names (or $PGPASSFILE) must be readable by its owner only.

    libpq ignores such a file with a warning on standard error that a service's
    journal may never show, and the server would then fail to log in with
    "password authentication failed": say what is wrong instead, at start.
    """
    import os
    import stat

    info = parse_url(url)
    path = info.get("passfile") or os.environ.get("PGPASSFILE")
    if not path:
        return
    try:
        st = os.stat(str(path))
    except FileNotFoundError:
        raise StateError(f"{path}: the database password file does not exist") from None
    except OSError as e:
        raise StateError(f"{path}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise StateError(f"{path}: the database password file is readable by others "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}); make it 0600 "
                         f"(chmod 600 {path}): PostgreSQL ignores it otherwise")


def connect_args(url: str, timeout: float, name: str) -> dict[str, Any]:
    """libpq parameters: the URL's, plus bounds on a database that stops answering.

    A statement may take 10 s at most, and a TCP peer that vanishes without a
    reset is noticed within about 10 s; the URL may set other values.
    """
    args = parse_url(url)
    args.setdefault("connect_timeout", max(1, round(timeout)))
    args.setdefault("application_name", name[:63])
    args.setdefault("keepalives_idle", 5)
    args.setdefault("keepalives_interval", 2)
    args.setdefault("keepalives_count", 3)
    args.setdefault("tcp_user_timeout", 10000)
    args.setdefault("options", "-c statement_timeout=10000")
    return args


def _row(row: Mapping[str, Any], server: str | None = None) -> ClientState:
    """A client's state; its ``config`` is what *server* loaded last (see :func:`own_config`)."""
    values = {k: row[k] for k in _COLUMNS}
    values["overrides"] = json.loads(values["overrides"] or "{}")
    values["config"] = own_config(values["config"], server) if server else None
    return ClientState(**values)


def own_config(raw: str | None, server: str) -> dict[str, Any] | None:
    """The clients.conf values *server* loaded last for a client (column ``config``).

    Each server of the pool reads its own clients.conf, so "changed since the last
    load" is per server: ``{"by_server": {KEY: values}}``, KEY naming the host and
    state directory (:func:`mandosd.stores.config_key`), which its mandosd, checker
    pass and mandos-ctl share.  Compared with another
    server's values, an unchanged file would look changed, and a server whose file
    still says ``enabled = True`` would enable a client that another server's file
    disabled.  None: this server never loaded the client (or the value is one for the
    whole pool, from ``migrate-state``: whose file was that?), so only a disable in
    its file applies (:mod:`mandosd.merge`).
    """
    data = json.loads(raw) if raw else None
    mine = data.get(BY_SERVER) if isinstance(data, dict) else None
    found = mine.get(server) if isinstance(mine, dict) else None
    return found if isinstance(found, dict) else None


def with_own_config(raw: str | None, server: str, values: Mapping[str, Any]) -> str:
    """The column ``config`` with *server*'s *values* put in, the other servers' kept."""
    data = json.loads(raw) if raw else None
    mine = data.get(BY_SERVER) if isinstance(data, dict) else None
    others = mine if isinstance(mine, dict) else {}
    return json.dumps({BY_SERVER: {**others, server: dict(values)}}, sort_keys=True)


def migrate(conn: psycopg.Connection[Any], where: str) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; returns the version found first.

    The advisory lock is taken before anything is read, so servers that start at
    the same moment apply each step once, one after the other; it is released at
    commit.  A database already at this version is used without the lock: any role
    that may connect can hold an advisory lock (no privilege needed), and a reader
    holding this one must not keep servers from connecting.
    """
    cur = conn.cursor(row_factory=psycopg.rows.tuple_row)
    if cur.execute("SELECT to_regclass('mandos_schema') IS NOT NULL").fetchone() == (True,):
        row = cur.execute("SELECT max(version) FROM mandos_schema").fetchone()
        if row is not None and row[0] == SCHEMA_VERSION:
            return SCHEMA_VERSION
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS mandos_schema (version INTEGER NOT NULL)")
        row = cur.execute("SELECT max(version) FROM mandos_schema").fetchone()
        version = row[0] if row and row[0] is not None else 0
        if version > SCHEMA_VERSION:
            raise StateError(f"{where}: made by a newer mandosd (schema {version} > "
                             f"{SCHEMA_VERSION}); refusing to touch it")
        for target, statements in MIGRATIONS:
            if version < target:
                for stmt in statements:
                    conn.execute(stmt)  # type: ignore[arg-type]
                conn.execute("INSERT INTO mandos_schema (version) VALUES (%s)", (target,))
    return version


class PostgresStore:
    """The pool's state store.  One connection; calls come from one thread at a time."""

    def __init__(self, url: str, *, server_name: str | None = None,
                 connect_timeout: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 lazy: bool = False, config_key: str | None = None) -> None:
        self.url = url
        self.where = describe(url)
        self.server_name = server_name or socket.gethostname()
        #: whose clients.conf this store's loads are (see :func:`own_config`)
        self.config_key = config_key or self.server_name
        self.connect_timeout = connect_timeout
        self.clock = clock
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.RLock()
        self._backoff = 0.0
        self._next_try = 0.0
        self._unreachable = False
        check_passfile(url)  # a mistake in the setup: said at start, never "lazy"
        self._watchdog = _Watchdog(self.where)
        try:
            self._connect()
        except StateError as e:
            # *lazy* (a server): start anyway, refuse, and connect on a later call;
            # otherwise (mandos-ctl) an unreachable database is an error now
            if not lazy or not self._unreachable:
                raise
            log.error("%s", e)

    # -- the connection ----------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        self._unreachable = False
        try:
            conn = psycopg.connect(**connect_args(self.url, self.connect_timeout,
                                                  f"mandosd {self.server_name}"),
                                   autocommit=True, row_factory=dict_row)
        except psycopg.Error as e:
            self._failed()
            self._unreachable = True
            raise StateError(f"{self.where}: unreachable: {first_line(e)}") from None
        try:
            with self._watchdog.watching(conn):
                migrate(conn, self.where)
        except psycopg.Error as e:
            conn.close()
            self._failed()
            raise StateError(f"{self.where}: cannot prepare the schema: "
                             f"{first_line(e)}") from None
        except StateError:
            conn.close()
            raise
        if self._backoff:
            log.info("%s: reconnected", self.where)
        self._backoff = 0.0
        self._conn = conn
        return conn

    def _failed(self) -> None:
        self._backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self._backoff * 2))
        self._next_try = self.clock() + self._backoff

    def _get(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self.clock() < self._next_try:
            raise StateError(f"{self.where}: unreachable (next attempt in "
                             f"{self._next_try - self.clock():.1f} s)")
        return self._connect()

    def _run(self, fn: Callable[[psycopg.Connection[Any]], Any], *, tx: bool = True) -> Any:
        """Run *fn* in one transaction; a lost connection becomes a StateError.

        *tx* false: *fn* runs one statement, which autocommit makes its own
        transaction (one round trip instead of three: a request's cost).  A
        transaction whose BEGIN finds the connection dead (the database restarted
        while it was idle) has run nothing: it runs once more on a new connection.
        """
        with self._lock:
            idle = self._conn is not None and not self._conn.closed
            conn = self._get()
            began = False
            try:
                with self._watchdog.watching(conn):
                    if not tx:
                        return fn(conn)
                    with conn.transaction():
                        began = True
                        return fn(conn)
            except _CONN_ERRORS as e:
                if self._dropped(conn):
                    log.error("%s: connection lost: %s", self.where, first_line(e))
                    if tx and idle and not began:
                        return self._again(fn)
                    self._failed()
                raise StateError(f"{self.where}: {first_line(e)}") from None
            except psycopg.Error as e:
                raise StateError(f"{self.where}: {first_line(e)}") from None

    def _again(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """*fn* in one transaction on a new connection (the lock held), once."""
        conn = self._connect()
        try:
            with self._watchdog.watching(conn), conn.transaction():
                return fn(conn)
        except _CONN_ERRORS as e:
            if self._dropped(conn):
                self._failed()
            raise StateError(f"{self.where}: {first_line(e)}") from None
        except psycopg.Error as e:
            raise StateError(f"{self.where}: {first_line(e)}") from None

    def _dropped(self, conn: psycopg.Connection[Any]) -> bool:
        """A connection an error left closed or broken is let go (the next call makes a
        new one); True if it was."""
        if not (conn.closed or conn.broken):
            return False
        self._conn = None
        with _suppress():
            conn.close()
        return True

    # -- the StateStore interface -------------------------------------------------

    def sync_clients(self, clients: Iterable[Client], now: float) -> None:
        """Merge this server's configured clients into the shared state, as Mandos does
        (mandosd/merge.py): a value changed in clients.conf since the last load wins over
        the stored state, an unchanged one leaves it alone, each change is audited.

        Unlike SQLite, only this server's own clients are considered: a client missing
        from this server's clients.conf is neither deleted nor made a tombstone, since
        other servers of the pool may still have it (this server refuses it, see the
        server); and a removed client stays removed.
        """
        from .audit import audit
        from .merge import Plan, plan

        clients = list(clients)

        me = self.config_key

        def step(conn: psycopg.Connection[Any], pending: list[Client]) -> tuple[Plan, set[str]]:
            """Merge *pending*; returns the plan and the names another server inserted
            first (their rows exist now: merged again, as this server's first load)."""
            found = conn.execute(
                "SELECT * FROM clients WHERE name = ANY(%s) ORDER BY name FOR UPDATE",
                ([c.name for c in pending],)).fetchall()
            raw = {r["name"]: r["config"] for r in found}  # every server's, under our lock
            todo = plan(pending, [_row(r, me) for r in found], now)
            lost: set[str] = set()
            with conn.cursor() as cur:
                # in name order, as the rows were locked: two servers inserting the same
                # new clients at once wait for each other instead of deadlocking
                for row in sorted(todo.inserts, key=lambda r: str(r["name"])):
                    cols = list(row)
                    values = [with_own_config(None, me, row[k]) if k == "config"
                              else _db_value(k, row[k]) for k in cols]
                    cur.execute(f"INSERT INTO clients ({', '.join(cols)}) VALUES "  # noqa: S608
                                f"({', '.join(['%s'] * len(cols))}) ON CONFLICT (name) DO NOTHING"
                                " RETURNING name", values)
                    if cur.fetchone() is None:
                        lost.add(row["name"])
                for name, changes in todo.updates:
                    bad = set(changes) - set(_COLUMNS)
                    if bad:
                        raise StateError(f"unknown state fields {sorted(bad)}")
                    cols_set = ", ".join(f"{k}=%s" for k in changes)  # keys checked above
                    values = [with_own_config(raw.get(name), me, v) if k == "config"
                              else _db_value(k, v) for k, v in changes.items()]
                    cur.execute(f"UPDATE clients SET {cols_set} WHERE name=%s",  # noqa: S608
                                [*values, name])
            return todo, lost

        def tx(conn: psycopg.Connection[Any]) -> Plan:
            todo, lost = step(conn, clients)
            if lost:  # servers starting at once: an "enabled = False" here still counts
                again, _ = step(conn, [c for c in clients if c.name in lost])
                todo.updates += again.updates
                todo.events += again.events
            return todo

        todo = self._run(tx)
        for ev in todo.events:
            audit(ev.kind, ev.message, client=ev.client, key_id=ev.key_id, **ev.fields)

    def merged(self, clients: Iterable[Client], now: float) -> list[ClientState]:
        """The states as :meth:`sync_clients` would leave them, without writing anything."""
        from .merge import plan

        clients = list(clients)
        names = {c.name for c in clients}
        rows = self._run(lambda c: c.execute("SELECT * FROM clients ORDER BY name").fetchall(),
                         tx=False)
        states = [_row(r, self.config_key) for r in rows]
        return plan(clients, [s for s in states if s.name in names], now).apply(states)

    def get(self, name: str) -> ClientState | None:
        row = self._run(lambda c: c.execute("SELECT * FROM clients WHERE name=%s",
                                            (name,)).fetchone(), tx=False)
        return _row(row) if row else None

    def get_many(self, names: list[str]) -> dict[str, ClientState]:
        """The states of *names* (those that exist), in one round trip: the server reads
        every request of a batch at once."""
        rows = self._run(lambda c: c.execute("SELECT * FROM clients WHERE name = ANY(%s)",
                                             (names,)).fetchall(), tx=False)
        return {r["name"]: _row(r) for r in rows}

    def get_by_key_id(self, key_id: str) -> ClientState | None:
        row = self._run(lambda c: c.execute("SELECT * FROM clients WHERE key_id=%s",
                                            (key_id,)).fetchone(), tx=False)
        return _row(row) if row else None

    def all(self) -> list[ClientState]:
        rows = self._run(lambda c: c.execute("SELECT * FROM clients ORDER BY name").fetchall(),
                         tx=False)
        return [_row(r) for r in rows]

    def update(self, name: str, **changes: Any) -> None:
        bad = set(changes) - set(_COLUMNS) or ({"name"} & set(changes))
        if bad:
            raise ValueError(f"unknown state fields: {sorted(bad)}")
        if "overrides" in changes:
            changes["overrides"] = json.dumps(changes["overrides"], sort_keys=True)
        if "enabled" in changes:
            changes["enabled"] = bool(changes["enabled"])
        cols = ", ".join(f"{k}=%s" for k in changes)  # keys checked against _COLUMNS

        def tx(conn: psycopg.Connection[Any]) -> None:
            cur = conn.execute(f"UPDATE clients SET {cols} WHERE name=%s",  # type: ignore[arg-type]
                               (*changes.values(), name))
            if cur.rowcount == 0:
                raise StateError(f"no such client: {name}")
        self._run(tx, tx=False)

    def record_secret_sent(self, name: str, now: float, deadline: float) -> None:
        """Record a secret about to be sent; refuses if the client changed meanwhile.

        Another server or ``mandos-ctl`` may have disabled the client (or let its
        deadline pass) between this server's read and this write: then nothing is
        recorded and :class:`StateError` says so, and the secret is not sent.
        """
        def tx(conn: psycopg.Connection[Any]) -> None:
            cur = conn.execute(
                "UPDATE clients SET last_secret_sent=%s,"
                " deadline=GREATEST(COALESCE(deadline, 0), %s)"
                " WHERE name=%s AND enabled AND source <> 'removed'"
                " AND (deadline IS NULL OR deadline >= %s)", (now, deadline, name, now))
            if cur.rowcount == 0:
                raise StateError(f"{name}: disabled or timed out by another server "
                                 "meanwhile")
        self._run(tx, tx=False)

    def record_secrets_sent(self, deadlines: Mapping[str, float], now: float) -> set[str]:
        """:meth:`record_secret_sent` for many clients (name: new deadline) in one
        statement; returns the names recorded.  A client another server or
        ``mandos-ctl`` disabled (or whose deadline passed) meanwhile is not recorded,
        and its secret is not sent."""
        names = list(deadlines)
        rows = self._run(lambda c: c.execute(
            "UPDATE clients SET last_secret_sent=%s,"
            " deadline=GREATEST(COALESCE(clients.deadline, 0), d.deadline)"
            " FROM unnest(%s::text[], %s::float8[]) AS d(name, deadline)"
            " WHERE clients.name=d.name AND clients.enabled AND clients.source <> 'removed'"
            " AND (clients.deadline IS NULL OR clients.deadline >= %s)"
            " RETURNING clients.name",
            (now, names, [deadlines[n] for n in names], now)).fetchall(), tx=False)
        return {r["name"] for r in rows}

    def claim_checks(self, candidates: Mapping[str, float], now: float,
                     force: bool = False) -> list[str]:
        """Claim the due checks of *candidates* (name: interval) for this pass.

        Row locks with ``SKIP LOCKED``: passes on other servers neither wait for this
        one nor claim the same client; a claim older than the interval plus
        :data:`CLAIM_SLACK` (its server died mid-pass) counts as lost and is taken
        over by the next pass of any server.
        """
        if not candidates:
            return []
        names = list(candidates)
        intervals = [candidates[n] for n in names]

        def tx(conn: psycopg.Connection[Any]) -> list[str]:
            rows = conn.execute(
                "WITH due AS (SELECT c.name FROM clients c"
                "   JOIN unnest(%s::text[], %s::float8[]) AS d(name, ival) ON c.name=d.name"
                "   WHERE c.enabled AND (%s OR c.next_check IS NULL OR c.next_check<=%s)"
                "   AND (c.checker_started IS NULL OR c.checker_started < %s - d.ival - %s)"
                "   FOR UPDATE OF c SKIP LOCKED)"
                " UPDATE clients SET checker_started=%s FROM due"
                " WHERE clients.name=due.name RETURNING clients.name",
                (names, intervals, force, now, now, CLAIM_SLACK, now)).fetchall()
            return [r["name"] for r in rows]
        claimed: list[str] = self._run(tx)
        return sorted(claimed, key=names.index)

    def record_checks(self, results: Iterable[CheckRecord]) -> None:
        rows = [(r.status, r.finished, r.next_check,
                 r.finished if r.deadline is not None else None,
                 r.deadline, r.finished, r.deadline, r.name) for r in results]
        if not rows:
            return

        def tx(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                cur.executemany(
                    "UPDATE clients SET last_checker_status=%s, last_checker_time=%s,"
                    " checker_started=NULL, next_check=%s,"
                    " last_checked_ok=COALESCE(%s, last_checked_ok),"
                    " deadline=CASE WHEN %s::float8 IS NOT NULL AND enabled"
                    "   AND (deadline IS NULL OR deadline >= %s)"
                    "   THEN GREATEST(COALESCE(deadline, 0), %s) ELSE deadline END"
                    " WHERE name=%s", rows)
        self._run(tx)

    def disable_expired(self, now: float) -> list[ClientState]:
        rows = self._run(lambda c: c.execute(
            "UPDATE clients SET enabled=false WHERE enabled AND deadline IS NOT NULL"
            " AND deadline<%s RETURNING *", (now,)).fetchall())
        return [_row(r) for r in rows]

    def stop_requested(self, names: Iterable[str], since: float) -> set[str]:
        wanted = set(names)
        rows = self._run(lambda c: c.execute(
            "SELECT name FROM clients WHERE checker_stop_requested>=%s", (since,)).fetchall())
        return {r["name"] for r in rows} & wanted

    def add_client(self, name: str, key_id: str | None, section: str, now: float,
                   timeout: float, enabled: bool = True) -> None:
        def tx(conn: psycopg.Connection[Any]) -> None:
            if conn.execute("SELECT 1 FROM clients WHERE name=%s", (name,)).fetchone():
                raise StateError(f"client {name} exists already")
            if key_id is not None and conn.execute(
                    "SELECT 1 FROM clients WHERE key_id=%s", (key_id,)).fetchone():
                raise StateError(f"client {name}: another client has key_id {key_id}")
            conn.execute(
                "INSERT INTO clients (name, key_id, enabled, deadline, last_enabled,"
                " next_check, created, source, section)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,'ctl',%s)",
                (name, key_id, enabled, now + timeout, now, now, now, section))
        self._run(tx)

    def remove(self, name: str) -> None:
        def tx(conn: psycopg.Connection[Any]) -> None:
            if conn.execute("DELETE FROM clients WHERE name=%s", (name,)).rowcount == 0:
                raise StateError(f"no such client: {name}")
        self._run(tx)

    def close(self) -> None:
        with self._lock:
            self._watchdog.close()
            if self._conn is not None:
                with _suppress():
                    self._conn.close()
                self._conn = None

    # -- the pool only ---------------------------------------------------------------

    def run(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """*fn* in one transaction on the pool's connection (the escrow store's way in)."""
        return self._run(fn)

    def import_states(self, states: Iterable[ClientState],
                      also: Callable[[psycopg.Connection[Any]], Any] | None = None) -> int:
        """Copy client states (from SQLite) into an empty table, and run *also* in the
        same transaction (the escrow packets); returns how many clients."""
        rows = [[_db_value(k, getattr(s, k)) for k in _COLUMNS] for s in states]
        cols = ", ".join(_COLUMNS)
        marks = ", ".join(["%s"] * len(_COLUMNS))

        def tx(conn: psycopg.Connection[Any]) -> int:
            conn.execute("LOCK TABLE clients IN EXCLUSIVE MODE")
            if conn.execute("SELECT 1 FROM clients LIMIT 1").fetchone():
                raise StateError(f"{self.where}: already holds clients; refusing to "
                                 "merge another state into it")
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO clients ({cols}) VALUES ({marks})",  # type: ignore[arg-type]
                                rows)
            if also is not None:
                also(conn)
            return len(rows)
        count: int = self._run(tx)
        return count

    def audit_log(self, client: str | None = None, limit: int = 100
                  ) -> list[dict[str, Any]]:
        """The newest *limit* audit rows (of *client*), oldest first."""
        rows: list[dict[str, Any]] = self._run(lambda c: c.execute(
            "SELECT * FROM (SELECT id, at, server, outcome, client, key_id, peer, reason,"
            " message FROM audit WHERE %s::text IS NULL OR client=%s"
            " ORDER BY id DESC LIMIT %s) t ORDER BY id", (client, client, limit)).fetchall())
        return rows


def _db_value(key: str, value: Any) -> Any:
    if key in ("overrides", "config") and value is not None:
        return json.dumps(dict(value), sort_keys=True)
    return value


def first_line(e: BaseException) -> str:
    """The first line of an error's text (psycopg's may go on with a hint, or quote)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return exc_type is not None and issubclass(exc_type, Exception)  # type: ignore[arg-type]


class _Watchdog:
    """Cuts off a store's database call that runs past :data:`CALL_LIMIT`.

    One thread per store, started with its first call; it shuts the call's socket
    down, which makes libpq fail the call at once (the connection is then broken and
    dropped by :meth:`PostgresStore._run`).
    """

    def __init__(self, where: str, limit: float = CALL_LIMIT) -> None:
        self.where = where
        self.limit = limit
        self._busy: tuple[psycopg.Connection[Any], float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mandosd-db-watchdog",
                                            daemon=True)
            self._thread.start()
        self._busy = (conn, time.monotonic())
        try:
            yield
        finally:
            self._busy = None

    def _loop(self) -> None:
        cut: tuple[psycopg.Connection[Any], float] | None = None
        while not self._stop.wait(min(1.0, self.limit / 4)):
            busy = self._busy
            if busy is None or busy is cut or time.monotonic() - busy[1] < self.limit:
                continue
            cut = busy
            log.error("%s: no answer in %.0f s; dropping the connection", self.where,
                      self.limit)
            try:
                with socket.socket(fileno=os.dup(busy[0].pgconn.socket)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except (psycopg.Error, OSError) as e:
                log.debug("%s: cutting the connection: %s", self.where, first_line(e))

    def close(self) -> None:
        self._stop.set()
