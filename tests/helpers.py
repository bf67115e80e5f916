"""Test helpers shared by the test files: keys, enrollment, a real mandosd process.

Everything runs for real: gpg in temporary GNUPGHOMEs, mandosd as a subprocess
on 127.0.0.1/::1, the venv's console scripts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def tool(name: str) -> str:
    """A console script from the venv, or the system's program."""
    p = BIN / name
    return str(p) if p.exists() else name


def have(program: str) -> bool:
    return shutil.which(program) is not None or Path(program).exists()


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


def make_keys(keydir: Path, name: str = "client1") -> Path:
    subprocess.run([tool("mandos-keygen"), "--dir", str(keydir), "--name", name],
                   check=True, capture_output=True)
    return keydir


def enroll(keydir: Path, password: bytes, name: str = "client1", host: str | None = None,
           extra: str = "") -> str:
    """The clients.conf section for *password*, made by our mandos-keygen (stdin only)."""
    argv = [tool("mandos-keygen"), "--dir", str(keydir), "--name", name,
            "--passfile", "/dev/stdin"]
    if host:
        argv += ["--host", host]
    out = subprocess.run(argv, input=password, check=True, capture_output=True).stdout
    return out.decode() + extra


@dataclass
class Mandosd:
    """A real mandosd subprocess with its own config and state directories."""

    base: Path
    sections: list[str] = field(default_factory=list)
    listen: list[str] | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.configdir = self.base / "conf"
        self.statedir = self.base / "state"
        self.logfile = self.base / "mandosd.log"
        self.configdir.mkdir(parents=True, exist_ok=True)
        if self.listen is None:
            self.port = free_port()
            self.listen = [f"127.0.0.1:{self.port}"]
        elif self.listen:
            self.port = int(self.listen[0].rpartition(":")[2])
        self.write_config()

    def write_config(self) -> None:
        (self.configdir / "clients.conf").write_text("\n".join(self.sections))
        os.chmod(self.configdir / "clients.conf", 0o600)

    @property
    def address(self) -> str:
        assert self.listen
        return self.listen[0]

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "mandosd", "--configdir", str(self.configdir),
                "--statedir", str(self.statedir), "--debug", *self.extra_args]
        for spec in self.listen or []:
            argv += ["--listen", spec]
        return argv

    def start(self, argv: list[str] | None = None, timeout: float = 15) -> Mandosd:
        log = self.logfile.open("ab")
        env = {**os.environ, **self.env}
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(argv or self.argv(), stdout=log, stderr=log, env=env,
                                     cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "serving" in self.log() or "MANDOS_OUTCOME=server-started" in self.log():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"mandosd exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise RuntimeError(f"mandosd did not start:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Mandosd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fetch(keydir: Path, *servers: str, timeout: float = 5,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    argv = [tool("mandos-client"), "--keydir", str(keydir), "--timeout", str(timeout)]
    for s in servers:
        argv += ["--connect", s]
    return subprocess.run(argv, capture_output=True, timeout=timeout + 30,
                          env={**os.environ, **(env or {})})


def parse_journal_datagram(datagram: bytes) -> dict[str, str]:
    """journald's native protocol: ``KEY=value`` lines, or ``KEY\\n<le64 size><data>\\n``."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            fields[k.decode()] = v.decode(errors="replace")
            i = nl + 1
        else:
            size = int.from_bytes(datagram[nl + 1:nl + 9], "little")
            fields[line.decode()] = datagram[nl + 9:nl + 9 + size].decode(errors="replace")
            i = nl + 9 + size + 1
    return fields


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A fresh directory under /tmp that every user can reach and write (mode 1777).

    Checker commands run as an unprivileged user: what they read or write in a
    test must live where that user can get at it (pytest's tmp_path is 0700 root).
    """
    d = Path(tempfile.mkdtemp(prefix="mandos-shared-", dir="/tmp"))
    d.chmod(0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def group_gone(pgid: int) -> bool:
    """No live process in process group *pgid* (a zombie waiting for init is dead)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat_line = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat_line[stat_line.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return False
    return True


def no_fifo_reader(fifo: Path) -> bool:
    """True when no process holds *fifo* open for reading (a child blocked on it is dead)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return True
        raise
    os.close(fd)
    return False


@contextlib.contextmanager
def veth_netns(prefix: str = "mck") -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: (its name, its address).

    Needs root and iproute2; its loopback is up, so programs inside it reach
    ``localhost``.  Removed on exit.
    """
    tag = os.urandom(3).hex()
    ns, veth0, veth1 = f"{prefix}{tag}", f"{prefix}{tag}a", f"{prefix}{tag}b"
    octet = int(tag[:2], 16) % 250 + 1
    host_ip, ns_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"

    def ip(*a: str) -> None:
        subprocess.run(["ip", *a], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", veth0, "type", "veth", "peer", "name", veth1, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", veth0)
        ip("link", "set", veth0, "up")
        ip("-n", ns, "addr", "add", f"{ns_ip}/30", "dev", veth1)
        ip("-n", ns, "link", "set", veth1, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield ns, ns_ip
    finally:
        subprocess.run(["ip", "link", "del", veth0], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
