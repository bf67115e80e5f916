"""The one helper library for the tests: keys, enrollment, a real mandosd, mandos-ctl,
the client by hand, a real journald, and waiting on conditions instead of sleeping.

Everything runs for real: gpg in temporary GNUPGHOMEs, mandosd as a subprocess
on 127.0.0.1/::1, the venv's console scripts, systemd-journald read back with
journalctl.  Test modules import from here (and from ``tests/agentlib.py`` for
the agent, ``tests/lukslib.py`` for LUKS images), never from each other.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

if TYPE_CHECKING:
    from tests.tlspeers import Result

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
#: client1's passphrase in the shared fixtures (conftest.py)
PASSWORD = b"correct horse battery staple \xc3\xa9 !"
JOURNALD = "/lib/systemd/systemd-journald"

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """:func:`wait_for` gave up: the condition never held."""


def wait_for(condition: Callable[[], T | None], timeout: float = 15, what: str = "the condition",
             interval: float = 0.02) -> T:
    """Wait until *condition()* returns something true, and return it.

    The timeout is a safety net against a hang, never the thing tested: pick it
    generously (a 2-core machine shared by many jobs is slow).
    """
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


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


def listening(port: int) -> bool:
    """Something listens on TCP *port* (read from /proc/net: no connection is made)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


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
        proc = self.proc

        def started() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"mandosd exited {proc.returncode}:\n{self.log()}")
            return "serving" in self.log() or "MANDOS_OUTCOME=server-started" in self.log()

        try:
            wait_for(started, timeout, "mandosd to start")
        except WaitTimeout:
            raise RuntimeError(f"mandosd did not start:\n{self.log()}") from None
        return self

    def wait_log(self, needle: str, timeout: float = 15, count: int = 1) -> str:
        """The log once *needle* is in it *count* times (AssertionError after *timeout*)."""
        wait_for(lambda: self.log().count(needle) >= count, timeout,
                 f"{needle!r} in mandosd's log")
        return self.log()

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


def ctl(srv: Mandosd, *args: str, input: bytes | None = None, env: dict[str, str] | None = None,
        check: bool = False, configdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``mandos-ctl`` on *srv*'s config (or *configdir*) and state (output decoded; *input*
    on stdin)."""
    argv = [tool("mandos-ctl"), "--configdir", str(configdir or srv.configdir), "--statedir",
            str(srv.statedir), *args]
    p = subprocess.run(argv, capture_output=True, input=input, timeout=60,
                       env={**os.environ, **(env or {})})
    done = subprocess.CompletedProcess(argv, p.returncode, p.stdout.decode(errors="replace"),
                                       p.stderr.decode(errors="replace"))
    if check:
        done.check_returncode()
    return done


def secret_forms(section: str) -> list[bytes]:
    """Every form of client1's secret that must never leak: the passphrase, its
    base64, and the start of the encrypted blob (base64 and raw) in *section*."""
    b64 = "".join(section.split("secret =")[1].split("checker")[0].split())
    return [PASSWORD, base64.b64encode(PASSWORD), b64[:40].encode(),
            base64.b64decode(b64)[:24]]


def raw_fetch(keydir: Path, address: str) -> bytes:
    """Do the client side by hand (GnuTLS, raw public key) and return exactly the bytes
    the server sent."""
    from tests.tlspeers import exchange

    r = exchange(keydir, address)
    assert r.error is None, r.error
    return r.data


@dataclass(frozen=True)
class RawClient:
    """A simulated client machine for herds: its own Ed25519 key (so its own key_id) and
    its own random secret, which the server sends as is (no gpg: the wire is what counts).
    """

    name: str
    key_id: str
    spki_pem: bytes
    key_pem: bytes
    secret: bytes

    def section(self, extra: str = "") -> str:
        """Its clients.conf section (checker ``true``: always up)."""
        b64 = base64.b64encode(self.secret).decode()
        return (f"[{self.name}]\nhost = 127.0.0.1\nkey_id = {self.key_id}\n"
                f"checker = true\nsecret = {b64}\n{extra}")

    def exchange(self, address: str, timeout: float = 30) -> Result:
        """One fetch by hand: exactly the bytes the server sent, and our address."""
        from tests.tlspeers import exchange

        return exchange(Path("/nonexistent"), address, spki_pem=self.spki_pem,
                                 key_pem=self.key_pem, timeout=timeout)


def raw_clients(n: int, prefix: str = "c") -> list[RawClient]:
    """*n* clients with fresh keys (milliseconds each: no gpg)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from mandos_core.protocol import key_id

    out = []
    for i in range(n):
        k = ed25519.Ed25519PrivateKey.generate()
        pub = k.public_key()
        out.append(RawClient(
            f"{prefix}{i:02d}",
            key_id(pub.public_bytes(serialization.Encoding.DER,
                                    serialization.PublicFormat.SubjectPublicKeyInfo)),
            pub.public_bytes(serialization.Encoding.PEM,
                             serialization.PublicFormat.SubjectPublicKeyInfo),
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()),
            os.urandom(64)))
    return out


