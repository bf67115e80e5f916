"""Audit: every decision is one log entry with a fixed ``MESSAGE_ID`` and fields.

``journalctl MANDOS_CLIENT=web1`` answers "who got what, when";
``journalctl MESSAGE_ID=<id>`` lists one kind of decision.  Without journald
the same fields go to stderr as ``KEY=value``.  The catalog in
``units/mandosd.catalog`` explains each id for ``journalctl -x``.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from mandos_core.log import event

log = logging.getLogger("mandosd.audit")


class Kind(enum.Enum):
    """Each kind of decision and its journal MESSAGE_ID."""

    SECRET_SENT = "c89c15b2b5a2472f9bb353e320140d6f"
    REFUSED_UNKNOWN = "53175d2adc624edf8261d8a1679ab67f"
    REFUSED_DISABLED = "7828dbc602db43a4a2fe1fb0e0048a77"
    REFUSED_TIMED_OUT = "6a8e6ce55385422ea0f3bd803051910f"
    REFUSED_DENIED = "c866c1901eaa41c2930d0a7b5ef392c4"
    REFUSED_APPROVAL_EXPIRED = "cfb89c3fd24e49b88c9dc017b4e62b28"
    PROTOCOL_ERROR = "668bd38d06d84879a42931e574850517"
    CHECKER_STARTED = "aa6f3aab6e2c4f4180136c06218e3373"
    CHECKER_SUCCEEDED = "f2653064d33f4dc09ab048ac8ad9bdb5"
    CHECKER_FAILED = "8ab8466b58884c4980a9f1ca15d880fb"
    CLIENT_TIMED_OUT = "187cbc8ccbd24ad5a97f5f0a5dec0e1b"
    ADMIN_ENABLED = "489b631edaba44c4abc7e5b59f4ee032"
    ADMIN_DISABLED = "f6a43cfe8455454faef73c81bccdb01b"
    ADMIN_CHANGED = "a7f70618f4f742fd8a83bedf8219a644"
    APPROVAL_REQUESTED = "8102ebb9d1a842e88b4dea8a837953fe"
    APPROVAL_GIVEN = "c65783f43287471fb6a87a5be8cd8529"
    APPROVAL_DENIED = "4ba3cbb62e5141dbad4d3f9551353781"
    CONFIG_LOADED = "0e80bbc19c5a49d386f4d720a5c41112"
    SERVER_STARTED = "87bf32a587014fe099c5856dc70f6755"
    ESCROW_STORED = "8e493893f64349468ece22efaebd21d1"

    @property
    def outcome(self) -> str:
        return self.name.lower().replace("_", "-")


_LEVEL = {
    Kind.SECRET_SENT: logging.INFO,
    Kind.PROTOCOL_ERROR: logging.INFO,
    Kind.CHECKER_STARTED: logging.INFO,
    Kind.CHECKER_SUCCEEDED: logging.INFO,
    Kind.CONFIG_LOADED: logging.INFO,
    Kind.SERVER_STARTED: logging.INFO,
}


#: Where else entries go (the pool's audit table): each gets a mapping with ``at``,
#: ``outcome``, ``message_id``, ``client``, ``key_id``, ``peer``, ``reason``,
#: ``message`` and ``fields``; it must not block (queue and return).
_sinks: list[Callable[[Mapping[str, Any]], None]] = []


def add_sink(sink: Callable[[Mapping[str, Any]], None]) -> None:
    _sinks.append(sink)


def remove_sink(sink: Callable[[Mapping[str, Any]], None]) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def audit(kind: Kind, message: str, /, *, client: str | None = None,
          key_id: str | None = None, peer: str | None = None, reason: str | None = None,
          **fields: object) -> None:
    """Log one decision.  Never pass a secret here: fields are free text in the journal."""
    level = _LEVEL.get(kind, logging.WARNING if kind.name.startswith(("REFUSED", "CLIENT"))
                       else logging.INFO)
    extra = {f"MANDOS_{k.upper()}": v for k, v in fields.items()}
    event(log, level, message, MESSAGE_ID=kind.value, MANDOS_OUTCOME=kind.outcome,
          MANDOS_CLIENT=client, MANDOS_KEY_ID=key_id, MANDOS_PEER=peer,
          MANDOS_REASON=reason, **extra)
    if _sinks:
        entry = {"at": time.time(), "outcome": kind.outcome, "message_id": kind.value,
                 "client": client, "key_id": key_id, "peer": peer, "reason": reason,
                 "message": message, "fields": fields}
        for sink in _sinks:
            try:
                sink(entry)
            except Exception:  # an audit copy must never break a decision
                log.exception("audit sink failed")
