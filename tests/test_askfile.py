"""Unit tests: ask files parse into a Question or raise AskFileError, never anything else."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mandos_core.inotify import IN_CLOSE_WRITE, IN_DELETE, IN_MOVED_TO, Inotify
from password_agent.askfile import (
    MAX_ASK_FILE_SIZE,
    AskFileError,
    Question,
    is_ask_name,
    monotonic_us,
    parse_ask,
    pid_alive,
    read_ask,
    skip_reason,
)

# Exactly what systemd 252's systemd-ask-password writes.
REAL = b"""[Ask]
PID=23618
Socket=/run/systemd/ask-password/sck.f57494d78016d45a
AcceptCached=0
Echo=0
NotAfter=732017563
Silent=0
Message=Passphrase:
Id=cryptsetup:/dev/x
"""


def test_real_file_parses() -> None:
    q = parse_ask(REAL, "/run/systemd/ask-password/ask.k2SuM9")
    assert q == Question(
        path="/run/systemd/ask-password/ask.k2SuM9",
        socket="/run/systemd/ask-password/sck.f57494d78016d45a",
        pid=23618, not_after=732017563, accept_cached=False, echo=False, silent=False,
        message="Passphrase:", icon="", id="cryptsetup:/dev/x",
    )
    assert q.name == "ask.k2SuM9"


def test_all_fields_and_unknown_keys() -> None:
    data = (b"# comment\n[Ask]\nPID=1\nSocket=/x/sck.1\nAcceptCached=yes\nEcho=true\n"
            b"Silent=on\nNotAfter=0\nIcon=drive-harddisk\nMessage=Disk \\\"root\\\"\\x21\n"
            b"Id=cryptsetup:/dev/sda2\nNewKeyFromTheFuture=1\n[Other]\nPID=bogus\n")
    q = parse_ask(data, "ask.a")
    assert (q.pid, q.accept_cached, q.echo, q.silent) == (1, True, True, True)
    assert q.icon == "drive-harddisk"
    assert q.message == 'Disk "root"!'
    assert q.not_after == 0 and not q.expired(10**15)


def test_pid_is_optional() -> None:
    q = parse_ask(b"[Ask]\nSocket=/x/sck\n", "ask.b")
    assert q.pid is None and q.id == ""


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\n  \n", "empty"),
        (b"\x00\x01\x02binary\xff", "NUL"),
        (b"[Ask]\nSocket=/x\nMessage=\xff\xfe\n", "UTF-8"),
        (b"[Ask]\nPID=12\nId=cryptsetup:/dev/x\n", "no Socket"),
        (b"[Ask]\nSocket=relative/sck\n", "absolute"),
        (b"[Ask]\nSocket=/x\nPID=abc\n", "PID=abc"),
        (b"[Ask]\nSocket=/x\nPID=-5\n", "PID=-5"),
        (b"[Ask]\nSocket=/x\nPID=0\n", "out of range"),
        (b"[Ask]\nSocket=/x\nPID=99999999999\n", "out of range"),
        (b"[Ask]\nSocket=/x\nNotAfter=soon\n", "NotAfter"),
        (b"[Ask]\nSocket=/x\nEcho=maybe\n", "Echo=maybe"),
        (b"Socket=/x\n", "outside"),
        (b"[Ask\nSocket=/x\n", "section header"),
        (b"[Ask]\nthis is not an assignment\n", "KEY=VALUE"),
        (b"[Other]\nSocket=/x\n", r"no \[Ask\]"),
        (b"[Ask]\nSocket=/x\n" + b"#" * MAX_ASK_FILE_SIZE, "larger"),
    ],
)
def test_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(AskFileError, match=reason):
        parse_ask(data, "ask.bad")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        q = parse_ask(data, "ask.fuzz")
    except AskFileError:
        return
    assert q.socket.startswith("/")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300).filter(lambda s: "\n" not in s and "\r" not in s))
def test_message_roundtrip_ignores_junk(message: str) -> None:
    data = f"[Ask]\nSocket=/s\nMessage={message}\n".encode()
    try:
        q = parse_ask(data, "ask.m")
    except AskFileError:
        return
    assert isinstance(q.message, str)


def test_read_ask_limits(tmp_path: Path) -> None:
    ok = tmp_path / "ask.ok"
    ok.write_bytes(REAL)
    assert read_ask(str(ok)).pid == 23618
    huge = tmp_path / "ask.huge"
    with huge.open("wb") as f:
        f.truncate(50 * 1024 * 1024)
    with pytest.raises(AskFileError, match="larger"):
        read_ask(str(huge))
    fifo = tmp_path / "ask.fifo"
    os.mkfifo(fifo)
    with pytest.raises(AskFileError, match="regular"):
        read_ask(str(fifo))  # must not block
    link = tmp_path / "ask.link"
    link.symlink_to(ok)
    with pytest.raises(AskFileError, match="symbolic"):
        read_ask(str(link))
    with pytest.raises(FileNotFoundError):
        read_ask(str(tmp_path / "ask.gone"))


def test_names() -> None:
    assert is_ask_name("ask.k2SuM9")
    assert not is_ask_name("sck.f5749")
    assert not is_ask_name("ask.")
    assert not is_ask_name(".ask.x")


def test_skip_reason() -> None:
    q = Question(path="ask.1", socket="/s", pid=10, not_after=1_000_000, id="cryptsetup:/dev/a")
    pre = ("cryptsetup:",)
    assert skip_reason(q, now_us=999_999, id_prefixes=pre, alive=lambda p: True) is None
    assert "NotAfter" in (skip_reason(q, now_us=1_000_001, id_prefixes=pre,
                                      alive=lambda p: True) or "")
    assert "gone" in (skip_reason(q, now_us=0, id_prefixes=pre, alive=lambda p: False) or "")
    other = Question(path="ask.2", socket="/s", id="home:alice")
    assert "does not start with" in (skip_reason(other, now_us=0, id_prefixes=pre) or "")
    assert skip_reason(other, now_us=0, id_prefixes=()) is None
    assert skip_reason(other, now_us=0, id_prefixes=("cryptsetup:", "home:")) is None


def test_pid_alive_and_zombies() -> None:
    assert pid_alive(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    # wait for it to exit, without reaping it: a zombie, which counts as gone
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    assert not pid_alive(p.pid)
    p.wait()
    assert not pid_alive(p.pid)


def test_monotonic_matches_clock() -> None:
    before = time.monotonic_ns() // 1000
    now = monotonic_us()
    after = time.monotonic_ns() // 1000
    assert before <= now <= after  # the same clock, whatever the machine's load


def test_inotify_sees_rename_and_delete(tmp_path: Path) -> None:
    with Inotify() as ino:
        ino.add_watch(str(tmp_path), IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE)
        assert ino.read() == []
        (tmp_path / "tmp.x").write_bytes(REAL)
        os.rename(tmp_path / "tmp.x", tmp_path / "ask.x")
        os.unlink(tmp_path / "ask.x")
        events = ino.read()
        kinds = [(e.name, e.mask & (IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE)) for e in events]
        assert kinds == [("tmp.x", IN_CLOSE_WRITE), ("ask.x", IN_MOVED_TO), ("ask.x", IN_DELETE)]
