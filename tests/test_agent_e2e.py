"""The agent against real askers and the real server: systemd-ask-password, systemd-cryptsetup,
mandosd on 127.0.0.1, gpg.  Also dead and silent servers, dying askers, odd ask files.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from password_agent.askfile import monotonic_us
from tests.agentlib import (
    SYSTEMD_ASK_PASSWORD,
    SYSTEMD_CRYPTSETUP,
    AgentProc,
    FakeAsker,
    SilentServer,
    ask,
    dead_address,
    remove_questions,
    unique_prefix,
    wait_for_question,
)
from tests.helpers import PASSWORD, Journald, Mandosd, enroll, free_port, make_keys

needs_asker = pytest.mark.skipif(not os.path.exists(SYSTEMD_ASK_PASSWORD),
                                 reason="systemd-ask-password is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="systemd's askers only accept answers from root")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, client_section: str) -> Iterator[Mandosd]:
    with Mandosd(tmp_path_factory.mktemp("srv"), sections=[client_section]) as srv:
        yield srv


@pytest.fixture()
def prefix() -> Iterator[str]:
    p = unique_prefix()
    yield p
    remove_questions(p)


def assert_no_secret(text: str) -> None:
    assert PASSWORD.decode() not in text
    assert repr(PASSWORD)[2:-1] not in text


# --- the real systemd-ask-password -----------------------------------------------------------


@needs_asker
@needs_root
def test_systemd_ask_password_gets_the_password(tmp_path: Path, client_keys: Path,
                                                server: Mandosd, prefix: str) -> None:
    with AgentProc(tmp_path, client_keys, [server.address], id_prefix=prefix) as agent:
        p = ask(prefix + "x")
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert out == PASSWORD + b"\n"
        log = agent.wait_log("answered question")
        assert f"MANDOS_SERVER={server.address}" in log
        assert "MANDOS_OUTCOME=answered" in log
        assert agent.running()
        assert agent.stop() == 0  # SIGTERM: a clean exit
    assert_no_secret(agent.log())
    assert "sent secret to client1" in server.log()


def test_ipv6_server(tmp_path: Path, client_keys: Path, client_section: str) -> None:
    port = free_port(socket.AF_INET6)
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    with Mandosd(tmp_path / "srv", sections=[client_section], listen=[f"[::1]:{port}"]), \
            AgentProc(tmp_path, client_keys, [f"[::1]:{port}"], ask_dir=ask_dir), \
            FakeAsker(ask_dir, "cryptsetup:/dev/v6") as asker:
        assert asker.answer(15) == (b"+" + PASSWORD, 0)


@needs_asker
@needs_root
def test_several_questions_at_once(tmp_path: Path, client_keys: Path, server: Mandosd,
                                   prefix: str) -> None:
    with AgentProc(tmp_path, client_keys, [server.address], id_prefix=prefix) as agent:
        askers = [ask(prefix + f"vol{i}") for i in range(4)]
        for p in askers:
            out, err = p.communicate(timeout=30)
            assert (p.returncode, out) == (0, PASSWORD + b"\n"), err
        agent.wait_log("answered question", count=4)


@needs_asker
@needs_root
def test_question_present_at_start_and_exit_when_idle(tmp_path: Path, client_keys: Path,
                                                      server: Mandosd, prefix: str) -> None:
    p = ask(prefix + "early")
    wait_for_question(prefix)
    agent = AgentProc(tmp_path, client_keys, [server.address], id_prefix=prefix,
                      args=["--exit-when-idle"]).start(wait_ready=False)
    try:
        out, _ = p.communicate(timeout=30)
        assert out == PASSWORD + b"\n"
        assert agent.wait_exit() == 0
    finally:
        agent.stop()
    assert "answered question" in agent.log()


def test_exit_when_idle_without_questions_is_immediate(tmp_path: Path, client_keys: Path) -> None:
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    with FakeAsker(ask_dir, "home:alice"):  # not ours: nothing to answer
        agent = AgentProc(tmp_path, tmp_path / "no-keys-needed", [dead_address()],
                          ask_dir=ask_dir, args=["--exit-when-idle"]).start(wait_ready=False)
        assert agent.wait_exit(10) == 0


@needs_asker
@needs_root
def test_once_exits_after_the_first_answer(tmp_path: Path, client_keys: Path, server: Mandosd,
                                           prefix: str) -> None:
    agent = AgentProc(tmp_path, client_keys, [server.address], id_prefix=prefix,
                      args=["--once"]).start()
    try:
        out, _ = ask(prefix + "x").communicate(timeout=30)
        assert out == PASSWORD + b"\n"
        assert agent.wait_exit() == 0
    finally:
        agent.stop()


# --- the real systemd-cryptsetup on a LUKS2 image ----------------------------------------------

_READ_CACHED_KEY = r"""
import ctypes, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
p = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, capture_output=True,
                   env={"SYSTEMD_LOG_LEVEL": "debug", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
sys.stderr.buffer.write(p.stderr)
# keyctl(KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, "user", "cryptsetup", 0)
kid = libc.syscall(250, 10, -4, b"user", b"cryptsetup", 0)
if kid < 0:
    sys.exit(3)
buf = ctypes.create_string_buffer(4096)
n = libc.syscall(250, 11, kid, buf, 4096)  # KEYCTL_READ
sys.stdout.buffer.write(buf.raw[:n])
"""


def luks_image(path: Path, passphrase: bytes) -> Path:
    with path.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", "-", str(path)],
                   input=passphrase, check=True, capture_output=True)
    return path


def header_accepts(image: Path, passphrase: bytes) -> bool:
    p = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", "-",
                        str(image)], input=passphrase, capture_output=True)
    return p.returncode == 0


def cryptsetup_attach(image: Path) -> tuple[bytes, str]:
    """Run the real systemd-cryptsetup on *image*; return the passphrase it got and its log.

    It runs in a user namespace of its own, so that the passphrase it caches in the
    kernel keyring (user keyring, "cryptsetup") is private to the test and can be read
    back: without device-mapper activation fails, but the key it received is there.
    """
    p = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", _READ_CACHED_KEY,
         SYSTEMD_CRYPTSETUP, "attach", f"mt{os.getpid()}", str(image), "-", "luks,tries=1"],
        capture_output=True, timeout=60)
    return p.stdout, p.stderr.decode(errors="replace")


def _cryptsetup_usable() -> str | None:
    if not os.path.exists(SYSTEMD_CRYPTSETUP):
        return "systemd-cryptsetup is not installed"
    if not shutil.which("cryptsetup") or not shutil.which("unshare"):
        return "cryptsetup or unshare missing"
    return None


@needs_root
@pytest.mark.skipif(_cryptsetup_usable() is not None, reason=str(_cryptsetup_usable()))
@pytest.mark.parametrize("enrolled", ["right", "wrong"])
def test_systemd_cryptsetup_gets_the_luks_passphrase(tmp_path: Path, enrolled: str) -> None:
    if subprocess.run(["unshare", "--user", "--map-root-user", "true"]).returncode != 0:
        pytest.fail("could not make a user namespace (an environment failure, not a skip)")
    keys = make_keys(tmp_path / "keys", "client1")
    image = luks_image(tmp_path / "vol.img", PASSWORD)
    served = PASSWORD if enrolled == "right" else b"not the passphrase"
    section = enroll(keys, served, "client1", host="127.0.0.1")
    with Mandosd(tmp_path / "srv", sections=[section]) as srv, \
            AgentProc(tmp_path, keys, [srv.address], id_prefix=f"cryptsetup:{image}") as agent:
        got, log = cryptsetup_attach(image)
        agent.wait_log("answered question")
    assert "using passphrase" in log, log  # it asked and got an answer
    assert got == served
    assert header_accepts(image, got) == (enrolled == "right")
    assert_no_secret(agent.log())


# --- servers that fail ----------------------------------------------------------------------------


@needs_asker
@needs_root
def test_dead_and_silent_servers_do_not_hold_it_up(tmp_path: Path, client_keys: Path,
                                                   server: Mandosd, prefix: str) -> None:
    silent = SilentServer()
    try:
        servers = [dead_address(), silent.address, server.address]
        with AgentProc(tmp_path, client_keys, servers, id_prefix=prefix,
                       args=["--timeout", "60", "--connect-timeout", "60"]) as agent:
            # the silent server holds its connection for 60 s, longer than this wait:
            # an answer at all means nobody waited for it
            out, _ = ask(prefix + "x").communicate(timeout=30)
            assert out == PASSWORD + b"\n"
            log = agent.wait_log("answered question")
        assert f"MANDOS_SERVER={server.address}" in log.split("answered question")[1]
        assert silent.accepted, "the silent server was never tried"
        assert "timed out" not in log.split("answered question")[0]
        assert "Connection refused" in log
    finally:
        silent.close()


@needs_asker
@needs_root
def test_silent_server_alone_is_retried_within_the_timeout(tmp_path: Path, client_keys: Path,
                                                           prefix: str) -> None:
    silent = SilentServer()
    try:
        with AgentProc(tmp_path, client_keys, [silent.address], id_prefix=prefix,
                       args=["--timeout", "0.5", "--retry-max", "0.5"]) as agent:
            p = ask(prefix + "x", timeout=30)
            agent.wait_log("timed out waiting for the secret (try 2,", timeout=10)
            p.kill()
            p.wait()
    finally:
        silent.close()
    assert len(silent.accepted) >= 2


@needs_asker
@needs_root
def test_question_whose_asker_dies_is_dropped(tmp_path: Path, client_keys: Path,
                                              prefix: str) -> None:
    agent = AgentProc(tmp_path, client_keys, [dead_address()], id_prefix=prefix,
                      args=["--exit-when-idle"])
    p = ask(prefix + "x")
    wait_for_question(prefix)
    agent.start(wait_ready=False)
    try:
        agent.wait_log("Connection refused")
        p.send_signal(signal.SIGKILL)  # leaves its ask file behind; not reaped: a zombie
        # dropped for the asker's death (its NotAfter, 20 s away, is not what did it)
        log = agent.wait_log("dropped question", timeout=15)
        assert f"asking process {p.pid} exited" in log
        assert agent.wait_exit(5) == 0  # nothing left it could answer
    finally:
        agent.stop()
        p.wait()


def test_withdrawn_question_stops_the_work(tmp_path: Path, client_keys: Path) -> None:
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    agent = AgentProc(tmp_path, client_keys, [dead_address()], ask_dir=ask_dir).start()
    try:
        with FakeAsker(ask_dir, "cryptsetup:/dev/a") as asker:
            agent.wait_log("Connection refused")
            asker.withdraw()
            agent.wait_log("withdrawn or answered elsewhere", timeout=5)
        assert agent.running()
    finally:
        agent.stop()


def test_not_after(tmp_path: Path, client_keys: Path, server: Mandosd) -> None:
    """A deadline already past is skipped; a deadline that passes while waiting drops it."""
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    dead = dead_address()
    agent = AgentProc(tmp_path, client_keys, [server.address], ask_dir=ask_dir,
                      args=["--retry-max", "0.25"])
    with agent, FakeAsker(ask_dir, "cryptsetup:/dev/past",
                          not_after=monotonic_us() - 1_000_000) as past:
        agent.wait_log("NotAfter has passed")
        assert past.answer(0.5) is None
    agent2 = AgentProc(tmp_path, client_keys, [dead], ask_dir=ask_dir)
    with agent2, FakeAsker(ask_dir, "cryptsetup:/dev/soon",
                           not_after=monotonic_us() + 1_500_000):
        agent2.wait_log("Connection refused")
        log = agent2.wait_log("dropped question", timeout=15)
        assert "NotAfter has passed" in log


# --- questions it must leave alone, files it must survive ---------------------------------------------


def test_only_cryptsetup_questions_by_default(tmp_path: Path, client_keys: Path,
                                              server: Mandosd) -> None:
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    with AgentProc(tmp_path, client_keys, [server.address], ask_dir=ask_dir) as agent, \
            FakeAsker(ask_dir, "home:alice") as other, \
            FakeAsker(ask_dir, "") as anonymous:
        with FakeAsker(ask_dir, "cryptsetup:/dev/sda2") as ours:
            got = ours.answer(15)
            assert got == (b"+" + PASSWORD, 0)  # from root, as the askers require
        # the others were seen first and left alone
        assert other.answer(0.3) is None and anonymous.answer(0) is None
        assert "home:alice" in agent.log()
    assert_no_secret(agent.log())


def test_id_prefix_empty_answers_everything(tmp_path: Path, client_keys: Path,
                                            server: Mandosd) -> None:
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    with AgentProc(tmp_path, client_keys, [server.address], ask_dir=ask_dir,
                   id_prefix=""), FakeAsker(ask_dir, "home:alice") as other:
        assert other.answer(15) == (b"+" + PASSWORD, 0)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_bytes(data)
    os.rename(tmp, path)


def test_malformed_ask_files_are_skipped(tmp_path: Path, client_keys: Path,
                                         server: Mandosd) -> None:
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    present = ask_dir / "ask.present-at-start"
    present.write_bytes(b"")
    # (inotify reports these two only as IN_CREATE, which askers never do: found by the scan)
    os.mkfifo(ask_dir / "ask.fifo")
    (ask_dir / "ask.symlink").symlink_to("/etc/passwd")
    with AgentProc(tmp_path, client_keys, [server.address], ask_dir=ask_dir) as agent:
        _write(ask_dir / "ask.empty", b"")
        _write(ask_dir / "ask.binary", os.urandom(512) + b"\0")
        huge = ask_dir / "ask.huge"
        with huge.open("wb") as f:
            f.truncate(100 * 1024 * 1024)
        _write(ask_dir / "ask.nosocket", b"[Ask]\nPID=1\nId=cryptsetup:/dev/x\n")
        _write(ask_dir / "ask.badpid", b"[Ask]\nPID=banana\nSocket=/nonexistent\n"
                                       b"Id=cryptsetup:/dev/x\n")
        _write(ask_dir / "ask.deadpid", b"[Ask]\nPID=4194304\nSocket=/nonexistent\n"
                                        b"Id=cryptsetup:/dev/x\n")
        _write(ask_dir / "ask.nosocketfile", b"[Ask]\nSocket=/nonexistent/sck\n"
                                             b"Id=cryptsetup:/dev/y\n")
        with FakeAsker(ask_dir, "cryptsetup:/dev/good") as good:
            assert good.answer(15) == (b"+" + PASSWORD, 0)
        log = agent.wait_log("asker's socket is gone")  # the one with Socket=/nonexistent/sck
        assert agent.running()
        for name, why in [("present-at-start", "empty"), ("empty", "empty"),
                          ("binary", "NUL"), ("huge", "larger than"),
                          ("nosocket", "no Socket"), ("badpid", "PID=banana"),
                          ("fifo", "not a regular file"), ("symlink", "symbolic link")]:
            lines = [ln for ln in log.splitlines() if f"ask.{name}:" in ln]
            assert len(lines) == 1 and why in lines[0], (name, log)
        assert "process 4194304 is gone" in log
        assert "Traceback" not in log


def test_answer_comes_from_root(tmp_path: Path, client_keys: Path, server: Mandosd) -> None:
    """Not root: the agent says so, and the asker sees who sent it (what systemd checks)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the agent as another user")
    base = Path(tempfile.mkdtemp(prefix="mandos-agent-test-"))  # outside 0700 pytest dirs
    try:
        os.chmod(base, 0o755)
        keys = base / "keys"
        shutil.copytree(client_keys, keys)
        ask_dir = base / "ask"
        ask_dir.mkdir()
        for p in [keys, ask_dir, *keys.iterdir()]:
            os.chown(p, 65534, 65534)
        agent = AgentProc(tmp_path, keys, [server.address], ask_dir=ask_dir)
        agent.argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                      *agent.argv]
        agent.env["HOME"] = str(base)
        agent.env["XDG_RUNTIME_DIR"] = str(base)
        with agent, FakeAsker(ask_dir, "cryptsetup:/dev/a") as asker:
            os.chown(asker.sock_path, 65534, 65534)
            got = asker.answer(15)
            assert got is not None and got[1] == 65534
            log = agent.wait_log("answered question")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert "not running as root" in log
    assert "the asker will ignore it" in log


