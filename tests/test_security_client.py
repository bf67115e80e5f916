"""The client side of the security review (issue 11: items 2, 8, 11c, 12, 14), from the attacker's side.

- a rogue key server (anyone can announce ``_mandos._tcp``) that sends ``gpg --store``
  output, a passphrase-only message, or a message encrypted to our public key with a wrong
  passphrase, must neither reach the asker nor stop the agent from taking the honest
  server's secret;
- private key files others can read are refused, as ssh refuses them;
- a flood of servers costs the agent a longer line, not a thread each;
- no core dump, and no ptrace by the same user, for any of the programs;
- a signal at any point leaves no gpg-agent and no GNUPGHOME (with the private key) behind.

Real parts throughout: gpg, mandosd, TLS, systemd-ask-password, signals.  The rogue server's
TLS is in one function, :func:`rogue_tls_send`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mandos_core.protocol import VERSION_LINE
from password_agent.gpg import Decryptor, GpgError, NotForUs
from tests.agentlib import (
    SYSTEMD_ASK_PASSWORD,
    AgentProc,
    FakeAsker,
    SilentServer,
    ask,
    remove_questions,
    unique_prefix,
)
from tests.helpers import PASSWORD, ROOT, Mandosd, fetch, make_keys, tool, wait_for

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="systemd's askers only accept answers from root")
needs_asker = pytest.mark.skipif(not os.path.exists(SYSTEMD_ASK_PASSWORD),
                                 reason="systemd-ask-password is not installed")

ROGUE_TEXT = b"rogue passphrase from a rogue server"


# --- the attacker's tools ----------------------------------------------------------------------


def rogue_tls_send(conn: socket.socket, payload: bytes) -> None:
    """Protocol 1 from the key server's side, over an accepted TCP connection: read the
    version line, then, as the TLS *client* (roles are inverted; GnuTLS, accepting the
    client's raw public key as any Mandos server does), send *payload* and close."""
    from mandos_core import gnutls, tls

    conn.settimeout(10)
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            return
        line += chunk
    assert line == VERSION_LINE
    conn.setblocking(False)
    fd = conn.fileno()
    deadline = time.monotonic() + 10
    with gnutls.Credentials() as cred, gnutls.Session(
            fd, server=False, credentials=cred,
            priority=tls.effective_priority(None, server=True)) as session:
        try:
            tls.drive(session, fd, session.handshake, deadline)
            tls.send_all(session, fd, payload, deadline)
            session.bye()
        except (gnutls.GnuTLSError, gnutls.WouldBlock, tls.TLSTimeout):
            pass


class RogueServer:
    """A key server that answers every request with *payload* (no client check at all)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.served = threading.Event()
        self.count = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                rogue_tls_send(conn, self.payload)
                self.count += 1
                self.served.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class GatedRelay:
    """A TCP relay to *target* that holds every connection until :attr:`gate` is set, so
    that the honest server answers only after the rogue one (the order is the test's)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.gate = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        self.gate.wait(60)
        with conn, contextlib.suppress(OSError), \
                socket.create_connection(self.target, timeout=10) as up:
            sel = selectors.DefaultSelector()
            sel.register(conn, selectors.EVENT_READ, up)
            sel.register(up, selectors.EVENT_READ, conn)
            open_ends = 2
            while open_ends:
                for key, _ in sel.select(10):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if data:
                        key.data.sendall(data)
                    else:
                        sel.unregister(key.fileobj)
                        with contextlib.suppress(OSError):
                            key.data.shutdown(socket.SHUT_WR)
                        open_ends -= 1

    def close(self) -> None:
        self.gate.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def gpg_message(keydir: Path, tmp: Path, *how: str, plaintext: bytes = ROGUE_TEXT) -> bytes:
    """``gpg *how`` on *plaintext* in a throw-away home that knows only our public key."""
    home = tmp / f"attacker-gpg-{len(list(tmp.glob('attacker-gpg-*')))}"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--quiet", "--no-tty",
           "--trust-model", "always", "--pinentry-mode", "loopback", "--passphrase", "x"]
    try:
        subprocess.run([*gpg, "--import", str(keydir / "pubkey.txt")], check=True,
                       capture_output=True)
        fpr = next(ln.split(":")[9] for ln in subprocess.run(
            [*gpg, "--with-colons", "--fingerprint", "--list-keys"], check=True,
            capture_output=True, text=True).stdout.splitlines() if ln.startswith("fpr:"))
        argv = [a.replace("OURKEY", fpr) for a in how]
        return subprocess.run([*gpg, *argv], input=plaintext, check=True,
                              capture_output=True).stdout
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def open_after(rogue: RogueServer, relay: GatedRelay) -> None:
    """Let the honest server answer once the rogue one has sent its message."""
    def gate() -> None:
        if rogue.served.wait(60):
            relay.gate.set()

    threading.Thread(target=gate, daemon=True).start()


STORE = ("--store",)                       # a bare literal packet: gpg "decrypts" it, exit 0
SYMMETRIC = ("--symmetric",)               # passphrase only (SKESK), not to our key
TO_US = ("--encrypt", "--recipient", "OURKEY")  # to our public key, which is no secret


@pytest.fixture()
def honest(tmp_path: Path, client_section: str) -> Iterator[Mandosd]:
    with Mandosd(tmp_path / "srv", sections=[client_section]) as srv:
        yield srv


@pytest.fixture()
def relay(honest: Mandosd) -> Iterator[GatedRelay]:
    r = GatedRelay(honest.address)
    yield r
    r.close()


@pytest.fixture()
def prefix() -> Iterator[str]:
    p = unique_prefix()
    yield p
    remove_questions(p)


# --- item 2: only a message encrypted to our key ----------------------------------------------


@pytest.mark.parametrize("how", [STORE, SYMMETRIC], ids=["gpg-store", "symmetric"])
def test_decryptor_refuses_a_message_not_encrypted_to_our_key(
        tmp_path: Path, client_keys: Path, how: tuple[str, ...]) -> None:
    message = gpg_message(client_keys, tmp_path, *how)
    with Decryptor(client_keys / "seckey.txt") as d:
        with pytest.raises(NotForUs, match="refused the secret"):
            d.decrypt(message)
        good = gpg_message(client_keys, tmp_path, *TO_US)
        with d.decrypt(good) as secret:
            assert secret.reveal() == ROGUE_TEXT


OURS = "8CC50509A173B03D167C9EB73714229753135377"
GOOD = f"""[GNUPG:] ENC_TO 8B658FF4176ED2F6 18 0
[GNUPG:] DECRYPTION_KEY 2F8A0C962AD30F20982FF0258B658FF4176ED2F6 {OURS} -
[GNUPG:] BEGIN_DECRYPTION
[GNUPG:] DECRYPTION_INFO 2 9 0
[GNUPG:] PLAINTEXT 62 1796186539
[GNUPG:] PLAINTEXT_LENGTH 6
[GNUPG:] DECRYPTION_OKAY
[GNUPG:] GOODMDC
[GNUPG:] END_DECRYPTION
"""


@pytest.mark.parametrize("status, why", [
    (GOOD, None),
    ("[GNUPG:] PLAINTEXT 62 1796186539\n[GNUPG:] PLAINTEXT_LENGTH 6\n", "bare literal data"),
    (GOOD.replace(OURS, "0" * 40), "not ours"),
    (GOOD.replace("[GNUPG:] DECRYPTION_OKAY\n", ""), "decryption failed"),
    (GOOD + "[GNUPG:] PLAINTEXT 62 1796186539\n", "outside its encrypted part"),
    ("[GNUPG:] PLAINTEXT 62 0\n" + GOOD, "outside its encrypted part"),
    ("[GNUPG:] NEED_PASSPHRASE_SYM 9 3 2\n[GNUPG:] BEGIN_DECRYPTION\n[GNUPG:] PLAINTEXT 62 0\n"
     "[GNUPG:] DECRYPTION_OKAY\n[GNUPG:] END_DECRYPTION\n", "with a passphrase"),
    ("gpg: [GNUPG:] DECRYPTION_OKAY\n", "not an encrypted"),
])
def test_refusal_policy(status: str, why: str | None) -> None:
    """The pure decision on gpg's status lines, one forged or odd form per row."""
    from password_agent.gpg import refusal

    got = refusal(status.encode(), {OURS})
    assert got is None if why is None else (got is not None and why in got), got


def test_decryptor_refuses_a_message_for_another_key(tmp_path: Path, client_keys: Path) -> None:
    other = make_keys(tmp_path / "other", "other")
    message = gpg_message(other, tmp_path, *TO_US)
    with Decryptor(client_keys / "seckey.txt") as d, pytest.raises(GpgError):
        d.decrypt(message)


@needs_asker
@needs_root
def test_rogue_store_server_does_not_answer_the_asker(
        tmp_path: Path, client_keys: Path, relay: GatedRelay, prefix: str) -> None:
    """gpg --store output from a rogue server is refused; the honest server's secret wins."""
    rogue = RogueServer(gpg_message(client_keys, tmp_path, *STORE))
    open_after(rogue, relay)
    try:
        with AgentProc(tmp_path, client_keys, [rogue.address, relay.address],
                       id_prefix=prefix) as agent:
            out, _ = ask(prefix + "root").communicate(timeout=60)
            assert out == PASSWORD + b"\n", agent.log()
            assert "bare literal data" in agent.log()
            assert ROGUE_TEXT.decode() not in agent.log()
    finally:
        rogue.close()


def test_secret_refused_by_the_asker_is_not_the_end(
        tmp_path: Path, client_keys: Path, relay: GatedRelay) -> None:
    """A rogue server's message encrypted to our (public) key decrypts, and the asker refuses
    it.  The asker's next try must get the honest server's secret, not silence for the boot."""
    rogue = RogueServer(gpg_message(client_keys, tmp_path, *TO_US))
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    try:
        with AgentProc(tmp_path, client_keys, [rogue.address, relay.address],
                       ask_dir=ask_dir, args=["--retry-max", "0.5"]):
            with FakeAsker(ask_dir, "cryptsetup:/dev/sda3") as first:
                assert first.answer(30) == (b"+" + ROGUE_TEXT, 0)
            relay.gate.set()
            # systemd-cryptsetup's next try: the same process asks the same again
            with FakeAsker(ask_dir, "cryptsetup:/dev/sda3") as again:
                assert again.answer(30) == (b"+" + PASSWORD, 0)
                assert again.answer(1) is None  # and the rogue secret is not sent again
    finally:
        rogue.close()


def test_mandos_client_skips_a_rogue_server(tmp_path: Path, client_keys: Path,
                                            relay: GatedRelay) -> None:
    rogue = RogueServer(gpg_message(client_keys, tmp_path, *STORE))
    open_after(rogue, relay)
    try:
        p = fetch(client_keys, rogue.address, relay.address, timeout=20)
    finally:
        rogue.close()
    assert (p.returncode, p.stdout) == (0, PASSWORD), p.stderr
    assert b"bare literal data" in p.stderr


# --- item 8: private key files ----------------------------------------------------------------


def copy_keys(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def agent_exit(tmp_path: Path, keys: Path) -> tuple[int, str]:
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir(exist_ok=True)
    with FakeAsker(ask_dir, "cryptsetup:/dev/sda9"):
        agent = AgentProc(tmp_path, keys, ["127.0.0.1:9"], ask_dir=ask_dir,
                          args=["--exit-when-idle"]).start(wait_ready=False)
        try:
            return agent.wait_exit(), agent.log()
        finally:
            agent.stop()


@pytest.mark.parametrize("name", ["tls-privkey.pem", "seckey.txt"])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_readable_private_key_is_refused(tmp_path: Path, client_keys: Path, name: str,
                                         mode: int) -> None:
    keys = copy_keys(client_keys, tmp_path / "keys")
    os.chmod(keys / name, mode)
    line = (f"WARNING: UNPROTECTED PRIVATE KEY FILE! Permissions {mode:04o} for "
            f"'{keys / name}' are too open; fix with: chmod 600 '{keys / name}'")
    p = fetch(keys, "127.0.0.1:9")
    assert (p.returncode, p.stderr.decode()) == (3, f"mandos-client: {line}\n")
    code, log = agent_exit(tmp_path, keys)
    assert code == 3 and line in log, log
    assert "Traceback" not in log


def test_private_key_owned_by_someone_else_is_refused(tmp_path: Path, client_keys: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a file away")
    keys = copy_keys(client_keys, tmp_path / "keys")
    os.chown(keys / "seckey.txt", 65534, 65534)
    p = fetch(keys, "127.0.0.1:9")
    assert p.returncode == 3
    assert p.stderr.decode().startswith(
        f"mandos-client: {keys / 'seckey.txt'}: private key owned by uid 65534")


def test_missing_keydir(tmp_path: Path) -> None:
    keydir = tmp_path / "no-such-dir"
    p = fetch(keydir, "127.0.0.1:9")
    assert p.returncode == 3
    assert p.stderr.decode().startswith(f"mandos-client: {keydir}: directory not found"), p.stderr
    code, log = agent_exit(tmp_path, keydir)
    assert code == 3 and f"{keydir}: directory not found" in log, log
    assert "Traceback" not in log


# --- item 11(c): a flood of servers, a bounded number of threads -------------------------------


class StallingServers:
    """*n* listening sockets that accept and never answer; counts the servers reached."""

    def __init__(self, n: int) -> None:
        self.socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
        self.addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in self.socks]
        self.reached: set[int] = set()
        self.held: list[socket.socket] = []
        self._sel = selectors.DefaultSelector()
        for i, s in enumerate(self.socks):
            self._sel.register(s, selectors.EVENT_READ, i)
        self._stop = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(0.2):
                with contextlib.suppress(OSError):
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    self.held.append(conn)
                    self.reached.add(key.data)

    def close(self) -> None:
        self._stop = True
        for s in self.socks + self.held:
            s.close()


def max_threads_until(pid: int, done: Callable[[], bool], timeout: float = 60) -> int:
    """Sample /proc/PID/task until *done*; the largest thread count seen."""
    most = 0
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "not done in time"
        with contextlib.suppress(FileNotFoundError):
            most = max(most, len(os.listdir(f"/proc/{pid}/task")))
        time.sleep(0.002)  # sampling: the thread count between samples is what is measured
    return most


FLOOD = 64
#: main thread, one job, the gpg import waiter, gpg status readers: a handful
OWN_THREADS = 8


def test_agent_threads_stay_bounded_with_many_servers(tmp_path: Path, client_keys: Path) -> None:
    from password_agent.client import MAX_CONCURRENT_FETCHES

    flood = StallingServers(FLOOD)
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    try:
        with AgentProc(tmp_path, client_keys, flood.addresses, ask_dir=ask_dir,
                       args=["--timeout", "0.5", "--connect-timeout", "0.5",
                             "--retry-max", "60"]) as agent, \
                FakeAsker(ask_dir, "cryptsetup:/dev/sda4"):
            assert agent.proc is not None
            most = max_threads_until(agent.proc.pid, lambda: len(flood.reached) == FLOOD)
    finally:
        flood.close()
    assert most <= MAX_CONCURRENT_FETCHES + OWN_THREADS, f"{most} threads"


def test_mandos_client_threads_stay_bounded(tmp_path: Path, client_keys: Path) -> None:
    from password_agent.client import MAX_CONCURRENT_FETCHES

    flood = StallingServers(FLOOD)
    argv = [tool("mandos-client"), "--keydir", str(client_keys), "--timeout", "0.5"]
    for a in flood.addresses:
        argv += ["--connect", a]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        most = max_threads_until(proc.pid, lambda: len(flood.reached) == FLOOD)
        assert proc.wait(60) == 1
    finally:
        proc.kill()
        proc.wait()
        flood.close()
    assert most <= MAX_CONCURRENT_FETCHES + OWN_THREADS, f"{most} threads"


def test_announcement_flood_is_capped() -> None:
    """Anyone on the link can announce _mandos._tcp: 500 services with 50 addresses each
    must not become 25,000 servers to ask."""
    from password_agent import discovery

    class Info:
        port = 4711

        def __init__(self, n: int) -> None:
            self.n = n

        def parsed_scoped_addresses(self) -> list[str]:
            return [f"10.{self.n // 250}.{self.n % 250}.{i}" for i in range(50)]

    class Zeroconf:
        def get_service_info(self, service_type: str, name: str, timeout: int) -> Info:
            return Info(int(name.split(".")[0]))

    class Added:
        name = "Added"

    changes = []
    d = discovery.Discovery(lambda: changes.append(1))
    for n in range(500):
        d._on_service(Zeroconf(), discovery.SERVICE_TYPE, f"{n}.{discovery.SERVICE_TYPE}",
                      Added())
    assert len(d.servers()) <= discovery.MAX_SERVICES * discovery.MAX_ADDRESSES
    assert len(d.servers()) > 0


# --- item 12: no core dumps -------------------------------------------------------------------


@pytest.fixture()
def cores_allowed() -> Iterator[None]:
    """Children start with core dumps allowed, so that only the program itself can forbid them."""
    old = resource.getrlimit(resource.RLIMIT_CORE)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pytest.skip("cannot allow core dumps here (needs root)")
    yield
    resource.setrlimit(resource.RLIMIT_CORE, old)


def core_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return " ".join(line.split()[4:6])
    raise AssertionError("no core limit line")


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    wait_for(cond, timeout, what, interval=0.01)


def as_nobody(argv: list[str]) -> list[str]:
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *argv]


@pytest.fixture()
def nobody_dir() -> Iterator[Path]:
    """A directory user nobody can reach (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="mandos-test-nobody-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def nobody_keys(client_keys: Path, base: Path) -> Path:
    keys = copy_keys(client_keys, base / "keys")
    for p in [keys, *keys.iterdir()]:
        os.chown(p, 65534, 65534)
    return keys


def test_disable_core_dumps_in_a_child() -> None:
    code = ("import ctypes, resource; from mandos_core.hardening import disable_core_dumps; "
            "disable_core_dumps(); print(resource.getrlimit(resource.RLIMIT_CORE), "
            "ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out == "(0, 0) 0\n"


@pytest.mark.usefixtures("cores_allowed")
def test_agent_and_client_are_not_dumpable(nobody_dir: Path, client_keys: Path) -> None:
    """Run as nobody: a non-dumpable process's /proc files belong to root, and it has no
    core limit; the same user can then neither ptrace it nor read its memory."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as another user")
    keys = nobody_keys(client_keys, nobody_dir)
    ask_dir = nobody_dir / "ask"
    ask_dir.mkdir()
    os.chown(ask_dir, 65534, 65534)
    silent = SilentServer()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUNTIME_DIRECTORY": ""}
    progs = {
        "agent": as_nobody([sys.executable, "-m", "password_agent.agent", "--no-zeroconf",
                            "--config", "/dev/null", "--keydir", str(keys), "--ask-dir",
                            str(ask_dir), "--connect", silent.address]),
        "mandos-client": as_nobody([sys.executable, "-m", "password_agent.mandos_client",
                                    "--keydir", str(keys), "--connect", silent.address,
                                    "--timeout", "60"]),
    }
    try:
        for name, argv in progs.items():
            before = len(silent.accepted)
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                def reached(before: int = before) -> bool:
                    return len(silent.accepted) > before

                if name == "agent":
                    with FakeAsker(ask_dir, "cryptsetup:/dev/sda5"):
                        wait_until(reached, name)
                else:
                    wait_until(reached, name)
                assert Path(f"/proc/{proc.pid}/status").stat().st_uid == 0, name
                assert core_limit(proc.pid) == "0 0", name
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        silent.close()


