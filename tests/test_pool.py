"""A pool of key servers on one real PostgreSQL 15 (Debian's), started by the tests.

Three real mandosd processes share one database (``--state-url``); clients
fetch with the real ``mandos-client``; ``mandos-ctl --state-url`` acts through
any server's configuration.  The database is stopped and started under the
running servers, and a checker pass is killed with SIGKILL mid-way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests import pglib
from tests.escrowlib import escrow_tls, make_cert, packet, reply, send_store, store
from tests.helpers import PASSWORD, Mandosd, fetch, tool, wait_for
from tests.pglib import fetch_all, pool_ctl, servers, state, wait_logged

REASON_ELSEWHERE = "client is not in this server's clients.conf"


# -- schema ---------------------------------------------------------------------------

def test_three_servers_start_at_once_on_an_empty_database(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    import psycopg

    from mandosd.pgstate import MIGRATIONS, SCHEMA_VERSION

    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[client_section]] * 3, stack)
        assert fetch_all(client_keys, srvs) == [PASSWORD] * 3
        with psycopg.connect(url) as conn:
            versions = [r[0] for r in conn.execute("SELECT version FROM mandos_schema")]
            tables = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename='clients'"
                                  ).fetchone()
        assert sorted(versions) == [v for v, _ in MIGRATIONS] and versions[-1] == SCHEMA_VERSION
        assert tables == (1,)
        for s in srvs:
            assert "Traceback" not in s.log() and "ERROR" not in s.log()


def test_newer_schema_is_refused(tmp_path: Path, url: str, client_section: str) -> None:
    import psycopg

    from mandosd.pgstate import PostgresStore
    from mandosd.state import StateError

    PostgresStore(url).close()
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO mandos_schema VALUES (999)")
    with pytest.raises(StateError, match="newer mandosd"):
        PostgresStore(url)


# -- one state for the pool -----------------------------------------------------------

def test_disable_enable_deny_approve_hold_for_every_server(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    section = client_section + "approval_duration = PT1H\n"
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[section]] * 3, stack)
        assert fetch_all(client_keys, srvs) == [PASSWORD] * 3

        p = pool_ctl(srvs[0], url, "--disable", "client1")
        assert p.returncode == 0, p.stderr
        assert fetch_all(client_keys, srvs) == [b""] * 3
        for s in srvs:
            assert "MANDOS_OUTCOME=refused-disabled" in s.log()
        # mandos-ctl through another server's configuration sees the same
        assert pool_ctl(srvs[2], url, "--is-enabled", "client1").returncode == 1

        assert pool_ctl(srvs[1], url, "--enable", "client1").returncode == 0
        assert fetch_all(client_keys, srvs) == [PASSWORD] * 3

        assert pool_ctl(srvs[2], url, "--deny", "client1").returncode == 0
        assert fetch_all(client_keys, srvs) == [b""] * 3
        for s in srvs:
            assert "MANDOS_OUTCOME=refused-denied" in s.log()

        assert pool_ctl(srvs[0], url, "--approve", "client1").returncode == 0
        assert fetch_all(client_keys, srvs) == [PASSWORD] * 3


def test_a_secret_from_one_moves_the_deadline_seen_by_all(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    section = client_section + "timeout = PT1M\nextended_timeout = PT2H\n"
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[section]] * 3, stack)
        before = state(url)
        assert before["last_secret_sent"] is None
        assert before["deadline"] < time.time() + 61  # type: ignore[operator]
        assert fetch(client_keys, srvs[0].address).stdout == PASSWORD
        after = state(url)
        sent = after["last_secret_sent"]
        assert isinstance(sent, float) and after["deadline"] == pytest.approx(sent + 7200)
        for s in srvs[1:]:  # what the other servers' mandos-ctl shows
            p = pool_ctl(s, url, "--dump-json", "client1")
            assert p.returncode == 0, p.stderr
            expires = json.loads(p.stdout)["client1"]["Expires"]
            assert expires.startswith(time.strftime(
                "%Y-%m-%dT%H", time.gmtime(sent + 7200)))  # type: ignore[operator]


def test_waiting_request_released_by_an_approval_through_another_server(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    section = client_section + "approval_delay = PT1H\napproved_by_default = False\n"
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[section]] * 3, stack)
        argv = [tool("mandos-client"), "--keydir", str(client_keys), "--timeout", "300",
                "--connect", srvs[0].address]
        waiting = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stack.callback(waiting.kill)
        wait_logged(srvs[0], "MANDOS_OUTCOME=approval-requested")
        wait_for(lambda: state(url)["approval_pending_until"] is not None, 60,
                 "the pending approval in the pool's state", interval=0.05)
        # the approve goes through the third server's configuration; the first
        # server waits on LISTEN (its approval_delay is an hour)
        assert pool_ctl(srvs[2], url, "--approve", "client1").returncode == 0
        out, err = waiting.communicate(timeout=120)
        assert out == PASSWORD, err
        assert "approved by an administrator" in srvs[0].log()


def test_client_missing_from_one_servers_config_is_refused_there(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[client_section], [client_section], []], stack)
        assert fetch_all(client_keys, srvs) == [PASSWORD, PASSWORD, b""]
        log = srvs[2].log()
        assert "MANDOS_OUTCOME=refused-unknown" in log
        assert f"MANDOS_REASON={REASON_ELSEWHERE}" in log
        assert "refused client1" in log  # named: the pool knows who it is
        # and the others still have it: the third server's load did not delete it
        assert state(url)["enabled"] is True


def test_fleet_audit_log_answers_who_got_what_from_which_server(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[client_section], [client_section], []], stack)
        assert fetch(client_keys, srvs[1].address).stdout == PASSWORD
        assert fetch(client_keys, srvs[2].address).stdout == b""
        assert pool_ctl(srvs[0], url, "--disable", "client1").returncode == 0
        def logged() -> list[str] | None:  # each server's writer thread adds its rows
            p = pool_ctl(srvs[0], url, "log", "client1")
            assert p.returncode == 0, p.stderr
            lines = p.stdout.splitlines()
            if (any("srv2" in x and "secret-sent" in x for x in lines)
                    and any("srv3" in x and "refused-unknown" in x for x in lines)
                    and any("admin-disabled" in x for x in lines)):
                return lines
            return None

        lines = wait_for(logged, 60, "the three servers' rows in the audit table", interval=0.1)
        assert lines[0].split()[:3] == ["When", "Server", "Outcome"]
        assert all(x.split()[4] == "client1" for x in lines[1:])
        assert any("127.0.0.1:" in x for x in lines if "secret-sent" in x)


# -- the database goes away and comes back -----------------------------------------

def test_database_down_refuses_without_crash_then_serves_again(
        tmp_path: Path, client_keys: Path, client_section: str) -> None:
    why = pglib.available()
    if why:
        pytest.skip(why)
    own = pglib.Postgres().start()  # its own: this test stops it
    try:
        url = own.create_database("pool")
        with ExitStack() as stack:
            srvs = servers(tmp_path, url, [[client_section]] * 3, stack)
            assert fetch_all(client_keys, srvs) == [PASSWORD] * 3
            sent_before = [s.log().count("MANDOS_OUTCOME=secret-sent") for s in srvs]
            own.stop()
            assert fetch_all(client_keys, srvs) == [b""] * 3
            for s, n in zip(srvs, sent_before, strict=True):
                assert s.proc is not None and s.proc.poll() is None  # still running
                assert "MANDOS_REASON=state-unavailable" in s.log()
                # never a secret it could not record
                assert s.log().count("MANDOS_OUTCOME=secret-sent") == n
            own.start()
            for s in srvs:  # back-off: each reconnects on a later request
                wait_for(lambda s=s: fetch(client_keys, s.address).stdout == PASSWORD, 60,
                         "the server to serve again", interval=0.2)
                assert s.proc is not None and s.proc.poll() is None
                assert "Traceback" not in s.log()
            assert state(url)["last_secret_sent"] is not None
    finally:
        own.destroy()


def test_herd_over_three_servers_survives_kill_9_of_one(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[client_section]] * 3, stack)
        results: list[bytes] = []
        lock = threading.Lock()
        half = threading.Event()

        def one(i: int) -> None:
            order = [srvs[(i + k) % 3].address for k in range(3)]
            out = fetch(client_keys, *order, timeout=30).stdout
            with lock:
                results.append(out)
                if len(results) >= 10:
                    half.set()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
        for t in threads[:15]:
            t.start()
        half.wait(120)
        assert srvs[0].proc is not None
        srvs[0].proc.send_signal(signal.SIGKILL)
        srvs[0].proc.wait()
        for t in threads[15:]:
            t.start()
        for t in threads:
            t.join(180)
        assert results == [PASSWORD] * 30


# -- checkers: once per interval across the pool ---------------------------------------

def _checker_conf(base: Path, names: list[str], checker: str, interval: str) -> Path:
    conf = base / "conf"
    conf.mkdir(parents=True)
    lines = []
    for i, name in enumerate(names, 1):
        lines += [f"[{name}]", f"key_id = {i:064X}", "secret = cGdw", f"host = {name}",
                  f"checker = {checker}", f"interval = {interval}", "timeout = PT1H"]
    (conf / "clients.conf").write_text("\n".join(lines) + "\n")
    (conf / "clients.conf").chmod(0o600)
    return conf


def _run_checkers(conf: Path, url: str, name: str, **kw: object
                  ) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "mandosd", "--configdir", str(conf), "--statedir",
            str(conf.parent / "state"), "--state-url", url, "--server-name", name,
            "--run-checkers"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            **kw)  # type: ignore[call-overload]


def test_one_pass_over_the_pool_runs_each_checker_once(tmp_path: Path, url: str) -> None:
    names = [f"c{i:02}" for i in range(24)]
    # checkers run as the unprivileged checker user: their files live where it can write
    counts = Path(tempfile.mkdtemp(prefix="mandos-pool-", dir="/tmp")) / "counts"
    counts.parent.chmod(0o1777)
    checker = f"/bin/sh -c 'echo %%(name)s >> {counts}'"
    confs = [_checker_conf(tmp_path / f"srv{i}", names, checker, "PT1H") for i in range(3)]
    procs = [_run_checkers(c, url, f"srv{i}") for i, c in enumerate(confs)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    seen = counts.read_text().split()
    assert sorted(seen) == names  # every client once, none twice
    # and the fleet audit table says which server checked which client
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT client, server FROM audit"
                            " WHERE outcome = 'checker-succeeded'").fetchall()
    assert sorted(c for c, _ in rows) == names
    assert {s for _, s in rows} <= {"srv0", "srv1", "srv2"}


def test_a_pass_killed_mid_way_leaves_its_clients_to_another_server(
        tmp_path: Path, url: str) -> None:
    names = [f"c{i:02}" for i in range(6)]
    shared = Path(tempfile.mkdtemp(prefix="mandos-pool-", dir="/tmp"))
    shared.chmod(0o1777)  # checkers run as the unprivileged checker user
    started = shared / "started"
    checked = shared / "checked"
    hang = f"/bin/sh -c 'echo %%(name)s >> {started}; exec sleep 60'"
    quick = f"/bin/sh -c 'echo %%(name)s >> {checked}'"
    conf_a = _checker_conf(tmp_path / "a", names, hang, "PT5S")
    conf_b = _checker_conf(tmp_path / "b", names, quick, "PT5S")
    a = _run_checkers(conf_a, url, "a", start_new_session=True)
    try:
        def all_started() -> bool:
            assert a.poll() is None
            return started.exists() and len(started.read_text().split()) >= len(names)

        wait_for(all_started, 60, "every checker of the first pass to start", interval=0.05)
    finally:
        os.killpg(a.pid, signal.SIGKILL)  # the server and its checkers, mid-pass
        a.wait()
    # the claims of the dead pass expire after the interval (+ slack); the next
    # pass of another server then runs every one of them
    def all_checked() -> bool:
        if checked.exists() and sorted(set(checked.read_text().split())) == names:
            return True
        b = _run_checkers(conf_b, url, "b")  # another server's pass, as its timer would
        _, err = b.communicate(timeout=60)
        assert b.returncode == 0, err.decode()
        return False

    wait_for(all_checked, 90, "another server to check every client", interval=0.5)
    assert sorted(checked.read_text().split()) == names  # each exactly once


# -- SQLite to PostgreSQL -------------------------------------------------------------

def test_migrate_state_keeps_every_clients_state(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    from mandosd.pgstate import PostgresStore
    from mandosd.state import SQLiteStore

    single = Mandosd(tmp_path / "single", sections=[client_section])
    with single:
        assert fetch(client_keys, single.address).stdout == PASSWORD
        base = [tool("mandos-ctl"), "--configdir", str(single.configdir), "--statedir",
                str(single.statedir)]
        subprocess.run([*base, "--disable", "--interval", "PT7M", "client1"], check=True)
        extra = [("key_id = " + "AB" * 32) if x.startswith("key_id") else x
                 for x in client_section.replace("[client1]", "[added]").splitlines()]
        subprocess.run([*base, "--add", "-"], input="\n".join(extra).encode(), check=True)
    old = SQLiteStore(single.statedir)
    before = old.all()
    old.close()
    assert {s.name for s in before} == {"client1", "added"}

    from mandosd.escrow import EscrowStore
    from mandosd.pgescrow import PostgresEscrowStore

    old_escrow = EscrowStore(single.statedir, durable=False)
    cert = make_cert()
    for host in ("gone", "kept"):  # the first is pruned: sequence numbers have a gap
        old_escrow.store(key_id="AB" * 32, client_name="added", volume_uuid=str(uuid.uuid4()),
                         created=int(time.time()), packet=packet(cert, host=host))
    old_escrow.db.execute("DELETE FROM packets WHERE host_name='gone'")
    packets_before = old_escrow.list(history=True)
    old_escrow.close()
    assert [p.sequence for p in packets_before] == [2]

    p = subprocess.run([tool("mandos-ctl"), "migrate-state", "--configdir",
                        str(single.configdir), "--statedir", str(single.statedir),
                        "--state-url", url], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "copied 2 clients and 1 escrow packets" in p.stdout
    pool = PostgresStore(url)
    try:
        assert pool.all() == before  # every field, the overrides and added sections too
        pool_escrow = PostgresEscrowStore(pool)
        assert pool_escrow.list(history=True) == packets_before  # the packet, byte for byte
        # the pool numbers on after the copied packets, never reusing a sequence number
        later = pool_escrow.store(key_id="AB" * 32, client_name="added",
                                  volume_uuid=str(uuid.uuid4()), created=int(time.time()),
                                  packet=packet(cert, host="later"))
        assert later.sequence == 3
    finally:
        pool.close()
    again = subprocess.run([tool("mandos-ctl"), "migrate-state", "--configdir",
                            str(single.configdir), "--statedir", str(single.statedir),
                            "--state-url", url], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already holds clients" in again.stderr

    # and a server on the pool keeps the state: still disabled
    with ExitStack() as stack:
        srv = servers(tmp_path / "pool", url, [[client_section]], stack)[0]
        assert fetch(client_keys, srv.address).stdout == b""
        assert "MANDOS_OUTCOME=refused-disabled" in srv.log()


def test_a_secret_is_not_recorded_for_a_client_disabled_meanwhile(tmp_path: Path,
                                                                  url: str) -> None:
    """The race a pool adds: server A reads "enabled", an admin disables through B,
    then A records its secret.  The record must fail (so A sends nothing)."""
    from mandosd.config import load_clients
    from mandosd.pgstate import PostgresStore
    from mandosd.state import StateError

    a, b = PostgresStore(url, server_name="a"), PostgresStore(url, server_name="b")
    try:
        conf = _checker_conf(tmp_path, ["c01"], "true", "PT1M")
        clients = load_clients(conf / "clients.conf", conf)
        now = time.time()
        a.sync_clients(clients.values(), now)
        seen = a.get("c01")
        assert seen is not None and seen.enabled          # A decides to send...
        b.update("c01", enabled=False)                    # ...B's admin disables...
        with pytest.raises(StateError, match="disabled or timed out"):
            a.record_secret_sent("c01", now, now + 900)   # ...A may not send
        after = b.get("c01")
        assert after is not None and after.last_secret_sent is None
    finally:
        a.close()
        b.close()


def test_state_url_in_mandos_conf(tmp_path: Path, url: str, client_keys: Path,
                                  client_section: str) -> None:
    """state_url= in mandos.conf [DEFAULT] selects the pool for mandosd and mandos-ctl."""
    with ExitStack() as stack:
        srvs = []
        for i in (1, 2):
            srv = Mandosd(tmp_path / f"srv{i}", sections=[client_section])
            (srv.configdir / "mandos.conf").write_text(f"[DEFAULT]\nstate_url = {url}\n")
            stack.enter_context(srv)
            srvs.append(srv)
        base = [tool("mandos-ctl"), "--configdir", str(srvs[0].configdir)]
        assert subprocess.run([*base, "--disable", "client1"]).returncode == 0
        assert fetch_all(client_keys, srvs) == [b""] * 2
        assert state(url)["enabled"] is False
        assert not (srvs[0].statedir / "clients.sqlite").exists()


def test_a_server_started_while_the_database_is_down_serves_when_it_returns(
        tmp_path: Path, client_keys: Path, client_section: str) -> None:
    why = pglib.available()
    if why:
        pytest.skip(why)
    own = pglib.Postgres().start()
    try:
        url = own.create_database("pool")
        own.stop()
        with Mandosd(tmp_path / "srv", sections=[client_section],
                     extra_args=["--state-url", url]) as srv:
            assert fetch(client_keys, srv.address).stdout == b""
            assert "MANDOS_REASON=state-unavailable" in srv.log()
            own.start()
            wait_for(lambda: fetch(client_keys, srv.address).stdout == PASSWORD, 60,
                     "the server to serve once the database is back", interval=0.2)
            assert state(url)["last_secret_sent"] is not None
    finally:
        own.destroy()


def test_the_database_password_reaches_no_log(tmp_path: Path, pg: pglib.Postgres,
                                              client_keys: Path, client_section: str) -> None:
    """A URL with a password (against the advice) and a database that refuses it:
    the server's and mandos-ctl's messages name the database, never the password."""
    import psycopg

    with psycopg.connect(pg.url("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE pwtest")
    secret = "Pw-" + uuid.uuid4().hex
    url = (f"postgresql://nosuchrole:{secret}@/pwtest?host={pg.sockdir}&port={pg.port}"
           f"&password={secret}")
    with Mandosd(tmp_path / "srv", sections=[client_section],
                 extra_args=["--state-url", url]) as srv:
        assert fetch(client_keys, srv.address).stdout == b""
        assert "MANDOS_REASON=state-unavailable" in srv.log()
    p = pool_ctl(srv, url, "--disable", "client1")
    assert p.returncode == 1 and "PostgreSQL pwtest" in p.stderr
    for text in (srv.log(), p.stdout + p.stderr):
        assert secret not in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_remote_database_drop_in_keeps_the_unit_hardened(tmp_path: Path) -> None:
    """units/pool/remote-database.conf opens IP for the database and nothing else."""
    units = Path(__file__).resolve().parent.parent / "units"
    shutil.copy(units / "mandosd.service", tmp_path)
    shutil.copy(units / "mandosd.socket", tmp_path)
    (tmp_path / "mandosd.service.d").mkdir()
    shutil.copy(units / "pool" / "remote-database.conf",
                tmp_path / "mandosd.service.d" / "pool.conf")
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20",
                        str(tmp_path / "mandosd.service")], capture_output=True, text=True,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    # the drop-in took effect: IP sockets allowed, the rest of the sandbox unchanged
    assert any("✗ PrivateNetwork=" in x for x in lines)
    assert any("✓ CapabilityBoundingSet=" in x or "CapabilityBoundingSet=~" in x
               for x in lines)
    assert "Overall exposure level for mandosd.service: 1." in p.stdout


def test_a_removed_client_stays_refused_after_a_server_restarts(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    """An admin removes a stolen machine's client through one server; restarting any
    server, whose clients.conf still lists it, must not bring it back."""
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[client_section]] * 2, stack)
        assert pool_ctl(srvs[0], url, "--remove", "client1").returncode == 0
        assert fetch_all(client_keys, srvs) == [b""] * 2
        srvs[1].stop()
        srvs[1].start()
        assert fetch_all(client_keys, srvs) == [b""] * 2
        assert "client was removed with mandos-ctl --remove" in srvs[1].log()
        assert state(url)["source"] == "removed"


# -- escrow packets: the pool's, whichever server received them -------------------------

def test_escrow_packets_land_in_the_pool_whichever_server_got_them(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    """A machine escrows through one server and another: every server and every admin
    host with the URL sees both packets, and the machine's rate limit counts uploads
    across the pool (each server's own store would let it store three times as much)."""
    import psycopg

    cert = make_cert()
    section = client_section + "\nescrow_uploads_per_hour = 2\n"
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[section]] * 3, stack)
        v1, v2 = str(uuid.uuid4()), str(uuid.uuid4())
        first = store(srvs[0].address, client_keys, packet(cert, v1, host="via-srv1"))
        assert first is not None and first["ok"], srvs[0].log()
        second = store(srvs[1].address, client_keys, packet(cert, v2, host="via-srv2"))
        assert second is not None and second["ok"], srvs[1].log()
        assert second["sequence"] == 2  # one numbering across the pool
        # a third server answers for what the first one stored
        with escrow_tls(srvs[2].address, client_keys) as tls:
            from mandos_core.escrow_wire import frame, json_frame

            tls.sendall(json_frame({"op": "status", "volume_uuid": v1}))
            answer = reply(tls)
            assert answer is not None and answer["sha256"] == first["sha256"], srvs[2].log()
            # the rate: two stored in the last hour, through two other servers
            send_store(tls, packet(cert, host="third"))
            refused = reply(tls)
            assert refused is not None and not refused["ok"], srvs[2].log()
            assert "escrow_uploads_per_hour" in str(refused["error"])
            tls.sendall(frame(b""))
        listed = pool_ctl(srvs[2], url, "escrow", "list")
        assert listed.returncode == 0, listed.stderr
        assert "via-srv1" in listed.stdout and "via-srv2" in listed.stdout, listed.stdout
        exported = tmp_path / "exported"
        out = pool_ctl(srvs[1], url, "escrow", "export", "client1", v1, "-o", str(exported))
        assert out.returncode == 0, out.stderr
        import hashlib

        assert hashlib.sha256(exported.read_bytes()).hexdigest() == first["sha256"]
        for srv in srvs:
            assert not (srv.statedir / "escrow.sqlite").exists()
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT host_name, server FROM escrow_packets ORDER BY sequence"
                            ).fetchall()
    assert rows == [("via-srv1", "srv1"), ("via-srv2", "srv2")]