def test_no_traceback_on_bad_keys(tmp_path: Path) -> None:
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    agent = AgentProc(tmp_path, tmp_path / "missing", [dead_address()], ask_dir=ask_dir)
    agent.start(wait_ready=False)
    assert agent.wait_exit() == 3
    assert "Traceback" not in agent.log()
    assert "tls-" in agent.log() or "missing" in agent.log()


def test_structured_journal_fields(tmp_path: Path, client_keys: Path, server: Mandosd) -> None:
    """Under journald: one entry per outcome, with the question, server and timing as fields
    (read back from a real journald with journalctl)."""
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    with Journald(tmp_path / "journal") as journal:
        agent = AgentProc(tmp_path, client_keys, [dead_address(), server.address],
                          ask_dir=ask_dir, env=journal.env)
        agent.argv.remove("--debug")
        agent.start(wait_ready=False)
        assert server.proc is not None
        # the live server held (SIGSTOP: the kernel still accepts its connection) until
        # the dead one's failure is in the journal: once a question is answered, a late
        # failure is only a debug line, and which fetch ends first is up to the scheduler
        server.proc.send_signal(signal.SIGSTOP)
        try:
            with FakeAsker(ask_dir, "cryptsetup:/dev/journal") as asker:
                journal.wait_entries("MANDOS_OUTCOME=server-failed", timeout=60)
                server.proc.send_signal(signal.SIGCONT)
                assert asker.answer(60) == (b"+" + PASSWORD, 0)
                journal.wait_entries("MANDOS_OUTCOME=answered")
        finally:
            server.proc.send_signal(signal.SIGCONT)
            agent.stop()
        entries = journal.entries("SYSLOG_IDENTIFIER=mandos-password-agent")
        raw = journal.export()
    answered = [e for e in entries if e.get("MANDOS_OUTCOME") == "answered"]
    assert len(answered) == 1
    e = answered[0]
    assert e["MESSAGE_ID"] == "3f0a1c2e8b7d4f5a9c6e2b1d0a9f8e7d"
    assert e["PRIORITY"] == "6"
    assert e["MANDOS_QUESTION_ID"] == "cryptsetup:/dev/journal"
    assert e["MANDOS_SERVER"] == server.address
    assert int(e["MANDOS_ELAPSED_MS"]) >= int(e["MANDOS_FETCH_MS"]) >= 0
    assert e["MANDOS_ASK_FILE"].startswith(str(ask_dir))
    failed = [e for e in entries if e.get("MANDOS_OUTCOME") == "server-failed"]
    assert failed and failed[0]["MANDOS_REASON"] == "Connection refused"
    assert_no_secret(repr(entries))
    assert PASSWORD not in raw


