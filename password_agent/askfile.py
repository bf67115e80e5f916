"""systemd's ask-password questions: ``ask.*`` files parsed into a :class:`Question`.

An asker (``systemd-ask-password``, ``systemd-cryptsetup``) writes a file like::

    [Ask]
    PID=1234
    Socket=/run/systemd/ask-password/sck.f57494d78016d45a
    AcceptCached=0
    Echo=0
    NotAfter=732017563
    Silent=0
    Message=Please enter passphrase for disk root:
    Id=cryptsetup:/dev/sda2

into ``/run/systemd/ask-password`` and waits for one datagram on ``Socket=``:
``+password`` answers, ``-`` cancels.  ``NotAfter`` is CLOCK_MONOTONIC in
microseconds, 0 meaning "no deadline".

Parsing either returns a complete, frozen :class:`Question` or raises
:class:`AskFileError`; nothing half-parsed leaks out.  Whether to *answer* a
question is the pure function :func:`skip_reason`, given the time and a
liveness check, so it is testable without processes or clocks.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Real ask files are a few hundred bytes; anything larger is not one.
MAX_ASK_FILE_SIZE = 64 * 1024
#: Only files with this prefix are questions (``sck.*`` are the askers' sockets).
ASK_PREFIX = "ask."
#: The ask files' only section.
SECTION = "Ask"

_TRUE = frozenset({"1", "yes", "y", "true", "t", "on"})
_FALSE = frozenset({"0", "no", "n", "false", "f", "off"})


class AskFileError(ValueError):
    """An ask file that is not a valid question (the reason is the message)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class Question:
    """One pending question, as its ask file states it."""

    #: Path of the ``ask.*`` file (the question's identity while it exists).
    path: str
    #: The asker's AF_UNIX datagram socket, where the answer goes.
    socket: str
    #: The asking process, or None when the file names none.
    pid: int | None = None
    #: Deadline in CLOCK_MONOTONIC microseconds; 0 means none.
    not_after: int = 0
    accept_cached: bool = False
    echo: bool = False
    silent: bool = False
    message: str = ""
    icon: str = ""
    #: What is being asked for, e.g. ``cryptsetup:/dev/sda2``; "" when absent.
    id: str = ""

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def expired(self, now_us: int) -> bool:
        return self.not_after != 0 and now_us > self.not_after

    def seconds_left(self, now_us: int) -> float | None:
        """Seconds until NotAfter (may be negative), or None without a deadline."""
        if self.not_after == 0:
            return None
        return (self.not_after - now_us) / 1e6


def is_ask_name(name: str) -> bool:
    return name.startswith(ASK_PREFIX) and len(name) > len(ASK_PREFIX) and "/" not in name


def monotonic_us() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock of ``NotAfter=``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\", '"': '"', "'": "'", "s": " "}
_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{2}|[0-7]{3}|.)", re.DOTALL)


def _unescape(text: str) -> str:
    """Undo systemd's ``cescape()`` on ``Message=`` (unknown escapes stay as written)."""
    if "\\" not in text:
        return text

    def one(m: re.Match[str]) -> str:
        s = m.group(1)
        if s[0] == "x" and len(s) == 3:
            return chr(int(s[1:], 16))
        if len(s) == 3 and s.isdigit():
            return chr(int(s, 8))
        return _ESCAPES.get(s, m.group(0))

    return _ESCAPE_RE.sub(one, text)


def _boolean(source: str, key: str, value: str) -> bool:
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise AskFileError(source, f"{key}={value}: not a boolean")


def _integer(source: str, key: str, value: str, *, minimum: int) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 20:
        raise AskFileError(source, f"{key}={value[:40]}: not a number")
    n = int(value)
    if n < minimum or n >= 2**64:
        raise AskFileError(source, f"{key}={value}: out of range")
    return n


def parse_ask(data: bytes, source: str) -> Question:
    """Parse the bytes of an ask file named *source* into a :class:`Question`.

    Unknown keys and sections are ignored (newer systemd adds some); a
    missing ``Socket=``, a bad number or boolean, binary data or an
    oversized file raise :class:`AskFileError`.
    """
    if len(data) > MAX_ASK_FILE_SIZE:
        raise AskFileError(source, f"larger than {MAX_ASK_FILE_SIZE} bytes")
    if not data.strip():
        raise AskFileError(source, "empty file")
    if b"\0" in data:
        raise AskFileError(source, "binary data (NUL byte)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AskFileError(source, "not UTF-8 text") from None

    values: dict[str, str] = {}
    section: str | None = None
    seen_section = False
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise AskFileError(source, f"line {lineno}: malformed section header")
            section = line[1:-1].strip()
            seen_section = seen_section or section == SECTION
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise AskFileError(source, f"line {lineno}: expected KEY=VALUE")
        if section is None:
            raise AskFileError(source, f"line {lineno}: assignment outside of a section")
        if section != SECTION:
            continue
        values[key.strip()] = value.strip()
    if not seen_section:
        raise AskFileError(source, f"no [{SECTION}] section")

    sock = values.get("Socket", "")
    if not sock:
        raise AskFileError(source, "no Socket=")
    if not sock.startswith("/"):
        raise AskFileError(source, f"Socket={sock[:80]}: not an absolute path")
    pid_s = values.get("PID", "")
    pid = _integer(source, "PID", pid_s, minimum=1) if pid_s else None
    if pid is not None and pid >= 2**22 + 1:  # above the kernel's PID_MAX_LIMIT
        raise AskFileError(source, f"PID={pid}: out of range")
    na = values.get("NotAfter", "")
    return Question(
        path=source,
        socket=sock,
        pid=pid,
        not_after=_integer(source, "NotAfter", na, minimum=0) if na else 0,
        accept_cached=_boolean(source, "AcceptCached", values.get("AcceptCached", "0")),
        echo=_boolean(source, "Echo", values.get("Echo", "0")),
        silent=_boolean(source, "Silent", values.get("Silent", "0")),
        message=_unescape(values.get("Message", "")),
        icon=values.get("Icon", ""),
        id=values.get("Id", ""),
    )


def read_ask(path: str) -> Question:
    """Read and parse the ask file at *path* (a regular file, bounded in size).

    :class:`FileNotFoundError` means the question is already gone; every
    other problem is an :class:`AskFileError`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AskFileError(path, "is a symbolic link") from None
        raise AskFileError(path, e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AskFileError(path, "not a regular file")
        if st.st_size > MAX_ASK_FILE_SIZE:
            raise AskFileError(path, f"larger than {MAX_ASK_FILE_SIZE} bytes")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_ASK_FILE_SIZE:
            chunk = os.read(fd, MAX_ASK_FILE_SIZE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise AskFileError(path, e.strerror or str(e)) from None
    finally:
        os.close(fd)
    return parse_ask(b"".join(chunks), path)


def pid_alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie counts as gone, as in systemd)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read(512)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    # "pid (comm) S ...": the state follows the last ')'
    state = stat_line[stat_line.rfind(b")") + 2 : stat_line.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"x")


def skip_reason(
    q: Question,
    *,
    now_us: int,
    id_prefixes: tuple[str, ...],
    alive: Callable[[int], bool] = pid_alive,
) -> str | None:
    """Why this agent must not answer *q*, or None when it should.

    An empty *id_prefixes* answers every question.
    """
    if id_prefixes and not q.id.startswith(id_prefixes):
        return f"Id={q.id or '(none)'} does not start with " + " or ".join(id_prefixes)
    if q.expired(now_us):
        return "NotAfter has passed"
    if q.pid is not None and not alive(q.pid):
        return f"the asking process {q.pid} is gone"
    return None
