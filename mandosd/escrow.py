"""The escrow endpoint: machines hand over volume_key escrow packets, mandosd keeps them.

A machine's ``luks-passphrase sync`` connects to mandosd's port, sends
``escrow 1\\r\\n`` instead of ``1\\r\\n``, and does the protocol-1 TLS
handshake (the machine is the TLS server; mandosd identifies it by key_id).
After the handshake :func:`handle_escrow` runs the framed exchange described
in :mod:`mandos_core.escrow_wire`: store requests, each answered with an
acknowledgement describing what is now stored for that volume.

The server cannot read the packets: the passphrase in them is encrypted to
the escrow certificate, whose private key the helpdesk keeps elsewhere.  It
checks that a packet is a volume_key packet for the volume it claims, with
the SHA-256 it claims, and whether the machine may store it now
(:mod:`mandosd.escrow_policy`: known and enabled as for secrets, rate, disk
reserve, quota).  It keeps packets per machine (key_id, client name) and
volume UUID, with the server's receive time and a sequence number; the
newest received is the volume's current packet.  A packet received again is
acknowledged without a second copy; superseded packets are pruned when the
quota is reached.  Every decision is one audit entry (:mod:`mandosd.audit`).

Storage: ``STATEDIR/escrow.sqlite`` (0600; directory 0700; WAL; synchronous
FULL, so an acknowledged packet survives a power cut) for a single server; in
a pool, the pool's PostgreSQL (:mod:`mandosd.pgescrow`), so that a machine's
packets are in one place whichever server it reached.  It must never hold or
log a passphrase: packets are opaque here.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mandos_core import escrow_packet
from mandos_core.escrow_wire import (
    MAX_JSON,
    MAX_PACKET,
    MAX_REQUESTS,
    READ_TIMEOUT,
    WireError,
    frame_length,
    json_frame,
    parse_json,
)

from . import escrow_policy
from .audit import Kind, audit
from .config import Client
from .escrow_policy import EscrowDecision, EscrowVerdict, Kept, Upload, Usage
from .state import ClientState, StateError, connect

DB_NAME = "escrow.sqlite"
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
CONNECTION_TIMEOUT = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packets (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL,
    client_name TEXT NOT NULL,
    volume_uuid TEXT NOT NULL,
    created INTEGER NOT NULL,
    received REAL NOT NULL,
    sha256 TEXT NOT NULL,
    host_name TEXT NOT NULL,
    slot INTEGER,
    packet BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS packets_volume ON packets (key_id, volume_uuid, created, sequence);
CREATE INDEX IF NOT EXISTS packets_client ON packets (key_id, sequence);
CREATE TABLE IF NOT EXISTS uploads (
    key_id TEXT NOT NULL,
    received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_client ON uploads (key_id, received)
"""

Lookup = Callable[[], Awaitable[tuple[Client | None, ClientState | None]]]


class EscrowError(Exception):
    pass


@dataclass(frozen=True)
class StoredPacket:
    sequence: int
    key_id: str
    client_name: str
    volume_uuid: str
    created: int
    received: float
    sha256: str
    host_name: str
    slot: int | None
    packet: bytes

    def ack(self) -> dict[str, Any]:
        return {"ok": True, "volume_uuid": self.volume_uuid, "sha256": self.sha256,
                "created": self.created, "sequence": self.sequence, "received": self.received}


class Store(Protocol):
    """What an escrow session needs of a store: SQLite's or the pool's."""

    def offer(self, *, key_id: str, client_name: str, upload: Upload, packet: bytes,
              received: float, decide: Callable[[Usage], EscrowDecision]) -> Offered: ...

    def current(self, key_id: str, volume_uuid: str) -> StoredPacket | None: ...

    def list(self, *, history: bool = False) -> list[StoredPacket]: ...

    def get(self, sequence: int) -> StoredPacket | None: ...

    def find(self, client: str, volume_uuid: str) -> StoredPacket | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Offered:
    """What became of one offered packet."""

    decision: EscrowDecision
    #: the volume's current packet afterwards (for the acknowledgement); None if refused
    current: StoredPacket | None
    #: the superseded packets deleted to make room
    pruned: tuple[int, ...] = ()


