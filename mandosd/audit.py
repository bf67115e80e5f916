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
    #: a value changed in clients.conf since the last load, applied over stored state
    CONFIG_CHANGED = "1477dead091645c8899db22a3eba2184"
    #: clients.conf changed but could not be loaded; the previous one stays in use
    CONFIG_REJECTED = "628fb5316b6748d5afb1c5b5a7b7645c"
    #: a client left clients.conf; its state is kept (a tombstone), refused as unknown
    CLIENT_GONE = "044c1c41a2284982aa1a2ddfda9641b1"
    #: a client is back in clients.conf (or added again); its stored state came back
    CLIENT_RETURNED = "f606db207117435887c42b3466e25a98"
    SERVER_STARTED = "87bf32a587014fe099c5856dc70f6755"
    ESCROW_STORED = "8e493893f64349468ece22efaebd21d1"
    ESCROW_DUPLICATE = "9c6cefb0050a4fc28c09d1f4460b8aa8"
    ESCROW_PRUNED = "f243302fa330431ba6e2852b4358a688"
    ESCROW_REFUSED_UNKNOWN = "64370210ca0947329aa07e4fb8ec0818"
    ESCROW_REFUSED_DISABLED = "d0bed2f730234f88a274af81715b7164"
    ESCROW_REFUSED_TIMED_OUT = "f3c9f99001af4ec9b9522bda78491e1e"
    ESCROW_REFUSED_INVALID = "da35b0180da14099821f56d5497ad92c"
    ESCROW_REFUSED_QUOTA = "69db54a45bd4447388cbe5b0e153de16"
    ESCROW_REFUSED_RATE = "9e17acbbb7864ef1b00b2fe3f8d67d8a"
    ESCROW_REFUSED_DISK = "75cadfa7a9614db9ae5d3f217f32001d"
    ESCROW_FAILED = "15c9940f8c5f40c6ad5f163e939a9899"

    @property
    def outcome(self) -> str:
        return self.name.lower().replace("_", "-")


_LEVEL = {
    Kind.SECRET_SENT: logging.INFO,
    Kind.PROTOCOL_ERROR: logging.INFO,
    Kind.CHECKER_STARTED: logging.INFO,
    Kind.CHECKER_SUCCEEDED: logging.INFO,
    Kind.CONFIG_LOADED: logging.INFO,
    Kind.CONFIG_REJECTED: logging.ERROR,
    Kind.SERVER_STARTED: logging.INFO,
    Kind.ESCROW_REFUSED_UNKNOWN: logging.WARNING,
    Kind.ESCROW_REFUSED_DISABLED: logging.WARNING,
    Kind.ESCROW_REFUSED_TIMED_OUT: logging.WARNING,
    Kind.ESCROW_REFUSED_INVALID: logging.WARNING,
    Kind.ESCROW_REFUSED_QUOTA: logging.WARNING,
    Kind.ESCROW_REFUSED_RATE: logging.WARNING,
    Kind.ESCROW_REFUSED_DISK: logging.WARNING,
    Kind.ESCROW_FAILED: logging.ERROR,
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
