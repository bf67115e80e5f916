"""Approvals end to end: a request held by approval_delay, reached by mandos-ctl -A/-D."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from mandosd.state import SQLiteStore
from tests.helpers import PASSWORD, Mandosd, ctl, fetch, wait_for


def server(tmp_path: Path, section: str, extra: str) -> Mandosd:
    return Mandosd(tmp_path / "srv", sections=[section + extra]).start()


def background_fetch(keys: Path, address: str, timeout: float = 30
                     ) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        out["stdout"] = fetch(keys, address, timeout=timeout).stdout

    t = threading.Thread(target=run)
    t.start()
    return t, out


def wait_pending(srv: Mandosd, limit: float = 30) -> None:
    wait_for(lambda: json.loads(ctl(srv, "-j", "client1").stdout)["client1"]["ApprovalPending"],
             limit, "a pending approval", interval=0.1)


@pytest.mark.parametrize("opt,expect,outcome", [
    ("--approve", PASSWORD, "MANDOS_OUTCOME=secret-sent"),
    ("--deny", b"", "MANDOS_OUTCOME=refused-denied"),
])
def test_waiting_request_is_answered_by_ctl(tmp_path: Path, client_keys: Path,
                                            client_section: str, opt: str, expect: bytes,
                                            outcome: str) -> None:
    srv = server(tmp_path, client_section, "approval_delay = PT60S\n"
                 "approved_by_default = False\n")
    try:
        t, out = background_fetch(client_keys, srv.address)
        wait_pending(srv)
        assert "MANDOS_OUTCOME=approval-requested" in srv.log()
        p = ctl(srv, opt, "client1")
        assert p.returncode == 0, p.stderr
        t.join(40)
        assert out["stdout"] == expect
        # answered by the admin's decision, not by the 60 s delay running out
        assert outcome in srv.log()
        assert "refused-approval-expired" not in srv.log()
        assert json.loads(ctl(srv, "-j").stdout)["client1"]["ApprovalPending"] is False
        assert json.loads(ctl(srv, "-j").stdout)["client1"]["LastApprovalRequest"]
    finally:
        srv.stop()


@pytest.mark.parametrize("default,expect,outcome", [
    ("True", PASSWORD, "MANDOS_OUTCOME=secret-sent"),
    ("False", b"", "MANDOS_OUTCOME=refused-approval-expired"),
])
def test_delay_expires_and_default_decides(tmp_path: Path, client_keys: Path,
                                           client_section: str, default: str,
                                           expect: bytes, outcome: str) -> None:
    srv = server(tmp_path, client_section, f"approval_delay = PT1S\n"
                 f"approved_by_default = {default}\n")
    try:
        t0 = time.monotonic()
        p = fetch(client_keys, srv.address, timeout=15)
        assert p.stdout == expect
        assert time.monotonic() - t0 >= 0.9  # held for the delay (a lower bound only)
        log = srv.log()
        assert outcome in log
        assert log.index("MANDOS_OUTCOME=approval-requested") < log.index(outcome)
    finally:
        srv.stop()


def test_approval_holds_for_its_duration(tmp_path: Path, client_keys: Path,
                                         client_section: str) -> None:
    """An approval given before any request holds for approval_duration (1 h here): the
    requests within it are served without waiting; once it has passed, a request waits
    for approval again.  Time passes in the store, as the clock would, not by sleeping."""
    srv = server(tmp_path, client_section, "approval_delay = PT60S\n"
                 "approved_by_default = False\napproval_duration = PT1H\n")
    try:
        t0 = time.time()
        assert ctl(srv, "-A", "client1").returncode == 0  # before any request
        t1 = time.time()
        store = SQLiteStore(srv.statedir)
        st = store.get("client1")
        assert st is not None and st.approved_until is not None
        assert t0 + 3600 <= st.approved_until <= t1 + 3600, "not the configured duration"
        for _ in range(2):
            assert fetch(client_keys, srv.address, timeout=15).stdout == PASSWORD
        assert "approval-requested" not in srv.log()  # nobody waited
        # the hour passes
        store.update("client1", approved_until=time.time() - 1,
                     approval_decided_at=time.time() - 3601)
        store.close()
        assert fetch(client_keys, srv.address, timeout=3).stdout == b""
        srv.wait_log("MANDOS_OUTCOME=approval-requested")
    finally:
        srv.stop()


def test_disconnect_ends_the_wait(tmp_path: Path, client_keys: Path,
                                  client_section: str) -> None:
    srv = server(tmp_path, client_section, "approval_delay = PT60S\n")
    try:
        p = fetch(client_keys, srv.address, timeout=1.5)
        assert p.stdout == b""
        srv.wait_log("disconnected while waiting")
        assert json.loads(ctl(srv, "-j").stdout)["client1"]["ApprovalPending"] is False
    finally:
        srv.stop()