class Journald:
    """A real ``systemd-journald`` in a private mount namespace, read with ``journalctl``.

    Its socket and files live under *base*; programs reach it through
    ``MANDOS_JOURNAL_SOCKET`` (:attr:`env`).  Needs root (CI runs as root); a
    journald that does not start is a failure, not a skip.
    """

    def __init__(self, base: Path) -> None:
        if os.geteuid() != 0 or not Path(JOURNALD).exists() or not have("unshare") \
                or not have("journalctl"):
            pytest.skip("a private journald needs root, unshare, journalctl and "
                        "systemd-journald")
        self.base = base
        self.run_systemd, self.run_log, self.var_log = (base / d for d in
                                                        ("run-systemd", "run-log", "var"))
        for d in (self.run_systemd / "journal", self.run_log, self.var_log):
            d.mkdir(parents=True)
        self.socket = self.run_systemd / "journal" / "socket"
        self.directory = self.run_log / "journal"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"MANDOS_JOURNAL_SOCKET": str(self.socket)}

    def start(self) -> Journald:
        script = (f"mount --bind {self.run_systemd} /run/systemd && "
                  f"mount --bind {self.run_log} /run/log && "
                  f"mount --bind {self.var_log} /var/log && exec {JOURNALD}")
        proc = self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def up() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"systemd-journald did not start: {err.strip()[:300]}")
            return self.socket.exists()

        try:
            wait_for(up, 15, "systemd-journald's socket")
        except WaitTimeout:
            self.stop()
            pytest.fail("systemd-journald did not make its socket")
        return self

    def entries(self, *match: str) -> list[dict[str, str]]:
        """``journalctl -o json`` with *match* (journalctl's own parser, never ours)."""
        p = subprocess.run(["journalctl", "--directory", str(self.directory), "--no-pager",
                            "-o", "json", *match], capture_output=True, text=True)
        # before journald wrote its first file the directory may not exist yet: no entries
        if p.returncode != 0 and "No journal files" not in p.stderr \
                and "No such file or directory" not in p.stderr:
            raise AssertionError(f"journalctl failed: {p.stderr}")
        return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]

    def wait_entries(self, *match: str, count: int = 1,
                     timeout: float = 15) -> list[dict[str, str]]:
        """The entries matching *match*, once there are at least *count* of them."""
        def enough() -> list[dict[str, str]] | None:
            got = self.entries(*match)
            return got if len(got) >= count else None

        return wait_for(enough, timeout, f"{count} journal entries matching {match}")

    def export(self) -> bytes:
        """Everything journald stored, in its export format (for byte searches)."""
        return subprocess.run(["journalctl", "--directory", str(self.directory), "-o",
                               "export"], capture_output=True, check=True).stdout

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Journald:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
