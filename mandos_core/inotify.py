"""A minimal inotify binding through ctypes on libc (standard library only).

Only what the agent needs: watch one directory and read name events.  The
file descriptor is non-blocking; wait on :meth:`Inotify.fileno` with
``selectors``/``select`` and call :meth:`Inotify.read` when it is readable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000

IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


class InotifyError(OSError):
    pass


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    cookie: int
    name: str


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_init1.restype = ctypes.c_int
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_add_watch.restype = ctypes.c_int
        _libc = lib
    return _libc


def _error(what: str, path: str | None = None) -> InotifyError:
    err = ctypes.get_errno()
    return InotifyError(err, f"{what}: {os.strerror(err)}", path)


def parse_events(buf: bytes) -> list[Event]:
    """Split a buffer read from an inotify fd into events."""
    events = []
    pos = 0
    while pos + _HEADER.size <= len(buf):
        wd, mask, cookie, length = _HEADER.unpack_from(buf, pos)
        pos += _HEADER.size
        raw = buf[pos : pos + length]
        pos += length
        name = os.fsdecode(raw.split(b"\0", 1)[0])
        events.append(Event(wd, mask, cookie, name))
    return events


class Inotify:
    """An inotify instance (close-on-exec, non-blocking)."""

    def __init__(self) -> None:
        fd = _lib().inotify_init1(IN_CLOEXEC | IN_NONBLOCK)
        if fd < 0:
            raise _error("inotify_init1")
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def add_watch(self, path: str, mask: int) -> int:
        wd = _lib().inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise _error(f"inotify_add_watch {path}", path)
        return wd

    def read(self) -> list[Event]:
        """All events queued now (an empty list when none)."""
        events: list[Event] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not buf:
                return events
            events.extend(parse_events(buf))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
