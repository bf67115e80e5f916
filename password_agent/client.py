"""Fetching the encrypted secret from key servers (protocol 1), and ``mandos-client``.

The client connects, sends the version line, then acts as the TLS *server*
presenting its Ed25519 key as a raw public key (GnuTLS, :mod:`mandos_core.tls`).  It reads the OpenPGP message to EOF (bounded
in size and time) and decrypts it locally.  Zero bytes means "refused": the
server never says why.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from mandos_core import gnutls, tls
from mandos_core.address import Server, parse_server  # noqa: F401 - re-exported
from mandos_core.protocol import MAX_SECRET_SIZE, VERSION_LINE
from mandos_core.tls import ClientTLS, UnpinnedServer

log = logging.getLogger("mandos-client")


class FetchError(Exception):
    def __init__(self, server: Server, reason: str) -> None:
        super().__init__(f"{server}: {reason}")
        self.server = server
        self.reason = reason


class Refused(FetchError):
    def __init__(self, server: Server) -> None:
        super().__init__(server, "the server sent no secret (refused)")


def fetch(
    server: Server,
    ctx: ClientTLS,
    *,
    connect_timeout: float = 5.0,
    timeout: float = 10.0,
    cancel: threading.Event | None = None,
) -> bytes:
    """Fetch the encrypted secret from one server; raise :class:`FetchError` on failure.

    *timeout* bounds the whole exchange after the connection is made, so a
    server that accepts and then stalls cannot hold us longer than that.
    """
    start = time.monotonic()
    try:
        sock = socket.create_connection((server.host, server.port), timeout=connect_timeout)
    except TimeoutError:
        raise FetchError(server, "connection timed out") from None
    except OSError as e:
        raise FetchError(server, e.strerror or str(e)) from None
    deadline = time.monotonic() + timeout
    stop = cancel.is_set if cancel is not None else None
    session: gnutls.Session | None = None
    chunks: list[bytes] = []
    try:
        sock.settimeout(timeout)
        sock.sendall(VERSION_LINE)
        sock.setblocking(False)
        fd = sock.fileno()
        session = gnutls.Session(fd, server=True, credentials=ctx.credentials,
                                 priority=ctx.priority, request_peer_key=bool(ctx.pins))
        tls.drive(session, fd, session.handshake, deadline, stop)
        ctx.check_server(session, str(server))
        size = 0
        while True:
            chunk = tls.drive(session, fd, lambda: session.recv(16384), deadline, stop)  # type: ignore[union-attr]
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_SECRET_SIZE:
                raise FetchError(server, f"secret larger than {MAX_SECRET_SIZE} bytes")
            chunks.append(chunk)
    except tls.TLSTimeout:
        raise FetchError(server, "timed out waiting for the secret") from None
    except TimeoutError:
        raise FetchError(server, "timed out") from None
    except gnutls.GnuTLSError as e:
        raise FetchError(server, f"TLS: {e}") from None
    except UnpinnedServer as e:
        raise FetchError(server, str(e)) from None
    except OSError as e:
        raise FetchError(server, e.strerror or str(e)) from None
    finally:
        if session is not None:
            session.close()
        sock.close()
    data = b"".join(chunks)
    if not data:
        raise Refused(server)
    log.debug("received %d bytes from %s in %.0f ms", len(data), server,
              (time.monotonic() - start) * 1000)
    return data


#: At most this many fetches run at once, in the agent and in fetch_any(): a flood of
#: announced (or listed) servers costs a longer line, never more threads.
MAX_CONCURRENT_FETCHES = 16


def fetch_any(
    servers: list[Server],
    ctx: ClientTLS,
    *,
    connect_timeout: float = 5.0,
    timeout: float = 10.0,
    cancel: threading.Event | None = None,
) -> tuple[Server, bytes]:
    """Ask *servers* at once (at most MAX_CONCURRENT_FETCHES at a time); return the first secret.

    Raise the last error otherwise.  *cancel* (set by a signal handler, say) ends the
    wait at once; the fetches still running see it within half a second.
    """
    if not servers:
        raise ValueError("no servers to ask")
    done = threading.Event()
    lock = threading.Lock()
    result: list[tuple[Server, bytes]] = []
    errors: list[FetchError] = []
    stop = threading.Event()
    line = list(reversed(servers))

    def worker() -> None:
        while not stop.is_set():
            with lock:
                if not line:
                    return
                server = line.pop()
            try:
                data = fetch(server, ctx, connect_timeout=connect_timeout, timeout=timeout,
                             cancel=stop)
            except FetchError as e:
                log.debug("%s", e)
                with lock:
                    errors.append(e)
                    if len(errors) == len(servers):
                        done.set()
                continue
            with lock:
                if not result:
                    result.append((server, data))
                done.set()
            return

    for i in range(min(len(servers), MAX_CONCURRENT_FETCHES)):
        threading.Thread(target=worker, daemon=True, name=f"fetch {i}").start()
    rounds = -(-len(servers) // MAX_CONCURRENT_FETCHES)
    t_end = time.monotonic() + rounds * (connect_timeout + timeout) + 1
    while not done.wait(0.2):
        if (cancel is not None and cancel.is_set()) or time.monotonic() > t_end:
            break
    stop.set()
    with lock:
        if result:
            return result[0]
        if errors:
            raise errors[-1] if len(errors) == 1 else FetchError(
                errors[-1].server, "; ".join(str(e) for e in errors))
    raise FetchError(servers[0], "timed out")