@pytest.mark.usefixtures("cores_allowed")
def test_server_and_tools_have_no_core_limit(tmp_path: Path, client_keys: Path,
                                             client_section: str) -> None:
    with Mandosd(tmp_path / "srv", sections=[client_section]) as srv:
        assert srv.proc is not None
        assert core_limit(srv.proc.pid) == "0 0"
    # the tools stop on a FIFO they open: read their limits while they wait
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    keys = copy_keys(client_keys, tmp_path / "keys")
    tools = {
        "mandos-keygen": [tool("mandos-keygen"), "--dir", str(keys), "--passfile", str(fifo)],
        "luks-passphrase": [tool("luks-passphrase"), "--state-dir", str(tmp_path / "st"),
                            "--crypttab", str(fifo), "status"],
    }
    for name, argv in tools.items():
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_until(functools.partial(fifo_opened_by, proc.pid, fifo), name)
            assert core_limit(proc.pid) == "0 0", name
        finally:
            proc.kill()
            proc.wait()


def fifo_opened_by(pid: int, fifo: Path) -> bool:
    """The process sits in open() of the FIFO (its wchan), or holds it open."""
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(fifo):
                    return True
        return Path(f"/proc/{pid}/wchan").read_text() in ("fifo_open", "wait_for_partner")
    return False


