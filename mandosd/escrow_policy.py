"""May this machine's escrow packet be stored now?  Pure functions of (config, state, usage, time).

No sockets, no clocks, no database: :mod:`mandosd.escrow` gathers what the
store holds for the machine (:class:`Usage`) inside its write transaction and
passes it in with the time; the answer says what to store and what to prune.

The rules, in order (the first that applies decides):

1. the same known/enabled/timeout rule as for secrets (:func:`mandosd.policy.decide`):
   an unknown key, a client removed with ``mandos-ctl -r``, disabled with
   ``-d``, or past its deadline gets nothing stored and no acknowledgement;
   approval (``approval_delay``) is for secrets only;
2. a packet the machine already stored (same SHA-256) is acknowledged as it
   is, without a second copy;
3. rate: at most ``escrow_uploads_per_hour`` packets stored per client in
   any hour (server time);
4. disk: nothing is stored while the state file system would have less than
   ``escrow_reserve`` free, so that the state database's writes for secrets
   still find room;
5. quota: a client keeps at most ``escrow_max_packets`` packets and
   ``escrow_max_bytes`` bytes.  Superseded packets (not the newest of their
   volume, or the newest of the volume this upload replaces) are pruned,
   oldest first, to make room; the newest packet of another volume never is.

Which packet is current for a volume is decided by the order the server
received them, never by the machine's ``created`` time: a ``created`` in the
future is stored as the receive time (it cannot keep a packet current).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from . import policy
from .audit import Kind
from .config import Client
from .state import ClientState

#: a machine's clock may be this far ahead before its ``created`` is reported as skewed
MAX_CLOCK_SKEW = 300.0
#: the window of ``escrow_uploads_per_hour``
RATE_WINDOW = 3600.0
#: SQLite writes a packet about twice (write-ahead log, then the database)
WRITE_FACTOR = 2


class EscrowVerdict(enum.Enum):
    STORE = Kind.ESCROW_STORED
    DUPLICATE = Kind.ESCROW_DUPLICATE
    UNKNOWN = Kind.ESCROW_REFUSED_UNKNOWN
    DISABLED = Kind.ESCROW_REFUSED_DISABLED
    TIMED_OUT = Kind.ESCROW_REFUSED_TIMED_OUT
    RATE = Kind.ESCROW_REFUSED_RATE
    DISK = Kind.ESCROW_REFUSED_DISK
    QUOTA = Kind.ESCROW_REFUSED_QUOTA

    @property
    def refused(self) -> bool:
        return self not in (EscrowVerdict.STORE, EscrowVerdict.DUPLICATE)

    @property
    def silent(self) -> bool:
        """Refused as secrets are: no answer at all, the connection is closed."""
        return self in (EscrowVerdict.UNKNOWN, EscrowVerdict.DISABLED, EscrowVerdict.TIMED_OUT)


_FROM_POLICY = {
    policy.Verdict.UNKNOWN: EscrowVerdict.UNKNOWN,
    policy.Verdict.DISABLED: EscrowVerdict.DISABLED,
    policy.Verdict.TIMED_OUT: EscrowVerdict.TIMED_OUT,
}


@dataclass(frozen=True)
class Upload:
    """One store request, as checked on the wire."""

    volume_uuid: str
    sha256: str
    size: int
    #: the machine's claim (unix seconds)
    created: int


@dataclass(frozen=True)
class Kept:
    """One packet the store keeps for this client (metadata only)."""

    sequence: int
    volume_uuid: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Usage:
    """What the store holds for one client at the moment of the decision."""

    kept: Sequence[Kept] = ()
    #: server receive times of the packets it stored recently (pruned ones too)
    uploads: Sequence[float] = ()
    #: free bytes on the state file system (unprivileged), None if unknown
    free_bytes: int | None = None


@dataclass(frozen=True)
class EscrowDecision:
    verdict: EscrowVerdict
    reason: str
    #: for STORE: the packets (sequence numbers) to delete first
    prune: tuple[int, ...] = ()
    #: for STORE: the created time to store (never later than the receive time)
    created: int | None = None
    #: for DUPLICATE: the packet already stored
    duplicate_of: int | None = None


def admit(client: Client | None, state: ClientState | None, now: float) -> EscrowDecision | None:
    """The known/enabled/timeout part, as for secrets; None when the client may escrow."""
    d = policy.decide(client, state, now)
    verdict = _FROM_POLICY.get(d.verdict)
    return EscrowDecision(verdict, d.reason) if verdict is not None else None


def current_sequences(kept: Sequence[Kept]) -> set[int]:
    """The newest packet (by receive order) of each volume."""
    newest: dict[str, int] = {}
    for k in kept:
        newest[k.volume_uuid] = max(k.sequence, newest.get(k.volume_uuid, k.sequence))
    return set(newest.values())


def stored_created(claimed: int, now: float) -> int:
    """The ``created`` time kept: the machine's, but never after the server received it."""
    return min(claimed, int(now))


