"""Fetching the encrypted secret from key servers (protocol 1), and ``mandos-client``.

The client connects, sends the version line, then acts as the TLS *server*
with its Ed25519 certificate.  It reads the OpenPGP message to EOF (bounded
in size and time) and decrypts it locally.  Zero bytes means "refused": the
server never says why.
"""

from __future__ import annotations

import argparse
import logging
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import log as logsetup
from .gpg import Decryptor, GpgError
from .protocol import MAX_SECRET_SIZE, VERSION_LINE
from .secret import Secret
from .tlskeys import DEFAULT_KEYDIR, KeyError_, KeyFiles, server_context

log = logging.getLogger("mandos-client")

EXIT_OK = 0
EXIT_NO_SECRET = 1
EXIT_USAGE = 2
EXIT_KEYS = 3


@dataclass(frozen=True)
class Server:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_server(text: str) -> Server:
    """Parse ``HOST:PORT``, ``[V6ADDR]:PORT`` or ``[fe80::1%eth0]:PORT``."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [ADDRESS]:PORT")
        port_s = rest[1:]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as [ADDRESS]:PORT")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"{text!r}: port must be a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port out of range")
    return Server(host, port)


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
    ctx: ssl.SSLContext,
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
    try:
        sock.settimeout(timeout)
        sock.sendall(VERSION_LINE)
        with ctx.wrap_socket(sock, server_side=True) as tls:
            chunks: list[bytes] = []
            size = 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or (cancel is not None and cancel.is_set()):
                    raise FetchError(server, "timed out waiting for the secret")
                tls.settimeout(min(left, 0.5) if cancel is not None else left)
                try:
                    chunk = tls.recv(16384)
                except TimeoutError:
                    continue
                except ssl.SSLZeroReturnError:
                    break
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_SECRET_SIZE:
                    raise FetchError(server, f"secret larger than {MAX_SECRET_SIZE} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise FetchError(server, "timed out") from None
    except ssl.SSLError as e:
        raise FetchError(server, f"TLS: {e.reason or e}") from None
    except OSError as e:
        raise FetchError(server, e.strerror or str(e)) from None
    finally:
        sock.close()
    data = b"".join(chunks)
    if not data:
        raise Refused(server)
    log.debug("received %d bytes from %s in %.0f ms", len(data), server,
              (time.monotonic() - start) * 1000)
    return data


def fetch_any(
    servers: list[Server],
    ctx: ssl.SSLContext,
    *,
    connect_timeout: float = 5.0,
    timeout: float = 10.0,
    cancel: threading.Event | None = None,
) -> tuple[Server, bytes]:
    """Ask all *servers* at once; return the first secret.  Raise the last error otherwise."""
    if not servers:
        raise ValueError("no servers to ask")
    done = threading.Event()
    lock = threading.Lock()
    result: list[tuple[Server, bytes]] = []
    errors: list[FetchError] = []
    stop = threading.Event()

    def worker(server: Server) -> None:
        try:
            data = fetch(server, ctx, connect_timeout=connect_timeout, timeout=timeout,
                         cancel=stop)
        except FetchError as e:
            log.debug("%s", e)
            with lock:
                errors.append(e)
                if len(errors) == len(servers):
                    done.set()
            return
        with lock:
            if not result:
                result.append((server, data))
            done.set()

    for s in servers:
        threading.Thread(target=worker, args=(s,), daemon=True, name=f"fetch {s}").start()
    budget = connect_timeout + timeout + 1
    t_end = time.monotonic() + budget
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mandos-client",
        description="Fetch this machine's LUKS passphrase from a Mandos key server, "
        "decrypt it with the machine's OpenPGP key and print it on stdout (no newline).",
        epilog="Exit status: 0 the passphrase was printed; 1 no server gave a secret "
        "(refused, unreachable or timed out); 2 usage error; 3 key files or gpg failed. "
        "The server never says why it refuses; its audit log does.",
    )
    p.add_argument("--connect", metavar="HOST:PORT", action="append", required=True,
                   help="key server to ask; repeat to ask several at once "
                   "(IPv6 as [ADDRESS]:PORT, link-local as [fe80::1%%eth0]:PORT)")
    p.add_argument("--keydir", type=Path, default=DEFAULT_KEYDIR,
                   help="directory with the key files (default: %(default)s)")
    for opt, dest, name in (("--pubkey", "pubkey", "pubkey.txt"),
                            ("--seckey", "seckey", "seckey.txt"),
                            ("--tls-pubkey", "tls_pubkey", "tls-pubkey.pem"),
                            ("--tls-privkey", "tls_privkey", "tls-privkey.pem")):
        p.add_argument(opt, dest=dest, type=Path, metavar="FILE",
                       help=f"use FILE instead of KEYDIR/{name}")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="give up after this long (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="log every step to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logsetup.setup("mandos-client", args.debug)
    try:
        servers = [parse_server(s) for s in args.connect]
    except ValueError as e:
        print(f"mandos-client: --connect {e}", file=sys.stderr)
        return EXIT_USAGE
    keys = KeyFiles.from_dir(args.keydir, pubkey=args.pubkey, seckey=args.seckey,
                             tls_pubkey=args.tls_pubkey, tls_privkey=args.tls_privkey)
    # Import the OpenPGP keys while the network exchange runs.
    gpg_box: list[Decryptor | BaseException] = []

    def start_gpg() -> None:
        try:
            gpg_box.append(Decryptor(keys.seckey, keys.pubkey))
        except BaseException as e:  # handed to the main thread
            gpg_box.append(e)

    gpg_thread = threading.Thread(target=start_gpg, daemon=True)
    gpg_thread.start()
    decryptor: Decryptor | None = None
    try:
        try:
            ctx = server_context(keys)
            server, message = fetch_any(servers, ctx, timeout=args.timeout,
                                        connect_timeout=min(5.0, args.timeout))
        except KeyError_ as e:
            print(f"mandos-client: {e}", file=sys.stderr)
            return EXIT_KEYS
        except FetchError as e:
            print(f"mandos-client: {e}", file=sys.stderr)
            return EXIT_NO_SECRET
        gpg_thread.join()
        got = gpg_box[0]
        if isinstance(got, BaseException):
            if isinstance(got, GpgError):
                print(f"mandos-client: {got}", file=sys.stderr)
                return EXIT_KEYS
            raise got
        decryptor = got
        try:
            secret: Secret = decryptor.decrypt(message)
        except GpgError as e:
            print(f"mandos-client: {e}", file=sys.stderr)
            return EXIT_KEYS
        log.debug("decrypted the secret from %s", server)
        with secret:
            sys.stdout.buffer.write(secret.reveal())
            sys.stdout.buffer.flush()
        return EXIT_OK
    finally:
        gpg_thread.join()
        for d in gpg_box:
            if isinstance(d, Decryptor):
                d.close()


if __name__ == "__main__":
    sys.exit(main())