def test_unusable_openpgp_key_stops_the_agent(tmp_path: Path, client_keys: Path) -> None:
    keys = tmp_path / "keys"
    shutil.copytree(client_keys, keys)
    (keys / "seckey.txt").write_text("-----BEGIN PGP PRIVATE KEY BLOCK-----\ngarbage\n")
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    agent = AgentProc(tmp_path, keys, [dead_address()], ask_dir=ask_dir).start(wait_ready=False)
    assert agent.wait_exit() == 3
    assert "cannot import the OpenPGP key" in agent.log()
    assert "Traceback" not in agent.log()


def test_refused_answer_is_not_repeated(tmp_path: Path, client_keys: Path,
                                        server: Mandosd) -> None:
    """The same asker asking the same again means it refused our secret (systemd-cryptsetup's
    next try): that secret is never sent to it again, and other askers are answered."""
    ask_dir = tmp_path / "ask"
    ask_dir.mkdir()
    with AgentProc(tmp_path, client_keys, [server.address], ask_dir=ask_dir) as agent:
        with FakeAsker(ask_dir, "cryptsetup:/dev/sda2") as first:
            assert first.answer(15) == (b"+" + PASSWORD, 0)
        with FakeAsker(ask_dir, "cryptsetup:/dev/sda2") as again:
            agent.wait_log("asks again after our answer")
            assert again.answer(0.3) is None
        sleeper = subprocess.Popen(["sleep", "30"])
        try:
            with FakeAsker(ask_dir, "cryptsetup:/dev/sda2", pid=sleeper.pid) as other:
                assert other.answer(15) == (b"+" + PASSWORD, 0)
        finally:
            sleeper.kill()
            sleeper.wait()