# --- item 14: no gpg-agent, no GNUPGHOME after a signal, an error or a timeout -----------------


def our_gpg_agents(runtime: Path) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
                if os.path.basename(argv[0]) == b"gpg-agent" and any(
                        a.startswith(os.fsencode(runtime)) for a in argv):
                    out.append(int(name))
    return out


def assert_nothing_left(runtime: Path) -> None:
    agents = our_gpg_agents(runtime)
    for pid in agents:  # clean up after a failing test: we own these
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert agents == [], "gpg-agent still running"
    assert list(runtime.iterdir()) == [], "GNUPGHOME left behind"


@pytest.fixture()
def runtime() -> Iterator[Path]:
    """The agent's RUNTIME_DIRECTORY: a short path, as /run/mandos-password-agent is (gpg-agent
    puts its sockets elsewhere when the home's path would exceed a socket name's 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    d.chmod(0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_agent_signalled_while_fetching_leaves_nothing(
        tmp_path: Path, client_keys: Path, runtime: Path, sig: int) -> None:
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    silent = SilentServer()
    try:
        agent = AgentProc(tmp_path, client_keys, [silent.address], ask_dir=ask_dir,
                          env={"RUNTIME_DIRECTORY": str(runtime)}).start()
        with FakeAsker(ask_dir, "cryptsetup:/dev/sda6"):
            wait_until(lambda: bool(silent.accepted) and bool(our_gpg_agents(runtime)),
                       "fetching, with gpg-agent up")
            assert agent.proc is not None
            agent.proc.send_signal(sig)
            assert agent.wait_exit() == 0
    finally:
        silent.close()
    assert_nothing_left(runtime)


@pytest.mark.parametrize("when", ["answered", "exiting", "twice"])
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_agent_once_signalled_right_after_answering_leaves_nothing(
        tmp_path: Path, client_keys: Path, honest: Mandosd, runtime: Path, sig: int,
        when: str) -> None:
    """systemd stops the initrd's agent at switch-root, right after it answered: the signal
    comes as the answer arrives, as the agent starts its clean-up, or twice in a row."""
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    agent = AgentProc(tmp_path, client_keys, [honest.address], ask_dir=ask_dir,
                      args=["--once"], env={"RUNTIME_DIRECTORY": str(runtime)}).start()
    assert agent.proc is not None
    with FakeAsker(ask_dir, "cryptsetup:/dev/sda7") as asker:
        assert asker.answer(30) == (b"+" + PASSWORD, 0)
        with contextlib.suppress(ProcessLookupError):
            if when == "exiting":
                agent.wait_log("--once: the first question is answered, exiting")
            agent.proc.send_signal(sig)
            if when == "twice":
                agent.proc.send_signal(sig)
        code = agent.wait_exit()
    assert code == 0, agent.log()
    assert_nothing_left(runtime)


def test_agent_stopping_on_bad_keys_leaves_nothing(tmp_path: Path, client_keys: Path,
                                                   runtime: Path) -> None:
    keys = copy_keys(client_keys, tmp_path / "keys")
    (keys / "tls-cert.pem").unlink()
    (keys / "tls-privkey.pem").write_text("garbage\n")
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    agent = AgentProc(tmp_path, keys, ["127.0.0.1:9"], ask_dir=ask_dir,
                      env={"RUNTIME_DIRECTORY": str(runtime)}).start(wait_ready=False)
    assert agent.wait_exit() == 3, agent.log()
    assert_nothing_left(runtime)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_mandos_client_signalled_while_fetching_leaves_nothing(
        client_keys: Path, runtime: Path, sig: int) -> None:
    silent = SilentServer()
    env = {**os.environ, "RUNTIME_DIRECTORY": str(runtime)}
    proc = subprocess.Popen([tool("mandos-client"), "--keydir", str(client_keys), "--connect",
                             silent.address, "--timeout", "60"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: bool(silent.accepted) and bool(our_gpg_agents(runtime)),
                   "fetching, with gpg-agent up")
        proc.send_signal(sig)
        assert proc.wait(30) == 128 + sig
    finally:
        proc.kill()
        proc.wait()
        silent.close()
    assert_nothing_left(runtime)


def test_mandos_client_timeout_leaves_nothing(client_keys: Path, runtime: Path) -> None:
    silent = SilentServer()
    try:
        p = fetch(client_keys, silent.address, timeout=1,
                  env={"RUNTIME_DIRECTORY": str(runtime)})
    finally:
        silent.close()
    assert p.returncode == 1, p.stderr
    assert_nothing_left(runtime)
