"""Approvals end to end: a request held by approval_delay, reached by mandos-ctl -A/-D."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import PASSWORD
from tests.helpers import Mandosd, fetch, tool


def ctl(srv: Mandosd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("mandos-ctl"), "--configdir", str(srv.configdir),
                           "--statedir", str(srv.statedir), *args],
                          capture_output=True, text=True, timeout=60)


def server(tmp_path: Path, section: str, extra: str) -> Mandosd:
    return Mandosd(tmp_path / "srv", sections=[section + extra]).start()


def background_fetch(keys: Path, address: str, timeout: float = 30
                     ) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        t0 = time.monotonic()
        p = fetch(keys, address, timeout=timeout)
        out.update(stdout=p.stdout, elapsed=time.monotonic() - t0)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def wait_pending(srv: Mandosd, limit: float = 15) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        p = ctl(srv, "-j", "client1")
        if json.loads(p.stdout)["client1"]["ApprovalPending"]:
            return
        time.sleep(0.1)
    raise AssertionError("no approval became pending:\n" + srv.log())


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
        assert float(out["elapsed"]) < 30  # type: ignore[arg-type]
        assert outcome in srv.log()
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
        assert time.monotonic() - t0 >= 0.9
        assert outcome in srv.log()
    finally:
        srv.stop()


def test_approval_holds_for_its_duration(tmp_path: Path, client_keys: Path,
                                         client_section: str) -> None:
    srv = server(tmp_path, client_section, "approval_delay = PT60S\n"
                 "approved_by_default = False\napproval_duration = PT1H\n")
    try:
        assert ctl(srv, "-A", "client1").returncode == 0  # before any request
        for _ in range(2):
            t0 = time.monotonic()
            assert fetch(client_keys, srv.address, timeout=15).stdout == PASSWORD
            assert time.monotonic() - t0 < 10
    finally:
        srv.stop()


def test_disconnect_ends_the_wait(tmp_path: Path, client_keys: Path,
                                  client_section: str) -> None:
    srv = server(tmp_path, client_section, "approval_delay = PT60S\n")
    try:
        p = fetch(client_keys, srv.address, timeout=1.5)
        assert p.stdout == b""
        deadline = time.monotonic() + 10
        while "disconnected while waiting" not in srv.log():
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        assert json.loads(ctl(srv, "-j").stdout)["client1"]["ApprovalPending"] is False
    finally:
        srv.stop()
