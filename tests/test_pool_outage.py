"""The pool's database goes away in the middle of a herd, and comes back.

Three real mandosd share one real PostgreSQL 15 (Debian's, started by the
test); a herd of simulated client machines (each its own key and secret,
fetching by hand with GnuTLS: exactly the bytes on the wire) fetches from
them while the database is stopped under them: a clean fast shutdown, an
immediate one, or SIGKILL of the postmaster alone; one request is caught
between its decision and its record (a trigger holds srv1's write) when the
database goes.  Judged from outside, as an auditor would:

- no server crashes or exits, and none logs a traceback;
- while the database is away every answer is zero bytes, and each refusal is
  one audit entry ``MANDOS_REASON=state-unavailable`` for that very connection;
- every secret a client received is one ``secret-sent`` entry of the server it
  came from (same peer address), and the database recorded it *before* the
  client had it: the client's ``last_secret_sent`` falls inside that fetch,
  and no fetch that began and ended while the database was away got a secret;
- the database back on the same data directory: every server serves again
  without a restart, every client of the herd gets its secret, and the fleet
  audit table catches up with every decision taken meanwhile.

Also: a request waiting for approval when the database goes away (or just
after an approval released it) is refused and audited, not left hanging until
its approval delay, and once the database is back an approval through another
server releases the next one through the LISTEN connection made again; outage
after outage leaves no thread or connection behind; the audit writer keeps its
back-off; a frozen database (SIGSTOP) is refused like one that is away.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import pglib
from tests.helpers import Mandosd, RawClient, raw_clients, wait_for
from tests.pglib import pool_ctl, servers, state, wait_logged

UNAVAILABLE = "state-unavailable"
#: a client's pause before it tries again after zero bytes (cut short when the herd ends)
RETRY = 0.1


# -- what the auditor reads -----------------------------------------------------------

_FIELD = re.compile(r"(?:\[| )([A-Z][A-Z0-9_]*)=(.*?)(?= [A-Z][A-Z0-9_]*=|\]$)")


def audit_entries(srv: Mandosd) -> list[dict[str, str]]:
    """The server's audit entries (MANDOS_* fields), as journald would store them."""
    out = []
    for line in srv.log().splitlines():
        if "MANDOS_OUTCOME=" in line and line.endswith("]"):
            out.append(dict(_FIELD.findall(line[line.index(" ["):])))
    return out


def threads_and_fds(srv: Mandosd) -> tuple[int, int]:
    assert srv.proc is not None
    proc = Path(f"/proc/{srv.proc.pid}")
    return len(list((proc / "task").iterdir())), len(list((proc / "fd").iterdir()))


def alive_and_clean(srvs: list[Mandosd]) -> None:
    for s in srvs:
        assert s.proc is not None and s.proc.poll() is None, f"mandosd exited:\n{s.log()}"
        assert "Traceback" not in s.log() and "internal error" not in s.log(), s.log()


def audit_rows(url: str) -> list[dict[str, object]]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute("SELECT server, outcome, client, peer, reason FROM audit"
                            ).fetchall()


def gate(url: str, column: str, server: str, client: str) -> None:
    """Catch *server* in the middle of a request: its write of *column* for *client*
    hangs (pg_sleep in a trigger) until the database goes away under it.

    Only in this life of the postmaster: once the database is started again, writes
    go through as before.
    """
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_postmaster_start_time()::text").fetchone()
        assert row is not None
        body = f"""BEGIN
            IF current_setting('application_name') = 'mandosd {server}'
                    AND NEW.name = '{client}'
                    AND pg_postmaster_start_time() = '{row[0]}'::timestamptz THEN
                PERFORM pg_sleep(3600);
            END IF;
            RETURN NEW;
        END"""
        conn.execute(f"CREATE FUNCTION gate_{column}() RETURNS trigger LANGUAGE plpgsql"
                     f" AS $${body}$$")  # type: ignore[arg-type]
        conn.execute(f"CREATE TRIGGER gate_{column} BEFORE UPDATE OF {column} ON clients"
                     f" FOR EACH ROW EXECUTE FUNCTION gate_{column}()")  # type: ignore[arg-type]


