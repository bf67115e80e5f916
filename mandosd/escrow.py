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
the SHA-256 it claims, and keeps every packet it receives (a history), per
machine (key_id, client name) and volume UUID, with its received time and a
sequence number.  A packet older (by its ``created`` time) than the one
already stored for the volume does not replace it.

Storage: ``STATEDIR/escrow.sqlite`` (0600; directory 0700; WAL; synchronous
FULL, so an acknowledged packet survives a power cut).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

from .audit import Kind, audit
from .state import StateError, connect

log = logging.getLogger("mandosd.escrow")

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
CREATE INDEX IF NOT EXISTS packets_volume ON packets (key_id, volume_uuid, created, sequence)
"""


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


class EscrowStore:
    """``STATEDIR/escrow.sqlite``: every packet received, per machine and volume."""

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
            raise EscrowError(f"{self.path}: {e}") from None

    @staticmethod
    def _row(row: sqlite3.Row) -> StoredPacket:
        return StoredPacket(**{k: row[k] for k in row.keys()})  # noqa: SIM118 - sqlite3.Row

    def store(self, *, key_id: str, client_name: str, volume_uuid: str, created: int,
              packet: bytes, received: float | None = None) -> StoredPacket:
        """Keep *packet*; return the packet now current for the volume (maybe a newer one)."""
        meta = escrow_packet.parse(packet).metadata
        sha = hashlib.sha256(packet).hexdigest()
        with self._tx():
            self.db.execute(
                "INSERT INTO packets (key_id, client_name, volume_uuid, created, received, "
                "sha256, host_name, slot, packet) VALUES (?,?,?,?,?,?,?,?,?)",
                (key_id, client_name, volume_uuid.lower(), created,
                 time.time() if received is None else received, sha, meta.host_name,
                 meta.passphrase_slot, packet))
        current = self.current(key_id, volume_uuid)
        assert current is not None
        return current

    def current(self, key_id: str, volume_uuid: str) -> StoredPacket | None:
        """The newest packet (by its created time, then arrival) for one machine's volume."""
        row = self.db.execute(
            "SELECT * FROM packets WHERE key_id=? AND volume_uuid=? "
            "ORDER BY created DESC, sequence DESC LIMIT 1", (key_id, volume_uuid.lower())
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

async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    n = frame_length(await asyncio.wait_for(reader.readexactly(4), READ_TIMEOUT), limit)
    return await asyncio.wait_for(reader.readexactly(n), READ_TIMEOUT) if n else b""


def _check_request(req: dict[str, Any], packet: bytes) -> tuple[str, int]:
    uuid, created, sha = req.get("volume_uuid"), req.get("created"), req.get("sha256")
    if not isinstance(uuid, str) or not _UUID.fullmatch(uuid):
        raise WireError("volume_uuid missing or malformed")
    if not isinstance(created, int) or created < 0:
        raise WireError("created missing or malformed")
    if sha != hashlib.sha256(packet).hexdigest():
        raise WireError("the packet does not match its sha256")
    try:
        meta = escrow_packet.parse(packet).metadata
    except escrow_packet.PacketError as e:
        raise WireError(f"not a usable escrow packet: {e}") from None
    if meta.volume_uuid.lower() != uuid.lower():
        raise WireError("the packet is for another volume than the request says")
    return uuid.lower(), created


async def handle_escrow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                        client_name: str, key_id: str, store: EscrowStore) -> None:
    """Serve one machine's escrow session (after the TLS handshake, *key_id* known)."""
    try:
        await asyncio.wait_for(_session(reader, writer, client_name, key_id, store),
                               CONNECTION_TIMEOUT)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
        audit(Kind.ESCROW_DROPPED, f"escrow session with {client_name} ended: "
              f"{type(e).__name__}", client=client_name, key_id=key_id,
              reason=type(e).__name__)
    except WireError as e:
        audit(Kind.ESCROW_PROTOCOL, f"escrow session with {client_name}: {e}",
              client=client_name, key_id=key_id, reason=str(e))
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (TimeoutError, OSError, ConnectionError):
            pass


async def _session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   client_name: str, key_id: str, store: EscrowStore) -> None:
    for _ in range(MAX_REQUESTS):
        raw = await _read_frame(reader, MAX_JSON)
        if not raw:
            return
        req = parse_json(raw)
        op = req.get("op")
        if op == "store":
            packet = await _read_frame(reader, MAX_PACKET)
            try:
                uuid, created = _check_request(req, packet)
            except WireError as e:
                writer.write(json_frame({"ok": False, "error": str(e)}))
                await writer.drain()
                audit(Kind.ESCROW_REFUSED, f"escrow packet from {client_name} refused: {e}",
                      client=client_name, key_id=key_id, reason=str(e))
                continue
            try:
                # a durable write (fsync): off the event loop, other clients keep going
                current = await asyncio.to_thread(
                    store.store, key_id=key_id, client_name=client_name, volume_uuid=uuid,
                    created=created, packet=packet)
            except EscrowError as e:
                writer.write(json_frame({"ok": False, "error": "the server could not store it"}))
                await writer.drain()
                log.error("escrow store: %s", e)
                continue
            audit(Kind.ESCROW_STORED, f"escrow packet stored for {client_name} volume {uuid} "
                  f"(sequence {current.sequence})", client=client_name, key_id=key_id,
                  luks_uuid=uuid, sequence=current.sequence)
            writer.write(json_frame(current.ack()))
        elif op == "status":
            asked = req.get("volume_uuid")
            found = (await asyncio.to_thread(store.current, key_id, asked)
                     if isinstance(asked, str) else None)
            writer.write(json_frame(found.ack() if found else
                                    {"ok": False, "error": "nothing stored for this volume"}))
        else:
            raise WireError(f"unknown request {op!r}")
        await writer.drain()
    raise WireError(f"more than {MAX_REQUESTS} requests in one session")
