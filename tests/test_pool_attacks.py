"""The pool of key servers, attacked: real PostgreSQL 15, real mandosd, real TLS peers.

Who attacks here: an enrolled machine (or whoever holds its TLS key) that escrows
through three servers at once, or answers its checker with terminal escapes or a
NUL; anyone who reaches a server's port, without a key, many times; a role with
read access to the pool's database (an auditor's host gone rogue), which can take
PostgreSQL's advisory locks without any privilege; the stolen machine whose
disable one server's load would undo because another server's clients.conf (or the
same host's checker pass) saw the file otherwise; a server whose clients.conf lacks
the machine; and the typos that would put the database password into a log.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from mandos_core.escrow_wire import frame
from tests.escrowlib import escrow_tls, make_cert, packet, reply, send_store
from tests.helpers import PASSWORD, Mandosd, enroll, fetch, make_keys, tool, wait_for
from tests.pglib import fetch_all, pool_ctl, servers, state

OTHER_PASSWORD = b"another machine's passphrase"


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keys(tmp_path_factory.mktemp("other") / "keys", "client2")


@pytest.fixture(scope="module")
def other_section(other_keys: Path) -> str:
    return enroll(other_keys, OTHER_PASSWORD, "client2", host="127.0.0.1")


@contextmanager
def answering(data: bytes) -> Iterator[int]:
    """A TCP port on 127.0.0.1 where every connection gets *data* (a machine's banner or
    status line, as an attacker would write it); yields the port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def key_id(section: str) -> str:
    m = re.search(r"^key_id = ([0-9A-F]{64})$", section, re.M)
    assert m, section
    return m.group(1)


def reader(url: str) -> str:
    """A role that may connect and read every table, nothing more (an auditor's);
    returns its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname='auditor'").fetchone():
            conn.execute("CREATE ROLE auditor LOGIN")
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO auditor")
    return url.replace("user=postgres", "user=auditor")


def waiting_advisory_locks(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype='advisory'"
                           " AND NOT granted AND database = (SELECT oid FROM pg_database"
                           " WHERE datname = current_database())").fetchone()
    assert row is not None
    return int(row[0])


def checker_pass(srv: Mandosd, url: str, name: str) -> subprocess.CompletedProcess[str]:
    """One checker pass on *srv*'s configuration, as its mandosd-checker.timer runs it."""
    argv = [sys.executable, "-m", "mandosd", "--configdir", str(srv.configdir), "--statedir",
            str(srv.statedir), "--state-url", url, "--server-name", name, "--run-checkers"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


# -- escrow: one machine's quota and rate, whatever servers it talks to at once ------------

@pytest.mark.parametrize("limit", ["escrow_uploads_per_hour = 3", "escrow_max_packets = 3"],
                         ids=["rate", "quota"])
def test_concurrent_escrow_through_three_servers_stores_no_more_than_the_limit(
        tmp_path: Path, url: str, client_keys: Path, client_section: str, limit: str) -> None:
    """Thirty sessions, ten on each server, each with a packet for another volume, sent
    at the same moment, and held at the machine's turn until all three servers wait
    there: the machine's limit of three holds for the pool, not per server, not per
    session, and whatever the order in which the waiting requests get their turn (a
    request that arrived first but waited longest used to miss the uploads stored
    meanwhile, and stored beyond the rate)."""
    import psycopg

    from mandosd.pgescrow import ESCROW_LOCK_CLASS

    cert = make_cert()
    section = client_section + limit + "\n"
    count = 30
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[section]] * 3, stack)
        sessions = [stack.enter_context(escrow_tls(srvs[i % 3].address, client_keys))
                    for i in range(count)]
        packets = [packet(cert, host=f"try{i}") for i in range(count)]
        go = threading.Barrier(count)
        answers: list[dict[str, object] | None] = [None] * count

        def one(i: int) -> None:
            go.wait()
            send_store(sessions[i], packets[i])
            answers[i] = reply(sessions[i])
            sessions[i].sendall(frame(b""))

        gate = stack.enter_context(psycopg.connect(url, autocommit=True))
        gate.execute("SELECT pg_advisory_lock(%s, hashtext(%s))",
                     (ESCROW_LOCK_CLASS, key_id(client_section)))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        wait_for(lambda: waiting_advisory_locks(url) == 3, 60,
                 "every server's escrow connection to wait for the machine's turn",
                 interval=0.05)
        gate.execute("SELECT pg_advisory_unlock_all()")
        for t in threads:
            t.join(120)
        assert all(a is not None for a in answers), [s.log() for s in srvs]
        stored = [a for a in answers if a is not None and a["ok"]]
        assert len(stored) == 3, answers
        refused = {str(a["error"]) for a in answers if a is not None and not a["ok"]}
        word = limit.split()[0]
        assert refused and all(word in r for r in refused), refused
    with psycopg.connect(url) as conn:
        kept = conn.execute("SELECT count(*) FROM escrow_packets").fetchone()
        uploads = conn.execute("SELECT count(*) FROM escrow_uploads").fetchone()
    assert kept == (3,)
    assert uploads == (3,)