def caught(url: str, server: str) -> bool:
    """*server* is held by a :func:`gate`."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                           " application_name = %s AND wait_event = 'PgSleep'",
                           (f"mandosd {server}",)).fetchone()
    return bool(row and row[0])


def listeners(url: str) -> int:
    """LISTEN connections of the servers (the approval wakers) now in the database."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity"
                           " WHERE application_name = 'mandosd listener'").fetchone()
    return int(row[0]) if row else 0


# -- the herd ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    client: str
    server: int  # index into the pool
    local: str   # our host:port, the server's MANDOS_PEER
    data: bytes
    error: str | None
    started: float
    ended: float


class Herd:
    """Client threads fetching by hand; every attempt is kept for the verdict."""

    def __init__(self, srvs: list[Mandosd], clients: list[RawClient]) -> None:
        self.srvs = srvs
        self.secrets = {c.name: c.secret for c in clients}
        self.attempts: list[Attempt] = []
        self.lock = threading.Lock()
        self.ending = threading.Event()
        self.threads: list[threading.Thread] = []

    def fetch(self, c: RawClient, i: int) -> Attempt:
        started = time.time()
        try:
            r = c.exchange(self.srvs[i].address)
            got = Attempt(c.name, i, r.local, r.data, str(r.error) if r.error else None,
                          started, time.time())
        except OSError as e:  # a server that died: the verdict reports it
            got = Attempt(c.name, i, "", b"", str(e), started, time.time())
        with self.lock:
            self.attempts.append(got)
        return got

    def served(self, name: str | None = None, since: float = 0.0) -> list[Attempt]:
        with self.lock:
            return [a for a in self.attempts if a.data and a.started >= since
                    and (name is None or a.client == name)]

    def _until_served(self, c: RawClient, first: int) -> None:
        """A client machine at boot: tries the servers in turn until it has its secret."""
        k = first
        while not self.ending.is_set():
            if self.fetch(c, k % len(self.srvs)).data:
                return
            k += 1
            self.ending.wait(RETRY)

    def _forever(self, c: RawClient, i: int) -> None:
        """A client that keeps fetching from one server: requests always in flight."""
        while not self.ending.is_set():
            self.fetch(c, i)
            self.ending.wait(RETRY / 2)

    def start(self, clients: list[RawClient], *, forever: bool = False) -> None:
        for n, c in enumerate(clients):
            t = threading.Thread(target=self._forever if forever else self._until_served,
                                 args=(c, n % len(self.srvs)), daemon=True)
            t.start()
            self.threads.append(t)

    def end(self) -> None:
        self.ending.set()
        for t in self.threads:
            t.join(60)