def free_bytes(path: Path) -> int | None:
    """Free bytes for unprivileged users on the file system holding *path*."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class EscrowStore:
    """``STATEDIR/escrow.sqlite``: the packets kept, per machine and volume."""

    def __init__(self, statedir: Path, *, durable: bool = True) -> None:
        self.path = statedir / DB_NAME
        try:
            self.db = connect(statedir, DB_NAME, durable=durable)
        except StateError as e:
            raise EscrowError(str(e)) from None
        try:
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
        except sqlite3.Error as e:
            self.db.close()
            raise EscrowError(f"{self.path}: {e}") from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[None]:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise EscrowError(f"{self.path}: {e}") from None

    @staticmethod
    def _row(row: sqlite3.Row) -> StoredPacket:
        return StoredPacket(**{k: row[k] for k in row.keys()})  # noqa: SIM118 - sqlite3.Row

    def _insert(self, key_id: str, client_name: str, volume_uuid: str, created: int,
                received: float, packet: bytes) -> None:
        meta = escrow_packet.parse(packet).metadata
        self.db.execute(
            "INSERT INTO packets (key_id, client_name, volume_uuid, created, received, "
            "sha256, host_name, slot, packet) VALUES (?,?,?,?,?,?,?,?,?)",
            (key_id, client_name, volume_uuid.lower(), created, received,
             hashlib.sha256(packet).hexdigest(), meta.host_name, meta.passphrase_slot, packet))

    def store(self, *, key_id: str, client_name: str, volume_uuid: str, created: int,
              packet: bytes, received: float | None = None) -> StoredPacket:
        """Keep *packet* unconditionally (no policy: for tests and imports by an admin)."""
        with self._tx():
            self._insert(key_id, client_name, volume_uuid, created,
                         time.time() if received is None else received, packet)
        current = self.current(key_id, volume_uuid)
        assert current is not None
        return current

    def usage(self, key_id: str, since: float) -> Usage:
        """What *key_id* keeps, and the packets it stored since *since*."""
        kept = [Kept(r["sequence"], r["volume_uuid"], r["sha256"], r["size"])
                for r in self.db.execute(
                    "SELECT sequence, volume_uuid, sha256, length(packet) AS size FROM packets"
                    " WHERE key_id=? ORDER BY sequence", (key_id,))]
        uploads = [r["received"] for r in self.db.execute(
            "SELECT received FROM uploads WHERE key_id=? AND received>?", (key_id, since))]
        return Usage(kept, uploads, free_bytes(self.path.parent))

    def offer(self, *, key_id: str, client_name: str, upload: Upload, packet: bytes,
              received: float, decide: Callable[[Usage], EscrowDecision]) -> Offered:
        """Decide on *packet* and store it if allowed, in one write transaction.

        *decide* gets the client's :class:`Usage` as it is inside the transaction, so
        two sessions of one client cannot both slip under its quota.
        """
        with self._tx():
            decision = decide(self.usage(key_id, received - escrow_policy.RATE_WINDOW))
            if decision.verdict is EscrowVerdict.STORE:
                for seq in decision.prune:
                    self.db.execute("DELETE FROM packets WHERE sequence=? AND key_id=?",
                                    (seq, key_id))
                created = upload.created if decision.created is None else decision.created
                self._insert(key_id, client_name, upload.volume_uuid, created, received,
                             packet)
                self.db.execute("INSERT INTO uploads (key_id, received) VALUES (?,?)",
                                (key_id, received))
                self.db.execute("DELETE FROM uploads WHERE received<=?",
                                (received - escrow_policy.RATE_WINDOW,))
        if decision.verdict.refused:
            return Offered(decision, None)
        return Offered(decision, self.current(key_id, upload.volume_uuid),
                       decision.prune if decision.verdict is EscrowVerdict.STORE else ())

    def current(self, key_id: str, volume_uuid: str) -> StoredPacket | None:
        """The newest packet (by the server's receive order) for one machine's volume."""
        row = self.db.execute(
            "SELECT * FROM packets WHERE key_id=? AND volume_uuid=? "
            "ORDER BY sequence DESC LIMIT 1", (key_id, volume_uuid.lower())
        ).fetchone()
        return self._row(row) if row else None

    def list(self, *, history: bool = False) -> list[StoredPacket]:
        if history:
            rows = self.db.execute("SELECT * FROM packets ORDER BY sequence").fetchall()
            return [self._row(r) for r in rows]
        rows = self.db.execute("SELECT DISTINCT key_id, volume_uuid FROM packets").fetchall()
        out = [self.current(r["key_id"], r["volume_uuid"]) for r in rows]
        return sorted((p for p in out if p), key=lambda p: (p.client_name, p.volume_uuid))

    def get(self, sequence: int) -> StoredPacket | None:
        row = self.db.execute("SELECT * FROM packets WHERE sequence=?", (sequence,)).fetchone()
        return self._row(row) if row else None

    def find(self, client: str, volume_uuid: str) -> StoredPacket | None:
        """The current packet for *client* (name or key_id) and *volume_uuid*."""
        row = self.db.execute(
            "SELECT key_id FROM packets WHERE (client_name=? OR key_id=?) AND volume_uuid=? "
            "LIMIT 1", (client, client.upper(), volume_uuid.lower())).fetchone()
        return self.current(row["key_id"], volume_uuid) if row else None


# -- the exchange --------------------------------------------------------------

class _End(Exception):
    """The peer ended the session cleanly (EOF between frames)."""


async def _read_frame(reader: asyncio.StreamReader, limit: int, *,
                      first: bool = False) -> bytes:
    try:
        header = await asyncio.wait_for(reader.readexactly(4), READ_TIMEOUT)
    except asyncio.IncompleteReadError as e:
        if first and not e.partial:
            raise _End from None
        raise
    n = frame_length(header, limit)
    return await asyncio.wait_for(reader.readexactly(n), READ_TIMEOUT) if n else b""


def _check_request(req: dict[str, Any], packet: bytes) -> Upload:
    uuid, created, sha = req.get("volume_uuid"), req.get("created"), req.get("sha256")
    if not isinstance(uuid, str) or not _UUID.fullmatch(uuid):
        raise WireError("volume_uuid missing or malformed")
    if not isinstance(created, int) or isinstance(created, bool) or created < 0:
        raise WireError("created missing or malformed")
    if sha != hashlib.sha256(packet).hexdigest():
        raise WireError("the packet does not match its sha256")
    try:
        meta = escrow_packet.parse(packet).metadata
    except escrow_packet.PacketError as e:
        raise WireError(f"not a usable escrow packet: {e}") from None
    if meta.volume_uuid.lower() != uuid.lower():
        raise WireError("the packet is for another volume than the request says")
    return Upload(uuid.lower(), sha, len(packet), created)


@dataclass
class _Session:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    key_id: str
    peer: str
    lookup: Lookup
    reserve: int
    clock: Callable[[], float]
    name: str | None = None
    store: Store | None = None

    def audit(self, kind: Kind, message: str, *, reason: str | None = None,
              **fields: object) -> None:
        audit(kind, message, client=self.name, key_id=self.key_id, peer=self.peer,
              reason=reason, **fields)

    def refuse_silently(self, d: EscrowDecision) -> None:
        who = self.name or "unknown client"
        self.audit(d.verdict.value, f"escrow from {who} refused: {d.reason}", reason=d.reason)

    async def reply(self, obj: dict[str, Any]) -> None:
        self.writer.write(json_frame(obj))
        await self.writer.drain()


async def handle_escrow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                        key_id: str, peer: str, lookup: Lookup,
                        open_store: Callable[[], Store], reserve: int,
                        clock: Callable[[], float] = time.time) -> None:
    """Serve one machine's escrow session (after the TLS handshake, *key_id* known).

    *lookup* returns the client and its state as they are now (it is called again
    for every packet, so a ``mandos-ctl -d`` takes effect within a session);
    *open_store* opens the store (called in a thread, closed at the end: see
    :class:`mandosd.stores.EscrowOpener`); *reserve* is ``escrow_reserve`` from mandos.conf.
    """
    s = _Session(reader, writer, key_id, peer, lookup, reserve, clock)
    try:
        client, state = await lookup()
        s.name = client.name if client else None
        refused = escrow_policy.admit(client, state, clock())
        if refused is not None:  # as for secrets: nothing on the wire, reason in the audit
            s.refuse_silently(refused)
            return
        s.store = await asyncio.to_thread(open_store)
        await asyncio.wait_for(_session(s), CONNECTION_TIMEOUT)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
        s.audit(Kind.PROTOCOL_ERROR, f"escrow session with {s.name or key_id} ended: "
                f"{type(e).__name__}", reason="escrow-dropped")
    except WireError as e:
        s.audit(Kind.PROTOCOL_ERROR, f"escrow session with {s.name or key_id}: {e}",
                reason="escrow-protocol")
    except (StateError, EscrowError) as e:  # the store is away: as for secrets
        s.audit(Kind.ESCROW_FAILED, f"escrow session with {s.name or key_id}: {e}",
                reason="state-unavailable")
    finally:
        if s.store is not None:
            await asyncio.to_thread(s.store.close)
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (TimeoutError, OSError, ConnectionError):
            pass


async def _session(s: _Session) -> None:
    for n in range(MAX_REQUESTS + 1):
        try:
            raw = await _read_frame(s.reader, MAX_JSON, first=True)
        except _End:
            return
        if not raw:
            return
        if n == MAX_REQUESTS:  # the end marker after the last request is not one more
            raise WireError(f"more than {MAX_REQUESTS} requests in one session")
        req = parse_json(raw)
        op = req.get("op")
        if op == "store":
            packet = await _read_frame(s.reader, MAX_PACKET)
            if not await _store(s, req, packet):
                return
        elif op == "status":
            asked = req.get("volume_uuid")
            assert s.store is not None
            found = (await asyncio.to_thread(s.store.current, s.key_id, asked)
                     if isinstance(asked, str) else None)
            await s.reply(found.ack() if found else
                          {"ok": False, "error": "nothing stored for this volume"})
        else:
            raise WireError(f"unknown request {op!r}")


async def _store(s: _Session, req: dict[str, Any], packet: bytes) -> bool:
    """One store request; False when the session must end (the client may not escrow)."""
    assert s.store is not None
    try:
        upload = _check_request(req, packet)
    except WireError as e:
        s.audit(Kind.ESCROW_REFUSED_INVALID, f"escrow packet from {s.name} refused: {e}",
                reason=str(e))
        await s.reply({"ok": False, "error": str(e)})
        return True
    client, state = await s.lookup()  # again: an admin may have acted since the last one
    now = s.clock()
    try:
        # a durable write (fsync): off the event loop, other clients keep going
        got = await asyncio.to_thread(
            s.store.offer, key_id=s.key_id, client_name=client.name if client else "",
            upload=upload, packet=packet, received=now,
            decide=lambda usage: escrow_policy.escrow_decision(
                client, state, usage, upload, now, reserve=s.reserve))
    except EscrowError as e:
        s.audit(Kind.ESCROW_FAILED, f"escrow packet from {s.name} not stored: {e}",
                reason="state-unavailable", luks_uuid=upload.volume_uuid)
        await s.reply({"ok": False, "error": "the server could not store it"})
        return True
    d = got.decision
    if d.verdict.silent:
        s.refuse_silently(d)
        return False
    fields: dict[str, object] = {"luks_uuid": upload.volume_uuid, "sha256": upload.sha256,
                                 "size": upload.size}
    if d.verdict.refused:
        s.audit(d.verdict.value, f"escrow packet from {s.name} for volume "
                f"{upload.volume_uuid} refused: {d.reason}", reason=d.reason, **fields)
        await s.reply({"ok": False, "error": d.reason})
        return True
    assert got.current is not None
    if got.pruned:
        s.audit(Kind.ESCROW_PRUNED, f"pruned {len(got.pruned)} superseded escrow packets of "
                f"{s.name} to make room", reason="quota", sequences=" ".join(
                    str(q) for q in got.pruned))
    s.audit(d.verdict.value, f"escrow packet for {s.name} volume {upload.volume_uuid}: "
            f"{'stored' if d.verdict is EscrowVerdict.STORE else 'already stored'} (current "
            f"sequence {got.current.sequence})", reason=d.reason, sequence=got.current.sequence,
            created=upload.created, **fields)
    await s.reply(got.current.ack())
    return True
