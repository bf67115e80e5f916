"""Test helpers for the password agent: the agent process, real and hand-made askers.

Tests that use the real ``/run/systemd/ask-password`` (systemd's askers know no
other directory) give every question an Id under a prefix of their own and run
the agent with ``--id-prefix`` set to it, so they never touch anyone else's
questions.  Tests of odd ask files use a private ``--ask-dir`` and
:class:`FakeAsker`, which speaks the same protocol as systemd's askers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from tests.helpers import ROOT, WaitTimeout, free_port, wait_for

REAL_ASK_DIR = Path("/run/systemd/ask-password")
SYSTEMD_ASK_PASSWORD = "/usr/bin/systemd-ask-password"
SYSTEMD_CRYPTSETUP = "/lib/systemd/systemd-cryptsetup"


def unique_prefix() -> str:
    return f"cryptsetup:/dev/mandos-test-{uuid.uuid4().hex[:10]}/"


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MANDOS_AGENT_", "MANDOS_JOURNAL")) and k not in
           ("JOURNAL_STREAM", "NOTIFY_SOCKET", "SYSTEMD_LOG_LEVEL")}
    env.update(extra or {})
    return env


class AgentProc:
    """``python -m password_agent.agent`` as a subprocess, logging to a file."""

    def __init__(self, workdir: Path, keydir: Path, servers: list[str], *,
                 id_prefix: str | None = None, ask_dir: Path | None = None,
                 args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.logfile = workdir / f"agent-{uuid.uuid4().hex[:6]}.log"
        self.argv = [sys.executable, "-m", "password_agent.agent", "--debug", "--no-zeroconf",
                     "--config", "/dev/null", "--keydir", str(keydir)]
        for s in servers:
            self.argv += ["--connect", s]
        if id_prefix is not None:
            self.argv += ["--id-prefix", id_prefix]
        if ask_dir is not None:
            self.argv += ["--ask-dir", str(ask_dir)]
        self.argv += args or []
        self.env = clean_env(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> AgentProc:
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env=self.env, cwd=ROOT)
        if wait_ready:
            self.wait_log("watching ")
        return self

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 15, count: int = 1) -> str:
        """The log once *text* is in it *count* times; fails at once if the agent exits."""
        def found() -> str | None:
            exited = self.proc is not None and self.proc.poll() is not None
            log = self.log()
            if log.count(text) >= count:
                return log
            if exited:
                raise AssertionError(f"agent exited {self.proc.returncode} before "  # type: ignore[union-attr]
                                     f"{text!r}:\n{log}")
            return None

        try:
            return wait_for(found, timeout, f"{text!r} in the agent's log")
        except WaitTimeout:
            raise AssertionError(f"{text!r} not in the agent's log after {timeout} s:\n"
                                 f"{self.log()}") from None

    def wait_exit(self, timeout: float = 15) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent still running after {timeout} s:\n{self.log()}") from None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> AgentProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ask(question_id: str, timeout: int = 20) -> subprocess.Popen[bytes]:
    """The real ``systemd-ask-password``, asking through agents only."""
    return subprocess.Popen(
        [SYSTEMD_ASK_PASSWORD, "--no-tty", f"--id={question_id}", f"--timeout={timeout}",
         "Passphrase:"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)


def questions_with_prefix(prefix: str, ask_dir: Path = REAL_ASK_DIR) -> list[Path]:
    out = []
    for p in ask_dir.glob("ask.*"):
        with contextlib.suppress(OSError):
            if f"\nId={prefix}" in p.read_text(errors="replace"):
                out.append(p)
    return out


def remove_questions(prefix: str, ask_dir: Path = REAL_ASK_DIR) -> None:
    """Remove the files of our own killed askers (and only those)."""
    for p in questions_with_prefix(prefix, ask_dir):
        with contextlib.suppress(OSError):
            for line in p.read_text().splitlines():
                if line.startswith("Socket="):
                    with contextlib.suppress(OSError):
                        os.unlink(line[7:])
            p.unlink()


def wait_for_question(prefix: str, timeout: float = 15,
                      ask_dir: Path = REAL_ASK_DIR) -> Path:
    found = wait_for(lambda: questions_with_prefix(prefix, ask_dir), timeout,
                     f"a question with Id={prefix}...", interval=0.01)
    return found[0]


class FakeAsker:
    """An asker speaking systemd's protocol: a SO_PASSCRED datagram socket and an ask file."""

    def __init__(self, ask_dir: Path, question_id: str, *, not_after: int = 0,
                 pid: int | None = None, extra: str = "") -> None:
        token = uuid.uuid4().hex[:12]
        self.sock_path = ask_dir / f"sck.{token}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.path = ask_dir / f"ask.{token}"
        text = (f"[Ask]\nPID={pid or os.getpid()}\nSocket={self.sock_path}\nAcceptCached=0\n"
                f"Echo=0\nNotAfter={not_after}\nSilent=0\nMessage=Test\nId={question_id}\n"
                + extra)
        tmp = ask_dir / f".tmp.{token}"
        tmp.write_text(text)
        #: when the question appeared (CLOCK_MONOTONIC), for timings
        self.published = time.monotonic()
        os.rename(tmp, self.path)

    def answer(self, timeout: float) -> tuple[bytes, int] | None:
        """The datagram received and the sender's uid, or None on timeout."""
        self.sock.settimeout(timeout)
        try:
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except (TimeoutError, BlockingIOError):
            return None
        uid = -1
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                uid = int.from_bytes(payload[4:8], sys.byteorder)
        return data, uid

    def withdraw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def close(self) -> None:
        self.withdraw()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()

    def __enter__(self) -> FakeAsker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never says a word (clevis's nemesis)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        # shutdown wakes the accept() blocked in the thread
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.accepted:
            c.close()


def dead_address() -> str:
    """A loopback port with nothing listening (connections are refused)."""
    return f"127.0.0.1:{free_port()}"
