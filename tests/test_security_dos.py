"""Denial of service from the attacker's side (issue 11, item 11).

- Stalled connections from one address cannot lock a legitimate client out,
  even when the server was started with a low file-descriptor limit.
- The server raises its soft descriptor limit to the hard one.
- Error lines are rate-limited (no thousands of lines per attack).
- A waiting approval is woken by the change, not by polling the database.
"""

from __future__ import annotations

import re
import resource
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.helpers import PASSWORD, Mandosd, fetch, tool, wait_for


def _limit_nofile(soft: int, hard: int):  # type: ignore[no-untyped-def]
    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return pre


def start_limited(srv: Mandosd, soft: int, hard: int) -> Mandosd:
    log = srv.logfile.open("ab")
    srv.proc = subprocess.Popen(srv.argv(), stdout=log, stderr=log, cwd=srv.configdir,
                                preexec_fn=_limit_nofile(soft, hard))
    wait_for(lambda: "MANDOS_OUTCOME=server-started" in srv.log() or srv.proc.poll() is not None,
             20, "mandosd to start")
    assert srv.proc.poll() is None, srv.log()
    return srv


def nofile(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no limit line")


@pytest.mark.parametrize("soft,hard", [(256, 8192), (200, 200)], ids=["raisable", "fixed"])
def test_stalled_connections_from_one_address_lock_nobody_out(
        tmp_path: Path, client_keys: Path, client_section: str, soft: int, hard: int) -> None:
    """1,111 stalled connections from 127.0.0.1 first, then the real client from the same
    address: it is served, and the server's log does not fill with error lines."""
    srv = Mandosd(tmp_path / "srv", sections=[client_section], extra_args=["--peer-timeout", "60"])
    try:
        start_limited(srv, soft, hard)
        assert srv.proc is not None
        assert nofile(srv.proc.pid) == (hard, hard)  # raised to the hard limit
        stalls = []
        for i in range(1111):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            if i % 2:
                s.sendall(b"1\r\n")  # then never answer the TLS handshake
            stalls.append(s)
        p = fetch(client_keys, srv.address, timeout=20)
        assert p.returncode == 0 and p.stdout == PASSWORD, p.stderr.decode() + srv.log()[-3000:]
        log = srv.log()
        assert len(re.findall(r"accept: ", log)) <= 3, "accept errors are not rate-limited"
        assert len(re.findall(r"connection dropped", log)) <= 3, "drops are not rate-limited"
        for s in stalls:
            s.close()
    finally:
        srv.stop()


def test_waiting_approval_is_woken_by_the_change_not_by_polling(
        tmp_path: Path, client_keys: Path, client_section: str) -> None:
    srv = Mandosd(tmp_path / "srv", sections=[
        client_section + "approval_delay = PT60S\napproved_by_default = False\n"]).start()
    try:
        out: dict[str, bytes] = {}
        t = threading.Thread(target=lambda: out.update(
            got=fetch(client_keys, srv.address, timeout=60).stdout))
        t.start()
        srv.wait_log("waits for approval")
        p = subprocess.run([tool("mandos-ctl"), "--configdir", str(srv.configdir),
                            "--statedir", str(srv.statedir), "--approve", "client1"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        t.join(90)
        assert out.get("got") == PASSWORD, srv.log()[-3000:]
        rereads = re.findall(r"approval state re-read \(([^)]*)\)", srv.log())
        assert rereads and rereads[-1] == "the state changed", rereads
        assert "timer" not in rereads, rereads  # no polling while nothing changed
    finally:
        srv.stop()
