"""Shared pieces of the benchmarks: reference systems, timing, process CPU, tables.

Benchmarks measure; they never assert.  Every figure is a median over several
runs, and each comparison runs both systems in the same process, interleaved.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MANDOS_SERVER = "/usr/sbin/mandos"
MANDOS_KEYGEN = "/usr/sbin/mandos-keygen"
MANDOS_CLIENT = "/usr/lib/x86_64-linux-gnu/mandos/plugins.d/mandos-client"
TICK = os.sysconf("SC_CLK_TCK")


def ours(name: str) -> str:
    return str(VENV_BIN / name)


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def p90(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


def time_to_output(argv: list[str], *, env: dict[str, str] | None = None,
                   timeout: float = 30) -> tuple[float, bytes]:
    """Seconds from process start to its first byte on stdout, and all it printed."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, env=env)
    assert p.stdout is not None
    first = p.stdout.read(1)
    t1 = time.perf_counter()
    rest = p.stdout.read()
    p.wait(timeout)
    return t1 - t0, first + rest


def cpu_seconds(pid: int) -> float:
    """CPU time of *pid*'s threads and its reaped children (Mandos forks per connection).

    The threads' time comes from ``/proc/PID/task/*/schedstat`` (nanoseconds: a
    mandosd secret costs about a millisecond, a tenth of a clock tick); the
    children's from ``/proc/PID/stat`` in clock ticks (a Mandos child costs tens of
    them).  Falls back to ticks for the threads if schedstat is missing."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[11..14] are utime, stime, cutime, cstime
    children = sum(int(x) for x in fields[13:15]) / TICK
    own = 0.0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    own += int(f.read().split()[0]) / 1e9
            except FileNotFoundError:  # the thread ended
                pass
    except OSError:
        own = sum(int(x) for x in fields[11:13]) / TICK
    return own + children


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def start_mandosd(configdir: Path, statedir: Path, host: str, port: int,
                  timeout: float = 120) -> subprocess.Popen[bytes]:
    """mandosd as it runs in production: socket-activated (so no in-process checkers
    add to its CPU time), returned once it has loaded its config and sent READY=1."""
    spec = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    conf = configdir / "clients.conf"
    if conf.exists():
        conf.chmod(0o600)  # mandosd refuses a clients.conf others can read
    # PYTHONPATH passes through: a checkout run with PYTHONPATH=$PWD measures its own code
    argv = ["systemd-socket-activate", "-E", "NOTIFY_SOCKET", "-E", "PATH", "-E", "PYTHONPATH",
            "-l", spec,
            ours("mandosd"), "--configdir",
            str(configdir), "--statedir", str(statedir)]

    def trigger() -> None:  # systemd-socket-activate starts it on the first connection
        wait_port(host, port)

    return start_ready(argv, timeout, trigger, log=statedir.parent / "mandosd.log")


def start_ready(argv: list[str], timeout: float = 120,
                trigger: Callable[[], None] | None = None,
                log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a server that speaks sd_notify; return once it has sent READY=1.

    Its output goes to *log* (appended), or nowhere."""
    d = Path(tempfile.mkdtemp(prefix="bench-notify-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(d / "notify"))
    sock.settimeout(0.5)
    deadline = time.monotonic() + timeout
    env = {**os.environ, "NOTIFY_SOCKET": str(d / "notify")}
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    p = subprocess.Popen(argv, env=env, stdout=out, stderr=out)
    try:
        if trigger is not None:
            trigger()
        while True:
            try:
                if b"READY=1" in sock.recv(4096):
                    break
            except TimeoutError:
                pass
            if p.poll() is not None:
                raise RuntimeError("exited before READY=1")
            if time.monotonic() > deadline:
                raise TimeoutError("no READY=1")
    except BaseException as e:
        stop(p)
        if log is not None and not isinstance(e, KeyboardInterrupt):
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{argv[0]} did not become ready: {e}\n{tail}") from e
        raise
    finally:
        sock.close()
        shutil.rmtree(d, ignore_errors=True)
        if log is not None:
            out.close()  # type: ignore[union-attr]
    return p


def wait_port(host: str, port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


@contextmanager
def tempdir(prefix: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        subprocess.run(["gpgconf", "--homedir", str(d), "--kill", "all"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


_BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={path}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/>
<allow send_destination="*" eavesdrop="true"/><allow receive_sender="*"/></policy></busconfig>
"""


@contextmanager
def mandos_server(base: Path, clients_conf: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Debian's real Mandos server on [::1]:port, with a private D-Bus it insists on."""
    conf = base / "mandos-conf"
    conf.mkdir()
    (conf / "mandos.conf").write_text("[DEFAULT]\n")
    (conf / "clients.conf").write_text(clients_conf)
    # Mandos drops privileges before it connects to the bus and reads its state
    # directory: both must be reachable by others, outside our 0700 work directory
    busdir = Path(tempfile.mkdtemp(prefix="bench-mandos-"))
    os.chmod(busdir, 0o755)
    bus = busdir / "bus"
    state = busdir / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    (base / "bus.conf").write_text(_BUS_CONF.format(path=bus))
    dbus = subprocess.Popen(["dbus-daemon", "--config-file", str(base / "bus.conf"),
                             "--nofork", "--nopidfile"], stdout=subprocess.DEVNULL)
    for _ in range(100):
        if bus.exists():
            break
        time.sleep(0.02)
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={bus}"}
    log = (base / "mandos.log").open("wb")
    srv = subprocess.Popen([MANDOS_SERVER, "--address", "::1", "--port", str(port),
                            "--no-zeroconf", "--no-dbus", "--foreground", "--configdir",
                            str(conf), "--statedir", str(state)], env=env, stdout=log,
                           stderr=log, start_new_session=True)
    try:
        try:
            wait_port("::1", port)
        except RuntimeError:
            raise RuntimeError("Mandos server did not start:\n"
                               + (base / "mandos.log").read_text(errors="replace")[-3000:]) from None
        yield srv
    finally:
        stop(srv)
        try:  # and whatever it forked for connections still running
            os.killpg(srv.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stop(dbus)
        shutil.rmtree(busdir, ignore_errors=True)


def mandos_client_argv(keys: Path, address: str, hooks: Path) -> list[str]:
    """Debian's mandos-client fetching from *address* (``[::1]:PORT``, ``127.0.0.1:PORT``);
    *hooks* is an empty network-hook directory (the installed hooks would configure
    interfaces)."""
    return [MANDOS_CLIENT, f"--connect={address}", "--interface=none",
            f"--network-hook-dir={hooks}",
            f"--pubkey={keys}/pubkey.txt", f"--seckey={keys}/seckey.txt",
            f"--tls-pubkey={keys}/tls-pubkey.pem", f"--tls-privkey={keys}/tls-privkey.pem"]


def have_mandos() -> bool:
    return all(Path(p).exists() for p in (MANDOS_SERVER, MANDOS_KEYGEN, MANDOS_CLIENT))


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) + " |" for r in rows]
    return "\n".join([line, sep, *body])
