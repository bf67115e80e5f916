"""Audit through journald: one entry per decision, fixed MESSAGE_IDs, upper-case fields.

Read back with journalctl only, from a real ``systemd-journald`` that the test
starts in a private mount namespace (``journalctl MANDOS_CLIENT=…``): never
with a parser of our own, which would only mirror the encoder.  The raw
datagrams on a socket the test owns are searched for the secret, byte for
byte.  Which MESSAGE_IDs exist is derived from the code: every audit or event
call that reports an outcome is found in the source, and each must carry an id
that the catalog explains.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from mandosd.audit import Kind
from tests.helpers import (
    PASSWORD,
    ROOT,
    Journald,
    Mandosd,
    ctl,
    fetch,
    have,
    make_keys,
    secret_forms,
    wait_for,
)


def start(srv: Mandosd, journal: str, started: Callable[[], bool]) -> None:
    env = {**os.environ, "MANDOS_JOURNAL_SOCKET": journal}
    env.pop("NOTIFY_SOCKET", None)
    srv.proc = subprocess.Popen(srv.argv(), stdout=srv.logfile.open("ab"),
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    proc = srv.proc

    def up() -> bool:
        assert proc.poll() is None, srv.log()
        return started()

    wait_for(up, 30, "mandosd's server-started entry")


def scenario(tmp_path: Path, client_keys: Path, client_section: str, journal: str,
             started: Callable[[], bool]) -> None:
    """Secret sent, unknown key refused, admin disable, refused disabled, enable, checker."""
    srv = Mandosd(tmp_path / "srv", sections=[client_section])
    env = {"MANDOS_JOURNAL_SOCKET": journal, "SUDO_USER": "alice"}
    start(srv, journal, started)
    try:
        assert fetch(client_keys, srv.address).stdout == PASSWORD
        other = make_keys(tmp_path / "other", "stranger")
        assert fetch(other, srv.address).stdout == b""
        assert ctl(srv, "--disable", "client1", env=env).returncode == 0
        assert fetch(client_keys, srv.address).stdout == b""
        assert ctl(srv, "--enable", "client1", env=env).returncode == 0
        assert ctl(srv, "-c", "false", "--start-checker", "client1", env=env).returncode == 0
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
    # what the programs actually emitted: every outcome has an id the catalog explains
    explained = catalog_ids()
    for e in entries:
        if "MANDOS_OUTCOME" in e:
            assert e.get("MESSAGE_ID") in explained, f"no catalog entry for {e}"
    blob = json.dumps(entries).encode()
    for form in secret_forms(section):
        assert form not in blob


def catalog_ids() -> set[str]:
    text = (ROOT / "units" / "mandosd.catalog").read_text()
    return {line[3:].strip() for line in text.splitlines() if line.startswith("-- ")}


def test_no_secret_on_the_journal_socket(tmp_path: Path, client_keys: Path,
                                         client_section: str) -> None:
    """The datagrams as sent, searched byte for byte (no parsing): the secret is in none."""
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

    def seen(needle: bytes) -> Callable[[], bool]:
        return lambda: any(needle in d for d in list(raw))

    t = threading.Thread(target=reader)
    t.start()
    try:
        scenario(tmp_path, client_keys, client_section, path,
                 seen(b"MANDOS_OUTCOME=server-started"))
        wait_for(seen(b"MANDOS_OUTCOME=checker-failed"), 15, "the checker's entry")
    finally:
        done.set()
        t.join()
        sock.close()
    assert raw
    for form in secret_forms(client_section):
        assert not any(form in d for d in raw)


# -- which MESSAGE_IDs exist: derived from the code, not from the enum ---------------------

def _keywords(call: ast.Call) -> dict[str, ast.expr]:
    return {k.arg: k.value for k in call.keywords if k.arg}


def outcome_calls(package: str) -> list[tuple[str, str | None]]:
    """Every ``audit(...)``/``event(...)`` call in *package* that reports an outcome, as
    (file:line, the MESSAGE_ID it carries or None)."""
    found: list[tuple[str, str | None]] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.name == "audit.py":  # audit() itself, the one funnel to event()
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            kw = _keywords(node)
            kinds = [a for a in node.args if isinstance(a, ast.Attribute)
                     and getattr(a.value, "id", "") == "Kind"]
            if kinds:  # audit(Kind.X, ...) or a wrapper such as ctl's _audit(Kind.X, ...)
                found.append((where, Kind[kinds[0].attr].value))
            elif name == "audit":  # a Kind computed at run time (a policy verdict): typed
                found.append((where, "computed"))
            elif name == "event" and "MANDOS_OUTCOME" in kw:
                mid = kw.get("MESSAGE_ID")
                found.append((where, ast.unparse(mid) if mid is not None else None))
    return found


def verdict_kinds(package: str) -> set[str]:
    """MESSAGE_IDs of ``Kind.X`` values assigned in enum-like class bodies (verdicts)."""
    found = set()
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.name == "audit.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    v = getattr(stmt, "value", None)
                    if (isinstance(stmt, ast.Assign) and isinstance(v, ast.Attribute)
                            and getattr(v.value, "id", "") == "Kind"):
                        found.add(Kind[v.attr].value)
    return found


def test_every_server_outcome_has_a_catalogued_message_id() -> None:
    calls = outcome_calls("mandosd")
    assert len(calls) > 20, calls  # the scan found the audit calls at all
    missing = [where for where, mid in calls if mid is None]
    assert not missing, f"outcomes logged without a MESSAGE_ID (use audit()): {missing}"
    explained = catalog_ids()
    unexplained = [(w, m) for w, m in calls if m not in explained and m != "computed"]
    assert not unexplained, f"MESSAGE_IDs the catalog does not explain: {unexplained}"
    used = {m for _, m in calls}
    # the verdicts a policy decision computes are the refusal kinds
    used |= {k.value for k in Kind if k.name.startswith("REFUSED_")}
    # and the kinds a typed verdict maps to (escrow_policy.EscrowVerdict: STORE = Kind.X),
    # which audit() receives computed
    used |= verdict_kinds("mandosd")
    assert explained <= used, f"catalog entries no code emits: {explained - used}"


def test_admin_guide_lists_every_message_id() -> None:
    text = (ROOT / "docs" / "admin.md").read_text()
    rows = {ln.split("|")[1].split()[0]: ln.split("|")[2].strip()
            for ln in text.splitlines() if ln.startswith("| ") and ln.count("|") == 3}
    for kind in Kind:
        assert rows.get(kind.outcome) == kind.value, f"docs/admin.md: no row for {kind.outcome}"


def test_catalog_loads_into_journalctl(tmp_path: Path) -> None:
    if not have("journalctl"):
        pytest.skip("journalctl not installed")
    cat = tmp_path / "usr/lib/systemd/catalog"
    cat.mkdir(parents=True)
    shutil.copy(ROOT / "units" / "mandosd.catalog", cat)
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True)
    listed = subprocess.run(["journalctl", f"--root={tmp_path}", "--list-catalog"],
                            check=True, capture_output=True, text=True).stdout
    assert all(i in listed for i in catalog_ids())


# -- a real journald ------------------------------------------------------------------------

def test_real_journald_and_journalctl_queries(tmp_path: Path, client_keys: Path,
                                              client_section: str) -> None:
    with Journald(tmp_path / "journal") as journal:
        scenario(tmp_path, client_keys, client_section, str(journal.socket),
                 lambda: bool(journal.entries(f"MESSAGE_ID={Kind.SERVER_STARTED.value}")))
        journal.wait_entries(f"MESSAGE_ID={Kind.CHECKER_FAILED.value}")
        entries = journal.entries("SYSLOG_IDENTIFIER=mandosd", "+",
                                  "SYSLOG_IDENTIFIER=mandos-ctl")
        check_entries(entries, client_section)
        # the security officer's queries
        sent = journal.entries(f"MESSAGE_ID={Kind.SECRET_SENT.value}")
        assert [e["MANDOS_CLIENT"] for e in sent] == ["client1"]
        for_client = journal.entries("MANDOS_CLIENT=client1")
        outcomes = {e["MANDOS_OUTCOME"] for e in for_client}
        assert {"secret-sent", "admin-disabled", "refused-disabled", "admin-enabled"} <= outcomes
        refusals = [e for e in for_client if e["MANDOS_OUTCOME"].startswith("refused-")]
        assert [e["MANDOS_OUTCOME"] for e in refusals] == ["refused-disabled"]
        admin = journal.entries("MANDOS_ADMIN=alice")
        assert {e["MANDOS_OUTCOME"] for e in admin} >= {"admin-disabled", "admin-enabled",
                                                         "admin-changed"}
        assert all(e["SYSLOG_IDENTIFIER"] == "mandos-ctl" for e in admin)
        # lower-case field names would be dropped by journald: the ones we send arrived
        assert all(k == k.upper() for e in entries for k in e)
        raw = journal.export()
        for form in secret_forms(client_section):
            assert form not in raw