@pytest.mark.parametrize("mode", ["fast", "immediate", "kill"])
def test_database_stopped_mid_herd(tmp_path: Path, pg: pglib.Postgres, url: str,
                                   mode: pglib.StopMode) -> None:
    steady = raw_clients(3, "h")                 # one per server, fetching all along
    waves = [raw_clients(20, f"w{n}x") for n in range(3)]
    [late] = raw_clients(1, "r")                 # its record is under way at the stop
    everyone = steady + [c for w in waves for c in w] + [late]
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[c.section() for c in everyone]] * 3, stack)
        herd = Herd(srvs, everyone)
        stack.callback(herd.end)

        herd.start(steady, forever=True)
        herd.start(waves[0])
        wait_for(lambda: all(herd.served(c.name) for c in waves[0]), 120,
                 "the first wave to be served", interval=0.05)
        herd.start(waves[1])
        wait_for(lambda: any(herd.served(c.name) for c in waves[1]), 120,
                 "the second wave to be fetching", interval=0.01)
        # one request caught between its decision and its record: srv1's write of
        # last_secret_sent hangs in the database when the database goes away
        gate(url, "last_secret_sent", "srv1", late.name)
        herd.start([late])
        wait_for(lambda: caught(url, "srv1"), 60, "srv1 to be recording a secret",
                 interval=0.02)
        pg.stop(mode)  # under it, the second wave and the steady clients' requests
        down = time.time()  # from here on, nothing can answer or commit
        herd.start(waves[2])

        def refused_by_each() -> bool:
            refusals = [a for a in herd.attempts[:] if a.started >= down and not a.data]
            return all(sum(a.server == i for a in refusals) >= 3 for i in range(len(srvs)))

        wait_for(refused_by_each, 120, "every server to refuse while the database is away",
                 interval=0.05)
        alive_and_clean(srvs)
        up = time.time()
        pg.start()  # same data directory

        for i, h in enumerate(steady):  # each server serves again, not restarted
            wait_for(lambda h=h: herd.served(h.name, since=up), 120,
                     f"srv{i + 1} to serve again", interval=0.1)
        wait_for(lambda: all(herd.served(c.name) for c in everyone), 120,
                 "every client of the herd to be served", interval=0.1)
        herd.end()
        alive_and_clean(srvs)

        attempts = herd.attempts
        # on the wire: a client's own secret, whole, or zero bytes; nothing else
        for a in attempts:
            assert a.error is None, a
            assert a.data in (b"", herd.secrets[a.client]), a
        # while the database was away, nobody got a secret
        assert not [a for a in attempts if a.data and down <= a.started and a.ended <= up]
        assert any(not a.data and down <= a.started for a in attempts)

        # every connection has its audit entry on the server it reached: each secret a
        # "secret-sent" (same client, same peer), each refusal "state-unavailable"
        for i, s in enumerate(srvs):
            entries = audit_entries(s)
            sent = Counter((e["MANDOS_CLIENT"], e["MANDOS_PEER"]) for e in entries
                           if e["MANDOS_OUTCOME"] == "secret-sent")
            assert sent == Counter((a.client, a.local) for a in attempts
                                   if a.server == i and a.data)
            refused = Counter(e["MANDOS_PEER"] for e in entries if "MANDOS_PEER" in e
                              and e["MANDOS_OUTCOME"] != "secret-sent")
            assert refused == Counter(a.local for a in attempts if a.server == i
                                      and not a.data)
            assert {e.get("MANDOS_REASON") for e in entries if "MANDOS_PEER" in e
                    and e["MANDOS_OUTCOME"] != "secret-sent"} == {UNAVAILABLE}

        # and the database recorded each secret before its client had it
        for c in everyone:
            last = herd.served(c.name)[-1]
            recorded = state(url, c.name)["last_secret_sent"]
            assert isinstance(recorded, float), (c.name, recorded)
            assert recorded >= last.started, (c.name, recorded, last)
            if c not in steady:  # served once: the record is that fetch's
                assert len(herd.served(c.name)) == 1
                assert recorded <= last.ended, (c.name, recorded, last)

        # the fleet audit table catches up with what was decided while it was away
        want = Counter((f"srv{a.server + 1}", "secret-sent" if a.data else "protocol-error",
                        a.local, None if a.data else UNAVAILABLE) for a in attempts)

        def caught_up() -> bool:
            rows = Counter((r["server"], r["outcome"], r["peer"],
                            None if r["outcome"] == "secret-sent" else r["reason"])
                           for r in audit_rows(url) if r["peer"] is not None)
            return rows == want

        wait_for(caught_up, 120, "the audit table to hold every decision", interval=0.2)


