"""``luks-passphrase sync``: hand queued escrow packets to the escrow server.

The machine side of :mod:`mandos_core.escrow_wire`: TCP, the ``escrow 1``
line, TLS 1.3 as the TLS *server* with the machine's Mandos TLS key, then one
store request per queued packet.  Returns the server's acknowledgements;
the caller promotes a pending backup only when an acknowledgement names the
queued packet's SHA-256.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from dataclasses import dataclass

from mandos_core.address import Server
from mandos_core.escrow_wire import (
    ESCROW_LINE,
    MAX_JSON,
    READ_TIMEOUT,
    WireError,
    frame,
    frame_length,
    json_frame,
    parse_json,
)

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


def _recv_exact(tls: ssl.SSLSocket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        tls.settimeout(min(left, READ_TIMEOUT))
        chunk = tls.recv(n - len(buf))
        if not chunk:
            raise TransportError("the escrow server closed the connection")
        buf += chunk
    return bytes(buf)


def _reply(tls: ssl.SSLSocket, deadline: float) -> dict[str, object]:
    n = frame_length(_recv_exact(tls, 4, deadline), MAX_JSON)
    return parse_json(_recv_exact(tls, n, deadline))


def send(
    server: Server,
    ctx: ssl.SSLContext,
    items: list[tuple[str, Queued]],
    *,
    connect_timeout: float = 5.0,
    timeout: float = 30.0,
) -> dict[str, Ack]:
    """Store *items* (volume UUID, queued packet) on *server*; return acks by UUID."""
    acks: dict[str, Ack] = {}
    try:
        sock = socket.create_connection((server.host, server.port), timeout=connect_timeout)
    except OSError as e:
        raise TransportError(f"{server}: {e.strerror or e}") from None
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        sock.sendall(ESCROW_LINE)
        with ctx.wrap_socket(sock, server_side=True) as tls:
            for uuid, q in items:
                tls.sendall(json_frame({"op": "store", "volume_uuid": uuid,
                                        "created": q.created, "sha256": q.sha256}))
                tls.sendall(frame(q.packet))
                reply = _reply(tls, deadline)
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
            tls.sendall(frame(b""))
            try:
                tls.unwrap()
            except (ssl.SSLError, OSError):
                pass
    except TimeoutError:
        raise TransportError(f"{server}: timed out") from None
    except ssl.SSLError as e:
        raise TransportError(f"{server}: TLS: {e.reason or e}") from None
    except WireError as e:
        raise TransportError(f"{server}: {e}") from None
    except OSError as e:
        raise TransportError(f"{server}: {e.strerror or e}") from None
    finally:
        sock.close()
    return acks
