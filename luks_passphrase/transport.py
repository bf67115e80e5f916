"""``luks-passphrase sync``: hand queued escrow packets to the escrow server.

The machine side of :mod:`mandos_core.escrow_wire`: TCP, the ``escrow 1``
line, TLS 1.3 as the TLS *server* with the machine's Mandos raw public key,
asking the escrow server for its own key, then one store request per queued
packet.  Returns the server's acknowledgements and whether the server proved
a pinned identity; the caller destroys the old backup slot only when both
hold: a pinned server acknowledged the queued packet's SHA-256.  An echo of
the SHA-256 we sent proves nothing by itself: any host can repeat it.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from functools import partial

from mandos_core import gnutls, tls
from mandos_core.address import Server
from mandos_core.escrow_wire import (
    ESCROW_LINE,
    MAX_JSON,
    WireError,
    frame,
    frame_length,
    json_frame,
    parse_json,
)
from mandos_core.tls import ClientTLS

from .state import Queued

log = logging.getLogger("luks_passphrase.transport")


class TransportError(Exception):
    pass


@dataclass(frozen=True)
class Ack:
    volume_uuid: str
    sha256: str
    created: int
    sequence: int
    received: float


class _Conn:
    """The TLS session of one escrow connection, with a deadline on every wait."""

    def __init__(self, session: gnutls.Session, fd: int, deadline: float) -> None:
        self.session = session
        self.fd = fd
        self.deadline = deadline

    def sendall(self, data: bytes) -> None:
        tls.send_all(self.session, self.fd, data, self.deadline)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            want = min(16384, n - len(buf))
            chunk = tls.drive(self.session, self.fd, partial(self.session.recv, want),
                              self.deadline)
            if not chunk:
                raise TransportError("the escrow server closed the connection")
            buf += chunk
        return bytes(buf)

    def reply(self) -> dict[str, object]:
        n = frame_length(self.recv_exact(4), MAX_JSON)
        return parse_json(self.recv_exact(n))


def send(
    server: Server,
    ctx: ClientTLS,
    items: list[tuple[str, Queued]],
    *,
    connect_timeout: float = 5.0,
    timeout: float = 30.0,
) -> tuple[dict[str, Ack], bool]:
    """Store *items* (volume UUID, queued packet) on *server*.

    Returns the acks by UUID, and whether the server proved a pinned identity
    in the handshake (only then may an ack destroy anything).
    """
    acks: dict[str, Ack] = {}
    try:
        sock = socket.create_connection((server.host, server.port), timeout=connect_timeout)
    except OSError as e:
        raise TransportError(f"{server}: {e.strerror or e}") from None
    deadline = time.monotonic() + timeout
    session: gnutls.Session | None = None
    try:
        sock.settimeout(timeout)
        sock.sendall(ESCROW_LINE)
        sock.setblocking(False)
        fd = sock.fileno()
        session = gnutls.Session(fd, server=True, credentials=ctx.credentials,
                                 priority=ctx.priority, request_peer_key=True)
        conn = _Conn(session, fd, deadline)
        tls.drive(session, fd, session.handshake, deadline)
        proved = ctx.proved_pin(session)
        if ctx.pins and ctx.require_pin and not proved:
            raise TransportError(f"{server}: not a pinned escrow server (it did not prove "
                                 "a key listed in server-pins)")
        for uuid, q in items:
            conn.sendall(json_frame({"op": "store", "volume_uuid": uuid,
                                     "created": q.created, "sha256": q.sha256}))
            conn.sendall(frame(q.packet))
            reply = conn.reply()
            if not reply.get("ok"):
                log.warning("%s: escrow server refused the packet for %s: %s", server, uuid,
                            reply.get("error", "no reason given"))
                continue
            try:
                acks[uuid] = Ack(str(reply["volume_uuid"]), str(reply["sha256"]),
                                 int(reply["created"]),  # type: ignore[call-overload]
                                 int(reply["sequence"]),  # type: ignore[call-overload]
                                 float(reply["received"]))  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError):
                raise TransportError(f"{server}: malformed acknowledgement") from None
        conn.sendall(frame(b""))
        try:
            session.bye()
        except (gnutls.GnuTLSError, gnutls.WouldBlock, OSError):
            pass
    except tls.TLSTimeout:
        raise TransportError(f"{server}: timed out") from None
    except TimeoutError:
        raise TransportError(f"{server}: timed out") from None
    except gnutls.GnuTLSError as e:
        raise TransportError(f"{server}: TLS: {e}") from None
    except WireError as e:
        raise TransportError(f"{server}: {e}") from None
    except OSError as e:
        raise TransportError(f"{server}: {e.strerror or e}") from None
    finally:
        if session is not None:
            session.close()
        sock.close()
    return acks, proved