def test_a_request_waiting_for_approval_when_the_database_goes_away(
        tmp_path: Path, pg: pglib.Postgres, url: str) -> None:
    """Refused and audited, whether the database goes away while the request waits or
    just after an approval released it; never left waiting for its hour, never sent
    unrecorded; once the database is back an approval through another server, woken
    through the LISTEN connection made again, releases the next request."""
    waiter, probe = raw_clients(2, "a")
    section = waiter.section("approval_delay = PT1H\napproved_by_default = False\n")
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[section, probe.section()]] * 2, stack)
        herd = Herd(srvs, [waiter, probe])
        stack.callback(herd.end)

        def waiting() -> tuple[threading.Thread, list[Attempt]]:
            got: list[Attempt] = []
            t = threading.Thread(target=lambda: got.append(herd.fetch(waiter, 0)),
                                 daemon=True)
            since = time.time()
            t.start()
            wait_for(lambda: (state(url, waiter.name)["last_approval_request"] or 0) >= since,
                     60, "the request to wait for approval", interval=0.05)
            # the server waits on LISTEN, woken by changes (not polling)
            wait_for(lambda: listeners(url) == 1, 60, "srv1's LISTEN connection",
                     interval=0.05)
            return t, got

        def refused(t: threading.Thread, got: list[Attempt]) -> None:
            t.join(60)  # long before the hour of its approval delay
            assert not t.is_alive()
            [a] = got
            assert a.error is None and a.data == b""
            answers = [e for e in audit_entries(srvs[0]) if e.get("MANDOS_PEER") == a.local
                       and e["MANDOS_OUTCOME"] != "approval-requested"]
            assert [e.get("MANDOS_REASON") for e in answers] == [UNAVAILABLE], srvs[0].log()
            alive_and_clean(srvs)

        def back() -> None:
            pg.start()
            wait_for(lambda: herd.fetch(probe, 0).data, 60, "srv1 to serve again",
                     interval=0.1)

        # the database goes away while the request waits
        t, got = waiting()
        pg.stop("kill")
        refused(t, got)
        back()

        # ... or just after an approval released it, before its secret is recorded
        gate(url, "approved_until", "srv1", waiter.name)
        t, got = waiting()
        assert pool_ctl(srvs[1], url, "--approve", waiter.name).returncode == 0
        wait_for(lambda: caught(url, "srv1"), 60, "srv1 to record the approval",
                 interval=0.02)
        pg.stop("fast")
        refused(t, got)
        back()

        # and with the database back, an approval through the other server releases it
        # (once the one given for the refused request has lapsed: approval_duration)
        wait_for(lambda: (state(url, waiter.name)["approved_until"] or 0) < time.time(), 60,
                 "the earlier approval to lapse", interval=0.05)
        t, got = waiting()
        assert pool_ctl(srvs[1], url, "--approve", waiter.name).returncode == 0
        t.join(60)
        assert [a.data for a in got] == [waiter.secret]
        recorded = state(url, waiter.name)["last_secret_sent"]
        assert isinstance(recorded, float) and got[0].started <= recorded <= got[0].ended
        assert [a.data for a in herd.served(waiter.name)] == [waiter.secret]
        alive_and_clean(srvs)
        wait_logged(srvs[0], "approved by an administrator")
        # released by the approval's notification on the LISTEN connection made again,
        # not by the server's periodic re-read
        lines = srvs[0].log().splitlines()
        sent = max(i for i, x in enumerate(lines) if f"sent secret to {waiter.name}" in x)
        reread = [x for x in lines[:sent] if f"{waiter.name}: approval state re-read" in x]
        assert reread[-1].endswith("(the state changed)"), reread