def test_a_server_whose_config_lacks_the_machine_stores_nothing_for_it(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    """The machine is in the pool's database (another server lists it), and escrows
    through a server whose clients.conf does not: no answer, no row, the reason in that
    server's audit, as for its secret."""
    import psycopg

    cert = make_cert()
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[client_section], []], stack)
        with escrow_tls(srvs[1].address, client_keys) as tls:
            send_store(tls, packet(cert))
            assert reply(tls) is None
        assert "MANDOS_OUTCOME=escrow-refused-unknown" in srvs[1].wait_log(
            "escrow-refused-unknown")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM escrow_packets").fetchone() == (0,)


# -- a disable in one server's clients.conf is not undone by another server ----------------

def test_a_disable_in_one_servers_config_survives_another_servers_checker_pass(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    """The admin writes ``enabled = False`` into one server's clients.conf (Mandos's way
    to take a stolen machine out).  Another server's clients.conf did not change: its
    next load (its checker timer, a restart) must leave the pool's state alone, not
    compare its own file with what the first server loaded and "enable" the machine."""
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[client_section]] * 2, stack)
        assert fetch_all(client_keys, srvs) == [PASSWORD] * 2
        srvs[0].sections = [client_section + "enabled = False\n"]
        srvs[0].write_config()
        assert fetch(client_keys, srvs[0].address).stdout == b""  # reloaded: disabled
        assert state(url)["enabled"] is False
        assert fetch(client_keys, srvs[1].address).stdout == b""  # for the pool
        p = checker_pass(srvs[1], url, "srv2")  # what the second server's timer runs
        assert p.returncode == 0, p.stderr
        assert state(url)["enabled"] is False, srvs[1].log() + p.stderr
        assert fetch_all(client_keys, srvs) == [b""] * 2
        # and the first server's own later loads keep it so too
        p = checker_pass(srvs[0], url, "srv1")
        assert p.returncode == 0, p.stderr
        assert fetch_all(client_keys, srvs) == [b""] * 2
        # an admin's enable (any host) is what brings it back
        assert pool_ctl(srvs[1], url, "--enable", "client1").returncode == 0
        assert fetch_all(client_keys, srvs) == [PASSWORD] * 2


