"""mandosd under systemd's contracts: sd_notify, socket activation, idle exit, units."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PASSWORD, ROOT, Mandosd, fetch, free_port, have, listening, wait_for


def test_notifies_ready_with_status(tmp_path: Path, client_section: str) -> None:
    sock_path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(15)
    srv = Mandosd(tmp_path / "s", sections=[client_section])
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
    proc = subprocess.Popen(srv.argv(), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg
        assert "STATUS=Serving 1 clients on 127.0.0.1:" in msg
    finally:
        proc.terminate()
        proc.wait(10)
    assert "STOPPING=1" in sock.recv(4096).decode()
    assert proc.returncode == 0


def test_idle_exit_under_socket_activation(tmp_path: Path, client_keys: Path,
                                           client_section: str) -> None:
    """The server exits when idle; systemd-socket-activate keeps the socket; the next
    connection starts it again (as mandosd.socket would)."""
    if not have("systemd-socket-activate"):
        pytest.skip("systemd-socket-activate not installed")
    port = free_port()
    srv = Mandosd(tmp_path, sections=[client_section], listen=[])
    inner = [sys.executable, "-m", "mandosd", "--configdir", str(srv.configdir), "--statedir",
             str(srv.statedir), "--idle-timeout", "1"]
    argv = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", *inner]
    log = srv.logfile.open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=log)
    # systemd-socket-activate binds, then execs mandosd on the first connection
    wait_for(lambda: listening(port), 15, "systemd-socket-activate to listen")
    try:
        r = fetch(client_keys, f"127.0.0.1:{port}")
        assert r.stdout == PASSWORD, (r.stderr, srv.log())
        # mandosd exec'ed in place, then exited when idle
        assert proc.wait(30) == 0, srv.log()
        assert "idle for" in srv.log()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


UNITS = ROOT / "units"
#: the most each unit may be exposed, per `systemd-analyze security --offline=true`
THRESHOLDS = {"mandosd.service": 1.5, "mandosd-checker.service": 3.0}


def _unit_copy(unit: Path, tmp_path: Path) -> Path:
    """Verify needs the ExecStart binaries: point them at the venv when not installed."""
    text = unit.read_text()
    for prog in ("mandosd", "mandos-password-agent", "mandos-ctl"):
        if not Path(f"/usr/bin/{prog}").exists():
            text = text.replace(f"/usr/bin/{prog}", str(Path(sys.executable).parent / prog))
    out = tmp_path / unit.name
    out.write_text(text)
    return out


@pytest.mark.parametrize("unit", sorted(p.name for p in UNITS.glob("*.service")),
                         ids=str)
def test_service_hardening(unit: str, tmp_path: Path) -> None:
    if not have("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    path = _unit_copy(UNITS / unit, tmp_path)
    threshold = THRESHOLDS.get(unit, 5.0)
    # --threshold takes the exposure times ten, as an integer
    p = subprocess.run(["systemd-analyze", "security", "--offline=true",
                        f"--threshold={round(threshold * 10)}", str(path)],
                       capture_output=True, text=True)
    score = (p.stdout.strip().splitlines() or [p.stderr])[-1]
    assert "Overall exposure level" in score, p.stderr
    assert p.returncode == 0, f"{unit}: {score} (threshold {threshold})"


@pytest.mark.parametrize("unit", sorted(p.name for p in UNITS.iterdir()
                                        if p.suffix in (".service", ".socket", ".path",
                                                        ".timer")), ids=str)
def test_units_verify(unit: str, tmp_path: Path) -> None:
    if not have("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    for other in UNITS.iterdir():
        if other.suffix in (".service", ".socket", ".path", ".timer"):
            _unit_copy(other, tmp_path)
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / unit)],
                       capture_output=True, text=True)
    problems = [ln for ln in p.stderr.splitlines() if unit.split(".")[0] in ln
                or "error" in ln.lower()]
    assert p.returncode == 0 and not problems, p.stderr