def test_outage_after_outage_leaves_no_thread_or_connection_behind(
        tmp_path: Path, pg: pglib.Postgres, url: str) -> None:
    """Each outage is survived with what the server had: the audit writer's thread, the
    LISTEN connection and the store's connection are made again, never added."""
    probe, waiter = raw_clients(2, "l")
    section = waiter.section("approval_delay = PT1H\napproved_by_default = False\n")
    with ExitStack() as stack:
        [srv] = servers(tmp_path, url, [[probe.section(), section]], stack)
        herd = Herd([srv], [probe, waiter])
        stack.callback(herd.end)
        wait_logged(srv, "checker pass:")  # its checker processes are done
        # an approval wait starts the LISTEN connection, which then lives on
        t = threading.Thread(target=herd.fetch, args=(waiter, 0), daemon=True)
        t.start()
        wait_logged(srv, "MANDOS_OUTCOME=approval-requested")
        wait_for(lambda: listeners(url) == 1, 60, "the LISTEN connection", interval=0.05)
        assert pool_ctl(srv, url, "--approve", waiter.name).returncode == 0
        t.join(60)
        assert herd.served(waiter.name)

        seen = []
        for mode in ("fast", "immediate", "kill", "fast"):
            pg.stop(mode)  # type: ignore[arg-type]
            refused = herd.fetch(probe, 0)
            assert refused.error is None and refused.data == b""
            pg.start()
            wait_for(lambda: herd.fetch(probe, 0).data, 60, "the server to serve again",
                     interval=0.1)
            wait_for(lambda: listeners(url) == 1, 60, "the LISTEN connection again",
                     interval=0.05)
            wait_for(lambda r=refused: any(row["peer"] == r.local for row in audit_rows(url)),
                     60, "the audit writer to write again", interval=0.1)
            seen.append(threads_and_fds(srv))
        alive_and_clean([srv])
        assert seen[1:] == seen[:1] * 3, seen


def test_the_audit_writer_keeps_its_back_off_while_entries_pour_in(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """While the database is away, refusals keep coming (a booting site's herd): the
    fleet audit writer must keep to its back-off, not try a connection per entry."""
    why = pglib.available()
    if why:
        pytest.skip(why)
    import itertools
    import logging

    from mandosd.pgaudit import AuditWriter
    from mandosd.pgstate import BACKOFF_MIN

    caplog.set_level(logging.DEBUG, logger="mandosd.pgaudit")
    # nothing listens in an empty socket directory: every connection attempt fails
    writer = AuditWriter(f"postgresql:///x?host={tmp_path}&port=5432&user=postgres", "srv1")
    entry = {"at": time.time(), "outcome": "protocol-error", "message_id": "0" * 32,
             "client": None, "key_id": None, "peer": "127.0.0.1:1", "reason": UNAVAILABLE,
             "message": "refused", "fields": {}}

    def attempts() -> list[float]:
        return [r.created for r in caplog.records if "audit table:" in r.getMessage()]

    def four_attempts() -> list[float] | None:
        writer(entry)  # a refusal arrives every 2 ms (the wait's interval)
        got = attempts()
        return got if len(got) >= 4 else None

    try:
        tried = wait_for(four_attempts, 60, "four connection attempts", interval=0.002)
    finally:
        writer.close()  # tries once more, at once, then says what it could not write
    assert all(b - a >= BACKOFF_MIN for a, b in itertools.pairwise(tried)), tried
    assert len(attempts()) == len(tried) + 1
    assert "audit entries not written to the audit table" in caplog.text


def test_a_frozen_database_is_refused_like_one_that_is_away(
        tmp_path: Path, pg: pglib.Postgres, url: str) -> None:
    """Every process of PostgreSQL stopped (SIGSTOP): its connections stay open and
    nothing answers, neither a statement nor statement_timeout.  A request must not hang
    on it: refused (zero bytes, state-unavailable) within the store's bound on a call,
    and served again when the database thaws, without a restart."""
    [c] = raw_clients(1, "f")
    with ExitStack() as stack:
        [srv] = servers(tmp_path, url, [[c.section()]], stack)
        herd = Herd([srv], [c])
        assert herd.fetch(c, 0).data == c.secret
        pg.freeze()
        try:
            # the client waits far longer than the server may take
            frozen = c.exchange(srv.address, timeout=120)
        finally:
            pg.thaw()
        assert frozen.error is None and frozen.data == b""
        answers = [e for e in audit_entries(srv) if e.get("MANDOS_PEER") == frozen.local]
        assert [e.get("MANDOS_REASON") for e in answers] == [UNAVAILABLE], srv.log()
        wait_for(lambda: herd.fetch(c, 0).data, 60, "the server to serve again",
                 interval=0.1)
        alive_and_clean([srv])