def escrow_decision(client: Client | None, state: ClientState | None, usage: Usage,
                    upload: Upload, now: float, *, reserve: int) -> EscrowDecision:
    """The decision for one store request received at *now* (server time)."""
    refused = admit(client, state, now)
    if refused is not None:
        return refused
    assert client is not None
    for k in usage.kept:
        if k.sha256 == upload.sha256:
            return EscrowDecision(EscrowVerdict.DUPLICATE,
                                  f"already stored (sequence {k.sequence})",
                                  duplicate_of=k.sequence)
    # no upper bound: *now* is when this request arrived, and a request of the same
    # machine (another session, another server of the pool) may have stored after that
    # while this one waited for its turn; it counts
    recent = sum(1 for t in usage.uploads if now - RATE_WINDOW < t)
    if recent >= client.escrow_uploads_per_hour:
        return EscrowDecision(EscrowVerdict.RATE, f"{recent} packets stored in the last hour "
                              f"(escrow_uploads_per_hour = {client.escrow_uploads_per_hour})")
    if usage.free_bytes is not None and usage.free_bytes - WRITE_FACTOR * upload.size < reserve:
        return EscrowDecision(EscrowVerdict.DISK, f"{usage.free_bytes} bytes free on the state "
                              f"file system, below escrow_reserve = {reserve}")
    prune = _to_prune(client, usage.kept, upload)
    if prune is None:
        return EscrowDecision(EscrowVerdict.QUOTA, _quota_reason(client, usage.kept, upload))
    created = stored_created(upload.created, now)
    reason = "within quota"
    if upload.created > now + MAX_CLOCK_SKEW:
        reason = (f"created time {upload.created} is {upload.created - now:.0f} s in the "
                  f"future; stored as the receive time {created}")
    return EscrowDecision(EscrowVerdict.STORE, reason, prune=prune, created=created)


def _to_prune(client: Client, kept: Sequence[Kept], upload: Upload) -> tuple[int, ...] | None:
    """Superseded packets to delete, oldest first, so that *upload* fits; None if it cannot."""
    count = len(kept) + 1
    size = sum(k.size for k in kept) + upload.size
    if count <= client.escrow_max_packets and size <= client.escrow_max_bytes:
        return ()
    current = current_sequences(kept)
    prunable = sorted((k for k in kept
                       if k.sequence not in current or k.volume_uuid == upload.volume_uuid),
                      key=lambda k: k.sequence)
    prune: list[int] = []
    for k in prunable:
        if count <= client.escrow_max_packets and size <= client.escrow_max_bytes:
            break
        prune.append(k.sequence)
        count -= 1
        size -= k.size
    if count <= client.escrow_max_packets and size <= client.escrow_max_bytes:
        return tuple(prune)
    return None


def _quota_reason(client: Client, kept: Sequence[Kept], upload: Upload) -> str:
    return (f"quota: {len(kept)} packets, {sum(k.size for k in kept)} bytes kept, "
            f"this one {upload.size} bytes (escrow_max_packets = {client.escrow_max_packets}, "
            f"escrow_max_bytes = {client.escrow_max_bytes})")