def test_an_admins_disable_survives_the_server_loading_a_change_its_checker_pass_loaded(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    """mandosd (``--server-name ks1``), its checker pass and mandos-ctl on one host read
    one clients.conf.  A change there (the machine enabled again) that the checker pass
    loaded first is the same change when mandosd loads it later: an admin's disable
    given in between (through another server) must hold, not be undone by mandosd's
    late load, which the stolen machine itself triggers with its request."""
    section = client_section + "interval = PT1H\n"
    with ExitStack() as stack:
        srvs = servers(tmp_path, url, [[section + "enabled = False\n"], [section]], stack)
        assert fetch_all(client_keys, srvs) == [b""] * 2
        srvs[0].sections = [section]  # the machine is back: enabled again in the file
        srvs[0].write_config()
        # the first server's host: its checker timer runs without --server-name
        p = checker_pass(srvs[0], url, "ks1.example.net")
        assert p.returncode == 0, p.stderr
        assert pool_ctl(srvs[1], url, "--disable", "client1").returncode == 0  # stolen
        assert fetch_all(client_keys, srvs) == [b""] * 2, srvs[0].log()
        assert state(url)["enabled"] is False


# -- a reader of the database holds advisory locks ------------------------------------------

def test_a_readers_lock_on_a_machines_escrow_does_not_stall_the_servers_secrets(
        tmp_path: Path, url: str, client_keys: Path, client_section: str,
        other_keys: Path, other_section: str) -> None:
    """A role that may only read takes pg_advisory_lock on client1's escrow key (no
    privilege needed); client1 then escrows.  Its session waits for its turn; the
    server's secret requests (another machine's here) must not wait with it."""
    import psycopg

    from mandosd.pgescrow import ESCROW_LOCK_CLASS

    cert = make_cert()
    with ExitStack() as stack:
        srv = servers(tmp_path, url, [[client_section, other_section]], stack)[0]
        rogue = stack.enter_context(psycopg.connect(reader(url), autocommit=True))
        rogue.execute("SELECT pg_advisory_lock(%s, hashtext(%s))",
                      (ESCROW_LOCK_CLASS, key_id(client_section)))
        with escrow_tls(srv.address, client_keys) as tls:
            send_store(tls, packet(cert))
            wait_for(lambda: waiting_advisory_locks(url) > 0, 30,
                     "the escrow session to wait for the machine's lock", interval=0.05)
            got = fetch(other_keys, srv.address, timeout=5).stdout
            still_waiting = waiting_advisory_locks(url)
            rogue.execute("SELECT pg_advisory_unlock_all()")
            answer = reply(tls)
        assert got == OTHER_PASSWORD, srv.log()
        assert still_waiting == 1  # the secret went out while the escrow session waited
        assert answer is not None and answer["ok"], answer


def test_a_readers_lock_on_the_schema_does_not_stop_a_server_from_connecting(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    """The schema lock is for migrations; a database already at this version needs no
    lock to be used.  A reader holding it must not keep servers from starting or
    reconnecting (after a database restart, say)."""
    import psycopg

    from mandosd.pgstate import SCHEMA_LOCK, PostgresStore

    PostgresStore(url).close()  # the schema, as the first server made it
    with ExitStack() as stack:
        rogue = stack.enter_context(psycopg.connect(reader(url), autocommit=True))
        rogue.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        srv = servers(tmp_path, url, [[client_section]], stack)[0]
        assert fetch(client_keys, srv.address).stdout == PASSWORD, srv.log()
        p = pool_ctl(srv, url, "--disable", "client1")
        assert p.returncode == 0, p.stderr


# -- what reaches an admin's terminal and logs ----------------------------------------------

def test_pool_log_prints_a_machines_text_escaped(
        tmp_path: Path, url: str, client_section: str) -> None:
    """A machine checked with Debian's ssh-keyscan line answers with an SSH banner full
    of terminal escapes; ssh-keyscan repeats it on stderr, the checker's reason carries
    it into the audit table, and ``mandos-ctl log`` must not replay it on the admin's
    terminal."""
    evil = b"SSH-2.0-OpenSSH_9.2\x1b]0;all clear\x07\x1b[2J\x1b[1;1H"
    with answering(evil + b"\r\n") as port:
        checker = (f"checker = ssh-keyscan -t ed25519 -p {port} %%(host)s 2>/dev/null | grep "
                   "--fixed-strings --line-regexp --quiet --regexp=%%(host)s\" %(ssh_fingerprint)s\"\n"
                   "ssh_fingerprint = ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExpZ2h0\n")
        section = re.sub(r"^checker = .*\n", "", client_section, flags=re.M) + checker
        with ExitStack() as stack:
            srv = servers(tmp_path, url, [[section]], stack)[0]
            p = checker_pass(srv, url, "srv1")
            assert p.returncode == 0, p.stderr

            def logged() -> str | None:
                out = pool_ctl(srv, url, "log", "client1")
                assert out.returncode == 0, out.stderr
                return out.stdout if "checker-failed" in out.stdout else None

            out = wait_for(logged, 60, "the checker's row in the audit table", interval=0.1)
    assert "OpenSSH_9.2" in out, out  # the machine's text is there...
    assert "\x1b" not in out and "\x07" not in out, repr(out)  # ...but harmless
    assert "\\x1b]0;all clear\\x07" in out, out


def test_a_password_in_a_state_url_libpq_cannot_parse_is_never_printed(
        tmp_path: Path) -> None:
    """A typo in the URL (a '%' not followed by two hex digits, a bracket) makes libpq
    quote the URL's text back; that message goes to the journal and to mandos-ctl's
    terminal, never with the password."""
    pytest.importorskip("psycopg")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "clients.conf").write_text("")
    (conf / "clients.conf").chmod(0o600)
    bad_urls = ["postgresql://mandosd:Sup3r%Zsecret@db.example.net/mandos",
                "postgresql://mandosd:Sup3rsecret@[db.example.net/mandos",
                "host=db.example.net password=Sup3r secret"]
    for bad in bad_urls:
        runs = [
            [sys.executable, "-m", "mandosd", "--configdir", str(conf), "--statedir",
             str(tmp_path / "state"), "--state-url", bad, "--listen", "127.0.0.1:0"],
            [tool("mandos-ctl"), "--configdir", str(conf), "--state-url", bad, "log"],
            [tool("mandos-ctl"), "--configdir", str(conf), "--state-url", bad, "escrow",
             "list"],
            [tool("mandos-ctl"), "--configdir", str(conf), "--statedir",
             str(tmp_path / "state"), "--state-url", bad, "--disable", "x"],
        ]
        for argv in runs:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert p.returncode != 0, (argv, p.stdout, p.stderr)
            assert "not a PostgreSQL connection string" in p.stderr, p.stderr
            assert "secret" not in p.stderr and "Sup3r" not in p.stderr, p.stderr
            assert "Traceback" not in p.stderr
    # in mandos.conf, a single '%' (interpolation) is said without the rest of the URL
    (conf / "mandos.conf").write_text(
        "[DEFAULT]\nstate_url = postgresql://mandosd:Sup3r%secret@db.example.net/m\n")
    p = subprocess.run([tool("mandos-ctl"), "--configdir", str(conf), "log"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "state_url" in p.stderr, p.stderr
    assert "secret" not in p.stderr, p.stderr


def test_a_nul_from_a_machine_does_not_stop_the_servers_fleet_audit(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    """A site checker that reports what the machine's status port says (its reason is
    the checker's last line); the machine answers with a NUL, which PostgreSQL's text
    cannot hold.  That one row must not block the server's audit rows after it: the
    secret this server sends next is in ``mandos-ctl log``."""
    with answering(b"status: \x00 degraded \xed\xb2\x80\n") as port:
        checker = f"checker = /bin/bash -c 'cat < /dev/tcp/%%(host)s/{port} >&2; exit 1'\n"
        section = re.sub(r"^checker = .*\n", "", client_section, flags=re.M) + checker
        with ExitStack() as stack:
            srv = servers(tmp_path, url, [[section]], stack)[0]
            srv.wait_log("MANDOS_OUTCOME=checker-failed", timeout=60)  # its own pass
            assert "status: " in srv.log()
            assert fetch(client_keys, srv.address).stdout == PASSWORD

            def logged() -> str | None:
                out = pool_ctl(srv, url, "log", "client1")
                assert out.returncode == 0, out.stderr
                return out.stdout if "secret-sent" in out.stdout else None

            out = wait_for(logged, 30, "the secret in the pool's audit table", interval=0.2)
    assert "status: \\\\x00 degraded" in out, out  # in the table as \x00, shown escaped


def test_a_flood_from_unknown_peers_does_not_fill_the_pools_database(
        tmp_path: Path, url: str, client_keys: Path, client_section: str) -> None:
    """Anyone who reaches a server's port, without any key, makes an audit entry per
    connection.  Each server's journal rotates; the pool's audit table would grow
    without bound, and a full database disk stops every server of the pool (no secret
    is sent unrecorded).  Entries that no known client's key stands behind reach the
    table at a bounded rate; the rest stay in each server's journal."""
    import psycopg

    from mandosd.pgaudit import NOISE_PER_MINUTE

    flood = 2 * NOISE_PER_MINUTE + 300
    with ExitStack() as stack:
        srv = servers(tmp_path, url, [[client_section]], stack)[0]
        host, port = srv.address.rsplit(":", 1)
        for _ in range(flood):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.0\r\n")
                s.recv(1)  # the server closes: its audit entry is made
        assert fetch(client_keys, srv.address).stdout == PASSWORD  # a known client's

        def rows() -> tuple[int, int] | None:
            with psycopg.connect(url) as conn:
                sent = conn.execute("SELECT count(*) FROM audit WHERE outcome='secret-sent'"
                                    ).fetchone()
                noise = conn.execute("SELECT count(*) FROM audit WHERE outcome="
                                     "'protocol-error'").fetchone()
            assert sent is not None and noise is not None
            return (sent[0], noise[0]) if sent[0] else None

        # rows are written in order: the secret's row is there, so is everything before
        sent, noise = wait_for(rows, 60, "the secret's row in the audit table", interval=0.2)
        assert sent == 1
        assert srv.log().count("MANDOS_REASON=bad-version-line") == flood  # journald: all
        # at most one minute's share, twice if the flood straddled a minute
        assert 0 < noise <= 2 * NOISE_PER_MINUTE, noise


def test_an_upload_stored_while_this_request_waited_counts_for_the_rate() -> None:
    """The decision's clock is the request's arrival; another session of the same
    machine may have stored a packet after that, while this one waited for its turn
    (the race above, without its timing)."""
    from mandosd.config import Client
    from mandosd.escrow_policy import EscrowVerdict, Upload, Usage, escrow_decision
    from mandosd.state import ClientState

    now = 1_800_000_000.0
    client = Client(name="web1", key_id="AB" * 32, fingerprint="", secret=b"x", host="web1",
                    checker="true", timeout=300, interval=120, extended_timeout=900,
                    approval_delay=0, approval_duration=1, approved_by_default=True,
                    enabled=True, escrow_uploads_per_hour=1)
    state = ClientState(name="web1", key_id="AB" * 32, enabled=True, deadline=now + 300)
    upload = Upload(str(uuid.uuid4()), "0" * 64, 1000, int(now))
    later = Usage(kept=(), uploads=[now + 0.001])  # stored by the other session
    d = escrow_decision(client, state, later, upload, now, reserve=0)
    assert d.verdict is EscrowVerdict.RATE, d
