"""Debian's own Mandos programs as peers: mandos-keygen, mandos-client, /usr/sbin/mandos.

Mandos 1.8.16 from Debian 12, unchanged.  Its server insists on a system D-Bus
even with ``--no-dbus``: each server gets a private ``dbus-daemon``.  It drops
privileges to ``_mandos`` before it reaches the bus and its state directory,
so both live in a directory that user can reach.  It forks per connection:
its whole process group is killed at the end.
"""

from __future__ import annotations

import ast
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import WaitTimeout, listening, wait_for

MANDOS_SERVER = "/usr/sbin/mandos"
MANDOS_KEYGEN = "/usr/sbin/mandos-keygen"
MANDOS_CLIENT = "/usr/lib/x86_64-linux-gnu/mandos/plugins.d/mandos-client"


def have_debian_mandos() -> bool:
    return all(Path(p).exists() for p in (MANDOS_SERVER, MANDOS_KEYGEN, MANDOS_CLIENT))


def debian_keys(keydir: Path) -> Path:
    """A client key set made by Debian's mandos-keygen (Ed25519 TLS, RSA OpenPGP)."""
    keydir.mkdir(mode=0o700, parents=True)
    subprocess.run([MANDOS_KEYGEN, "--dir", str(keydir), "--force"], check=True,
                   capture_output=True)
    return keydir


def debian_section(keydir: Path, password: bytes, name: str, host: str = "127.0.0.1") -> str:
    """The clients.conf section Debian's mandos-keygen prints (passphrase on a pipe)."""
    r, w = os.pipe()
    os.write(w, password)
    os.close(w)
    try:
        out = subprocess.run([MANDOS_KEYGEN, "--dir", str(keydir), "--passfile",
                              f"/dev/fd/{r}", "--no-ssh"], pass_fds=(r,), check=True,
                             capture_output=True).stdout.decode()
    finally:
        os.close(r)
    lines = out.splitlines()
    # its section is named after this host and checks it; name and point it ourselves
    lines = [f"[{name}]" if ln.startswith("[") else
             f"host = {host}" if ln.startswith("host =") else ln for ln in lines]
    return "\n".join(lines) + "\n"


def debian_client_argv(keydir: Path, address: str) -> list[str]:
    hooks = keydir.parent / "empty-network-hooks"
    hooks.mkdir(exist_ok=True)
    return [MANDOS_CLIENT, f"--connect={address}", "--interface=none",
            f"--network-hook-dir={hooks}", f"--pubkey={keydir}/pubkey.txt",
            f"--seckey={keydir}/seckey.txt", f"--tls-pubkey={keydir}/tls-pubkey.pem",
            f"--tls-privkey={keydir}/tls-privkey.pem"]


def debian_client(keydir: Path, address: str, *, timeout: float = 20
                  ) -> subprocess.CompletedProcess[bytes]:
    """Debian's mandos-client fetching from *address* ([v6]:port or v4:port)."""
    return subprocess.run(debian_client_argv(keydir, address), capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def debian_client_refused(keydir: Path, address: str, until: Callable[[], bool],
                          timeout: float = 30) -> bytes:
    """Run Debian's mandos-client until *until()* holds (it retries a refusing server
    for ever), then stop it; return what it printed."""
    p = subprocess.Popen(debian_client_argv(keydir, address), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: until() or p.poll() is not None, timeout, "the refusal")
    finally:
        if p.poll() is None:
            p.terminate()
        out, _ = p.communicate(timeout=10)
    return out


_BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={path}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/>
<allow send_destination="*" eavesdrop="true"/><allow receive_sender="*"/></policy></busconfig>
"""


@dataclass
class DebianMandos:
    port: int
    base: Path
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"[::1]:{self.port}"

    def log(self) -> str:
        return (self.base / "mandos.log").read_text(errors="replace")

    def logged(self) -> list[str]:
        """Mandos's log records, formatted (``debuglevel=``; syslog being absent)."""
        out, fmt = [], None
        for line in self.log().splitlines():
            if line.startswith("Message: "):
                fmt = ast.literal_eval(line.removeprefix("Message: "))
            elif line.startswith("Arguments: ") and isinstance(fmt, str):
                try:
                    args = ast.literal_eval(line.removeprefix("Arguments: "))
                    out.append(fmt % args)
                except (ValueError, SyntaxError, TypeError):
                    out.append(f"{fmt} {line.removeprefix('Arguments: ')}")
                fmt = None
        return out


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> bool:
    """Mandos listens (read from /proc/net/tcp6: no probe connection is made)."""
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, timeout, "Mandos to listen")
    except WaitTimeout:
        return False
    return proc.poll() is None


def _mandos_gpg_agents() -> set[int]:
    """gpg-agents run by the _mandos user (Debian's Mandos starts one; it daemonizes, so
    it leaves the server's process group)."""
    try:
        import pwd

        uid = pwd.getpwnam("_mandos").pw_uid
    except KeyError:
        return set()
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if d.stat().st_uid == uid and b"gpg-agent" in (d / "cmdline").read_bytes():
                found.add(int(d.name))
        except OSError:
            continue
    return found


@contextmanager
def debian_mandos(clients_conf: str, *, debuglevel: str | None = None
                  ) -> Iterator[DebianMandos]:
    """Debian's real Mandos server on [::1]:PORT serving *clients_conf*.

    Mandos logs only to syslog (``/dev/log``, absent here); with *debuglevel*
    (``"INFO"``) each record it fails to send is printed by ``logging`` to the
    log file as ``Message: '...'`` and ``Arguments: (...)`` lines: see
    :meth:`DebianMandos.logged`."""
    base = Path(tempfile.mkdtemp(prefix="debian-mandos-"))
    os.chmod(base, 0o755)  # _mandos must reach the bus socket and the state directory
    conf = base / "conf"
    conf.mkdir()
    (conf / "mandos.conf").write_text("[DEFAULT]\n")
    (conf / "clients.conf").write_text(clients_conf)
    state = base / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    bus = base / "bus"
    (base / "bus.conf").write_text(_BUS_CONF.format(path=bus))
    dbus = subprocess.Popen(["dbus-daemon", "--config-file", str(base / "bus.conf"),
                             "--nofork", "--nopidfile"], stdout=subprocess.DEVNULL)
    srv = None
    agents_before = _mandos_gpg_agents()
    try:
        try:
            wait_for(bus.exists, 10, "the private dbus-daemon's socket")
        except WaitTimeout:
            raise RuntimeError("the private dbus-daemon did not start") from None
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={bus}"}
        log = (base / "mandos.log").open("wb")
        srv = subprocess.Popen([MANDOS_SERVER, "--address", "::1", "--port", str(port),
                                "--no-zeroconf", "--no-dbus", "--foreground", "--configdir",
                                str(conf), "--statedir", str(state),
                                *([f"--debuglevel={debuglevel}"] if debuglevel else [])],
                               env=env, stdout=log,
                               stderr=log, start_new_session=True)
        if not _wait_port(port, srv):
            raise RuntimeError("Debian's Mandos server did not start:\n"
                               + (base / "mandos.log").read_text(errors="replace")[-3000:])
        yield DebianMandos(port, base, srv)
    finally:
        if srv is not None:
            srv.terminate()
            try:
                srv.wait(10)
            except subprocess.TimeoutExpired:
                srv.kill()
            try:
                os.killpg(srv.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in _mandos_gpg_agents() - agents_before:  # only the ones this server started
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        dbus.terminate()
        dbus.wait(10)
        shutil.rmtree(base, ignore_errors=True)
