"""Audit through journald: one entry per decision, fixed MESSAGE_IDs, upper-case fields.

Read back two ways: from journald's native protocol on a datagram socket the
test owns (always), and from a real ``systemd-journald`` that the test starts
in a private mount namespace, queried with ``journalctl MANDOS_CLIENT=…``.
The secret appears in no entry.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mandosd.audit import Kind
from tests.conftest import PASSWORD
from tests.helpers import ROOT, Mandosd, fetch, have, make_keys, parse_journal_datagram, tool

JOURNALD = "/lib/systemd/systemd-journald"


def wait_port(srv: Mandosd, limit: float = 15) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert srv.proc is not None and srv.proc.poll() is None, srv.log()
        try:
            socket.create_connection(("127.0.0.1", srv.port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("mandosd did not listen")


def start(srv: Mandosd, journal: str) -> None:
    env = {**os.environ, "MANDOS_JOURNAL_SOCKET": journal}
    env.pop("NOTIFY_SOCKET", None)
    srv.proc = subprocess.Popen(srv.argv(), stdout=srv.logfile.open("ab"),
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wait_port(srv)


def ctl(srv: Mandosd, journal: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "MANDOS_JOURNAL_SOCKET": journal, "SUDO_USER": "alice"}
    return subprocess.run([tool("mandos-ctl"), "--configdir", str(srv.configdir),
                           "--statedir", str(srv.statedir), *args], env=env,
                          capture_output=True, timeout=60)


def secret_forms(section: str) -> list[bytes]:
    b64 = "".join(section.split("secret =")[1].split("checker")[0].split())
    return [PASSWORD, b64[:40].encode(), base64.b64encode(PASSWORD),
            base64.b64decode(b64)[:24]]


def scenario(tmp_path: Path, client_keys: Path, client_section: str, journal: str) -> None:
    """Secret sent, unknown key refused, admin disable, refused disabled, enable, checker."""
    srv = Mandosd(tmp_path / "srv", sections=[client_section])
    start(srv, journal)
    try:
        assert fetch(client_keys, srv.address).stdout == PASSWORD
        other = make_keys(tmp_path / "other", "stranger")
        assert fetch(other, srv.address).stdout == b""
        assert ctl(srv, journal, "--disable", "client1").returncode == 0
        assert fetch(client_keys, srv.address).stdout == b""
        assert ctl(srv, journal, "--enable", "client1").returncode == 0
        assert ctl(srv, journal, "-c", "false", "--start-checker", "client1").returncode == 0
    finally:
        srv.stop()


def check_entries(entries: list[dict[str, str]], section: str) -> None:
    by_outcome: dict[str, list[dict[str, str]]] = {}
    for e in entries:
        by_outcome.setdefault(e.get("MANDOS_OUTCOME", ""), []).append(e)
    for kind in (Kind.SERVER_STARTED, Kind.CONFIG_LOADED, Kind.SECRET_SENT,
                 Kind.REFUSED_UNKNOWN, Kind.ADMIN_DISABLED, Kind.REFUSED_DISABLED,
                 Kind.ADMIN_ENABLED, Kind.ADMIN_CHANGED, Kind.CHECKER_FAILED):
        got = by_outcome.get(kind.outcome)
        assert got, f"no {kind.name} entry in {sorted(by_outcome)}"
        assert all(e["MESSAGE_ID"] == kind.value for e in got)
    sent = by_outcome[Kind.SECRET_SENT.outcome][0]
    assert sent["MANDOS_CLIENT"] == "client1" and len(sent["MANDOS_KEY_ID"]) == 64
    assert sent["MANDOS_PEER"].startswith("127.0.0.1:") and sent["PRIORITY"] == "6"
    unknown = by_outcome[Kind.REFUSED_UNKNOWN.outcome][0]
    assert "MANDOS_CLIENT" not in unknown and len(unknown["MANDOS_KEY_ID"]) == 64
    assert unknown["MANDOS_KEY_ID"] != sent["MANDOS_KEY_ID"] and unknown["MANDOS_REASON"]
    admin = by_outcome[Kind.ADMIN_DISABLED.outcome][0]
    assert admin["MANDOS_ADMIN"] == "alice" and admin["MANDOS_CLIENT"] == "client1"
    failed = by_outcome[Kind.CHECKER_FAILED.outcome][0]
    assert failed["MANDOS_CHECKER_STATUS"] == "1" and failed["MANDOS_COMMAND"] == "false"
    blob = json.dumps(entries).encode()
    for form in secret_forms(section):
        assert form not in blob


def test_native_protocol_on_a_test_socket(tmp_path: Path, client_keys: Path,
                                          client_section: str) -> None:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    raw: list[bytes] = []
    done = threading.Event()

    def reader() -> None:  # as journald does: drain at once, senders must not block
        while not done.is_set():
            try:
                raw.append(sock.recv(1 << 20))
            except TimeoutError:
                pass

    t = threading.Thread(target=reader)
    t.start()
    try:
        scenario(tmp_path, client_keys, client_section, path)
        time.sleep(0.3)
    finally:
        done.set()
        t.join()
        sock.close()
    for form in secret_forms(client_section):
        assert not any(form in d for d in raw)
    entries = [parse_journal_datagram(d) for d in raw]
    assert all(k == k.upper() for e in entries for k in e)
    check_entries(entries, client_section)


def test_catalog_covers_every_message_id(tmp_path: Path) -> None:
    text = (ROOT / "units" / "mandosd.catalog").read_text()
    ids = {line[3:].strip() for line in text.splitlines() if line.startswith("-- ")}
    assert ids == {k.value for k in Kind}
    if not have("journalctl"):
        pytest.skip("journalctl not installed")
    cat = tmp_path / "usr/lib/systemd/catalog"
    cat.mkdir(parents=True)
    shutil.copy(ROOT / "units" / "mandosd.catalog", cat)
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True)
    listed = subprocess.run(["journalctl", f"--root={tmp_path}", "--list-catalog"],
                            check=True, capture_output=True, text=True).stdout
    assert all(k.value in listed for k in Kind)


@pytest.fixture()
def real_journald(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """systemd-journald in a private mount namespace; its socket and files bound to tmp."""
    if os.geteuid() != 0 or not Path(JOURNALD).exists() or not have("unshare"):
        pytest.skip("needs root, unshare and systemd-journald")
    run_systemd, run_log, var_log = (tmp_path / d for d in ("run-systemd", "run-log", "var"))
    for d in (run_systemd / "journal", run_log, var_log):
        d.mkdir(parents=True)
    script = (f"mount --bind {run_systemd} /run/systemd && "
              f"mount --bind {run_log} /run/log && "
              f"mount --bind {var_log} /var/log && exec {JOURNALD}")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sock = run_systemd / "journal" / "socket"
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.skip(f"systemd-journald did not start here: {err.strip()[:200]}")
        time.sleep(0.05)
    try:
        yield str(sock), run_log / "journal"
    finally:
        proc.terminate()
        proc.wait(10)


def journalctl(directory: Path, *match: str) -> list[dict[str, str]]:
    p = subprocess.run(["journalctl", "--directory", str(directory), "--no-pager", "-o",
                        "json", *match], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def test_real_journald_and_journalctl_queries(tmp_path: Path, client_keys: Path,
                                              client_section: str,
                                              real_journald: tuple[str, Path]) -> None:
    sock, directory = real_journald
    scenario(tmp_path, client_keys, client_section, sock)
    subprocess.run(["sleep", "0.3"])  # journald writes asynchronously
    entries = journalctl(directory, "SYSLOG_IDENTIFIER=mandosd", "+",
                         "SYSLOG_IDENTIFIER=mandos-ctl")
    check_entries(entries, client_section)
    # the security officer's queries
    sent = journalctl(directory, f"MESSAGE_ID={Kind.SECRET_SENT.value}")
    assert [e["MANDOS_CLIENT"] for e in sent] == ["client1"]
    for_client = journalctl(directory, "MANDOS_CLIENT=client1")
    outcomes = {e["MANDOS_OUTCOME"] for e in for_client}
    assert {"secret-sent", "admin-disabled", "refused-disabled", "admin-enabled"} <= outcomes
    refusals = [e for e in for_client if e["MANDOS_OUTCOME"].startswith("refused-")]
    assert [e["MANDOS_OUTCOME"] for e in refusals] == ["refused-disabled"]
    admin = journalctl(directory, "MANDOS_ADMIN=alice")
    assert {e["MANDOS_OUTCOME"] for e in admin} >= {"admin-disabled", "admin-enabled",
                                                     "admin-changed"}
    assert all(e["SYSLOG_IDENTIFIER"] == "mandos-ctl" for e in admin)
    raw = subprocess.run(["journalctl", "--directory", str(directory), "-o", "export"],
                         capture_output=True, check=True).stdout
    for form in secret_forms(client_section):
        assert form not in raw
    assert sys.executable  # the venv python ran mandosd
