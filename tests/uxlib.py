"""A stand-in for journald's socket: what the passphrase tool logs, read by its tests."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from pathlib import Path


class Journal:
    """A datagram socket standing in for journald's; the program's log records land here."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        """The messages logged since the last call."""
        out = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return out
            out += self._message(data)

    @staticmethod
    def _message(data: bytes) -> list[str]:
        return [line[8:].decode() for line in data.split(b"\n") if line.startswith(b"MESSAGE=")]

    def wait_for(self, prefix: str, context: Callable[[], str] = str, timeout: float = 60) -> str:
        """Block until a message starting with *prefix* arrives; return it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise AssertionError(f"no log record {prefix!r} arrived; {context()}")
            for m in self._message(self.sock.recv(65536)):
                if m.startswith(prefix):
                    return m