def test_escrow_refused_while_the_database_is_away(
        tmp_path: Path, client_keys: Path, client_section: str) -> None:
    """No acknowledgement for a packet the pool did not store: with the database
    stopped, the machine hears "could not store it" (so it keeps its old backup slot),
    and the audit says why."""
    why = pglib.available()
    if why:
        pytest.skip(why)
    cert = make_cert()
    own = pglib.Postgres().start()
    try:
        url = own.create_database("escrowdown")
        with ExitStack() as stack:
            srv = servers(tmp_path, url, [[client_section]], stack)[0]
            with escrow_tls(srv.address, client_keys) as tls:  # admitted while it is up
                own.stop()
                send_store(tls, packet(cert))
                answer = reply(tls)
            # no acknowledgement: the session ends (the machine keeps its old slot)
            assert answer is None or answer == {"ok": False,
                                                "error": "the server could not store it"}
            failed = [x for x in srv.log().splitlines() if "MANDOS_OUTCOME=escrow-failed" in x]
            assert failed and all("MANDOS_REASON=state-unavailable" in x for x in failed), \
                srv.log()
            assert "MANDOS_OUTCOME=escrow-stored" not in srv.log()
            assert srv.proc is not None and srv.proc.poll() is None
            own.start()
            got = wait_for(lambda: store(srv.address, client_keys, packet(cert)), 60,
                           "the server to store again", interval=0.2)
            assert got["ok"], srv.log()
    finally:
        own.destroy()


def test_a_password_file_others_can_read_is_said_at_start(
        tmp_path: Path, url: str, client_section: str) -> None:
    """libpq skips a group/world-readable password file with a warning a service's journal
    may never show, and the login then fails as if the password were wrong: say so."""
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:not-used-by-trust-auth\n")
    passfile.chmod(0o644)
    sep = "&" if "?" in url else "?"
    with_file = f"{url}{sep}passfile={passfile}"
    srv = Mandosd(tmp_path / "srv", sections=[client_section],
                  extra_args=["--state-url", with_file])
    p = subprocess.run(srv.argv(), capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert f"{passfile}: the database password file is readable by others (mode 0644)" \
        in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    ctl_p = pool_ctl(srv, with_file, "--disable", "client1")
    assert ctl_p.returncode == 1 and "readable by others" in ctl_p.stderr, ctl_p.stderr
    passfile.chmod(0o600)
    ctl_p = pool_ctl(srv, with_file, "--disable", "client1")
    assert ctl_p.returncode == 0, ctl_p.stderr
