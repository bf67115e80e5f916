"""Logging to stderr or straight to journald, with structured fields.

Every program here calls :func:`setup` once.  Structured fields (upper-case,
as journald requires) are attached with :func:`event`; on a terminal they are
appended as ``KEY=value`` so the same information is visible in development.

We speak journald's native datagram protocol ourselves (a dozen lines) rather
than depend on systemd-python or pystemd, which need a compiler and
libsystemd headers, and would bloat the initrd.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_FIELDS = "journal_fields"

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def event(
    logger: logging.Logger,
    level: int,
    message: str,
    /,
    **fields: object,
) -> None:
    """Log *message* with journal *fields* (names are upper-cased)."""
    clean = {k.upper(): str(v) for k, v in fields.items() if v is not None}
    logger.log(level, message, extra={_FIELDS: clean}, stacklevel=2)


def record_fields(record: logging.LogRecord) -> Mapping[str, str]:
    return getattr(record, _FIELDS, {})


def _encode_field(key: str, value: str) -> bytes:
    data = value.encode("utf-8", errors="replace")
    if b"\n" in data:
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


class JournalHandler(logging.Handler):
    """Send records to journald's native socket (``MANDOS_JOURNAL_SOCKET`` overrides)."""

    def __init__(self, ident: str, path: str | None = None) -> None:
        super().__init__()
        self.ident = ident
        self.path = path or os.environ.get("MANDOS_JOURNAL_SOCKET", JOURNAL_SOCKET)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info and logging.root.isEnabledFor(logging.DEBUG):
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            fields = {
                "MESSAGE": msg,
                "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
                "SYSLOG_IDENTIFIER": self.ident,
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
                "LOGGER": record.name,
            }
            fields.update(record_fields(record))
            data = b"".join(_encode_field(k, v) for k, v in fields.items())
            self.sock.sendto(data, self.path)
        except OSError:
            # journald gone: fall back to stderr rather than lose the line
            sys.stderr.write(StderrFormatter().format(record) + "\n")

    def close(self) -> None:
        self.sock.close()
        super().close()


class StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.name.split('.')[0]}: {record.getMessage()}"
        fields = record_fields(record)
        if fields:
            line += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        if record.exc_info and logging.root.isEnabledFor(logging.DEBUG):
            line += "\n" + self.formatException(record.exc_info)
        return line


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def level_from_env(debug: bool) -> int:
    if debug:
        return logging.DEBUG
    name = os.environ.get("SYSTEMD_LOG_LEVEL", "").strip().lower()
    return {
        "debug": logging.DEBUG, "7": logging.DEBUG,
        "info": logging.INFO, "6": logging.INFO, "notice": logging.INFO, "5": logging.INFO,
        "warning": logging.WARNING, "4": logging.WARNING,
        "err": logging.ERROR, "3": logging.ERROR,
        "crit": logging.CRITICAL, "alert": logging.CRITICAL, "emerg": logging.CRITICAL,
    }.get(name, logging.INFO)


def setup(ident: str, debug: bool = False) -> None:
    """Configure the root logger: journald when stderr goes there, else stderr."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if _stderr_is_journal() or os.environ.get("MANDOS_JOURNAL_SOCKET"):
        handler = JournalHandler(ident)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StderrFormatter())
    root.addHandler(handler)
    root.setLevel(level_from_env(debug))
