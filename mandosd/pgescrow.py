"""The escrow store of a pool of key servers: packets in the pool's PostgreSQL.

Same interface as :class:`mandosd.escrow.EscrowStore` (SQLite); a machine's
packets land in one table whichever server of the pool received them, and
``mandos-ctl --state-url URL escrow list`` on any admin host sees them all.
Each row also names the server that received it.

One machine's store requests are serialised across the pool by a
transaction-scoped advisory lock on its key_id, so two sessions with two
servers cannot both slip under its quota or rate.  A commit is durable
(``synchronous_commit`` on for the store transaction, whatever the database's
default) before the acknowledgement is sent.  The disk reserve (``escrow_reserve``) is the state file system's, which
this server cannot see: the per-client quota bounds what a machine can store,
and the database host's disk is watched as any database's is.

It runs on a :class:`mandosd.pgstate.PostgresStore` (reconnection, back-off,
errors as :class:`StateError`, never the URL in a message): in a server, one of
its own, never the connection that answers secret requests, since a session may
wait here for another session's advisory lock (:class:`mandosd.stores.EscrowOpener`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psycopg

from mandos_core import escrow_packet

from . import escrow_policy
from .escrow import EscrowError, Offered, StoredPacket
from .escrow_policy import EscrowDecision, EscrowVerdict, Kept, Upload, Usage
from .pgstate import PostgresStore
from .state import StateError

#: pg_advisory_xact_lock(class, key) class for "one machine's escrow": the two-key form
#: does not overlap the one-key schema lock
ESCROW_LOCK_CLASS = 0x6573
_FIELDS = ("sequence", "key_id", "client_name", "volume_uuid", "created", "received",
           "sha256", "host_name", "slot", "packet")
_SELECT = f"SELECT {', '.join(_FIELDS)} FROM escrow_packets"


def _packet(row: Mapping[str, Any]) -> StoredPacket:
    values = {k: row[k] for k in _FIELDS}
    values["packet"] = bytes(values["packet"])
    return StoredPacket(**values)


class PostgresEscrowStore:
    """The pool's escrow packets (table ``escrow_packets``, schema 3)."""

    def __init__(self, pg: PostgresStore) -> None:
        self.pg = pg
        self.where = pg.where

    def close(self) -> None:
        """Sessions share the connection: it stays open for the next (its owner closes it)."""

    def _run(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        try:
            return self.pg.run(fn)
        except StateError as e:
            raise EscrowError(str(e)) from None

    def _insert(self, conn: psycopg.Connection[Any], key_id: str, client_name: str,
                volume_uuid: str, created: int, received: float, packet: bytes) -> None:
        meta = escrow_packet.parse(packet).metadata
        conn.execute(
            "INSERT INTO escrow_packets (key_id, client_name, volume_uuid, created, received,"
            " sha256, host_name, slot, packet, server) VALUES"
            " (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            (key_id, client_name, volume_uuid.lower(), created, received,
             hashlib.sha256(packet).hexdigest(), meta.host_name, meta.passphrase_slot, packet,
             self.pg.server_name))

    def store(self, *, key_id: str, client_name: str, volume_uuid: str, created: int,
              packet: bytes, received: float | None = None) -> StoredPacket:
        """Keep *packet* unconditionally (no policy: for tests and imports by an admin)."""
        import time

        when = time.time() if received is None else received
        self._run(lambda c: self._insert(c, key_id, client_name, volume_uuid, created, when,
                                         packet))
        current = self.current(key_id, volume_uuid)
        assert current is not None
        return current

    @staticmethod
    def _usage(conn: psycopg.Connection[Any], key_id: str, since: float) -> Usage:
        kept = [Kept(r["sequence"], r["volume_uuid"], r["sha256"], r["size"])
                for r in conn.execute(
                    "SELECT sequence, volume_uuid, sha256, octet_length(packet) AS size"
                    " FROM escrow_packets WHERE key_id=%s ORDER BY sequence", (key_id,))]
        uploads = [r["received"] for r in conn.execute(
            "SELECT received FROM escrow_uploads WHERE key_id=%s AND received>%s",
            (key_id, since))]
        return Usage(kept, uploads, None)  # the database host's disk: not ours to see

    def usage(self, key_id: str, since: float) -> Usage:
        usage: Usage = self._run(lambda c: self._usage(c, key_id, since))
        return usage

    def offer(self, *, key_id: str, client_name: str, upload: Upload, packet: bytes,
              received: float, decide: Callable[[Usage], EscrowDecision]) -> Offered:
        """Decide on *packet* and store it if allowed, in one transaction, with this
        machine's requests on every server of the pool waiting their turn."""
        def tx(conn: psycopg.Connection[Any]) -> EscrowDecision:
            # the acknowledgement lets the machine kill its old backup slot: the commit
            # is on disk first, whatever a DBA set for speed (synchronous_commit = off)
            conn.execute("SET LOCAL synchronous_commit TO on")
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                         (ESCROW_LOCK_CLASS, key_id))
            decision = decide(self._usage(conn, key_id, received - escrow_policy.RATE_WINDOW))
            if decision.verdict is EscrowVerdict.STORE:
                for seq in decision.prune:
                    conn.execute("DELETE FROM escrow_packets WHERE sequence=%s AND key_id=%s",
                                 (seq, key_id))
                created = upload.created if decision.created is None else decision.created
                self._insert(conn, key_id, client_name, upload.volume_uuid, created, received,
                             packet)
                conn.execute("INSERT INTO escrow_uploads (key_id, received) VALUES (%s,%s)",
                             (key_id, received))
                conn.execute("DELETE FROM escrow_uploads WHERE key_id=%s AND received<=%s",
                             (key_id, received - escrow_policy.RATE_WINDOW))
            return decision

        decision: EscrowDecision = self._run(tx)
        if decision.verdict.refused:
            return Offered(decision, None)
        return Offered(decision, self.current(key_id, upload.volume_uuid),
                       decision.prune if decision.verdict is EscrowVerdict.STORE else ())

    def current(self, key_id: str, volume_uuid: str) -> StoredPacket | None:
        """The newest packet (by the pool's receive order) for one machine's volume."""
        row = self._run(lambda c: c.execute(
            f"{_SELECT} WHERE key_id=%s AND volume_uuid=%s ORDER BY sequence DESC LIMIT 1",
            (key_id, volume_uuid.lower())).fetchone())
        return _packet(row) if row else None

    def list(self, *, history: bool = False) -> list[StoredPacket]:
        if history:
            rows = self._run(lambda c: c.execute(f"{_SELECT} ORDER BY sequence").fetchall())
            return [_packet(r) for r in rows]
        rows = self._run(lambda c: c.execute(
            f"SELECT DISTINCT ON (key_id, volume_uuid) {', '.join(_FIELDS)}"
            " FROM escrow_packets ORDER BY key_id, volume_uuid, sequence DESC").fetchall())
        return sorted((_packet(r) for r in rows), key=lambda p: (p.client_name, p.volume_uuid))

    def get(self, sequence: int) -> StoredPacket | None:
        row = self._run(lambda c: c.execute(f"{_SELECT} WHERE sequence=%s",
                                            (sequence,)).fetchone())
        return _packet(row) if row else None

    def find(self, client: str, volume_uuid: str) -> StoredPacket | None:
        """The current packet for *client* (name or key_id) and *volume_uuid*."""
        row = self._run(lambda c: c.execute(
            "SELECT key_id FROM escrow_packets WHERE (client_name=%s OR key_id=%s)"
            " AND volume_uuid=%s LIMIT 1",
            (client, client.upper(), volume_uuid.lower())).fetchone())
        return self.current(row["key_id"], volume_uuid) if row else None


def import_packets(conn: psycopg.Connection[Any], where: str,
                   packets: Iterable[StoredPacket]) -> int:
    """Copy a single server's packets (from SQLite, sequence numbers kept) into the
    empty table, inside the caller's transaction (``mandos-ctl migrate-state`` moves
    clients and packets at once or not at all); returns how many."""
    rows = [(p.sequence, p.key_id, p.client_name, p.volume_uuid, p.created, p.received,
             p.sha256, p.host_name, p.slot, p.packet, "migrated") for p in packets]
    conn.execute("LOCK TABLE escrow_packets IN EXCLUSIVE MODE")
    if conn.execute("SELECT 1 FROM escrow_packets LIMIT 1").fetchone():
        raise StateError(f"{where}: already holds escrow packets; refusing to merge "
                         "another store into them")
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO escrow_packets (sequence, key_id, client_name, volume_uuid, created,"
            " received, sha256, host_name, slot, packet, server) VALUES"
            " (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", rows)
    conn.execute("SELECT setval(pg_get_serial_sequence('escrow_packets', 'sequence'),"
                 " greatest((SELECT max(sequence) FROM escrow_packets), 1))")
    return len(rows)
