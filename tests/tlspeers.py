"""TLS peers for tests: the client side done by hand, honest or hostile.

- :func:`exchange` plays a client machine with GnuTLS and a raw public key
  (what Mandos 1.8 and our clients do) and returns exactly the bytes the key
  server sent, and the key the server proved if we asked for one.  Options
  make it hostile: present one key and sign with another, offer only X.509,
  a different priority string.
- :func:`legacy_fetch` plays a client enrolled before raw keys: Python's
  ``ssl`` presenting a self-signed X.509 certificate around the same key.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mandos_core import gnutls, tls
from mandos_core.address import parse_server
from mandos_core.protocol import VERSION_LINE
from mandos_core.tls import PeerKey


def tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Restrict *ctx* to TLS 1.3 without session tickets (Python ssl peers)."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


@dataclass
class Result:
    data: bytes
    server_key: PeerKey | None
    error: gnutls.GnuTLSError | None = None
    #: our end of the connection, ``host:port``: what the server audits as MANDOS_PEER
    local: str = ""


def exchange(keydir: Path, address: str, *, line: bytes = VERSION_LINE,
             spki_pem: bytes | None = None, key_pem: bytes | None = None,
             skip_match: bool = False, x509_cert_pem: bytes | None = None,
             priority: str | None = None, request_server_key: bool = False,
             send_after: bytes = b"", timeout: float = 10.0) -> Result:
    """One exchange as the client machine (the TLS server); never raises on TLS errors."""
    srv = parse_server(address)
    spki_pem = spki_pem if spki_pem is not None else (keydir / "tls-pubkey.pem").read_bytes()
    key_pem = key_pem if key_pem is not None else (keydir / "tls-privkey.pem").read_bytes()
    with gnutls.Credentials() as cred:
        if x509_cert_pem is not None:
            cred.set_x509(x509_cert_pem, key_pem, skip_match=skip_match)
        else:
            cred.set_rawpk(spki_pem, key_pem, skip_match=skip_match)
        prio = priority or tls.effective_priority(None, server=False)
        with socket.create_connection((srv.host, srv.port), timeout=timeout) as s:
            host, port = s.getsockname()[:2]
            local = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            s.sendall(line)
            s.setblocking(False)
            fd = s.fileno()
            deadline = time.monotonic() + timeout
            with gnutls.Session(fd, server=True, credentials=cred, priority=prio,
                                request_peer_key=request_server_key) as sess:
                try:
                    tls.drive(sess, fd, sess.handshake, deadline)
                except gnutls.GnuTLSError as e:
                    return Result(b"", None, e, local)
                key = None
                try:
                    key = tls.peer_key(sess)
                except tls.PeerKeyError:
                    pass
                if send_after:
                    tls.send_all(sess, fd, send_after, deadline)
                data = b""
                try:
                    while chunk := tls.drive(sess, fd, lambda: sess.recv(4096), deadline):
                        data += chunk
                except gnutls.GnuTLSError as e:
                    return Result(data, key, e, local)
                return Result(data, key, None, local)


def self_signed_cert(keydir: Path) -> bytes:
    """A self-signed certificate around the key in *keydir* (as our old keygen wrote)."""
    from mandos_keygen.certificate import self_signed_pem

    return self_signed_pem((keydir / "tls-privkey.pem").read_bytes())


def legacy_context(keydir: Path) -> ssl.SSLContext:
    """Python ssl as the client machine, with an X.509 certificate (pre-raw-key clients)."""
    ctx = tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.verify_mode = ssl.CERT_NONE
    with tempfile.TemporaryDirectory() as tmp:
        cert = Path(tmp) / "cert.pem"
        cert.write_bytes(self_signed_cert(keydir))
        ctx.load_cert_chain(cert, keydir / "tls-privkey.pem")
    return ctx


def legacy_fetch(keydir: Path, address: str, timeout: float = 10.0) -> bytes:
    srv = parse_server(address)
    ctx = legacy_context(keydir)
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as s:
        s.sendall(VERSION_LINE)
        with ctx.wrap_socket(s, server_side=True) as t:
            data = b""
            while True:
                try:
                    chunk = t.recv(4096)
                except ssl.SSLZeroReturnError:
                    break
                if not chunk:
                    break
                data += chunk
            return data


class Session:
    """A blocking session as the client machine, for tests that talk the protocol by hand:
    ``sendall`` and ``recv`` (``b""`` once the server closed or aborted)."""

    def __init__(self, keydir: Path, address: str, line: bytes, timeout: float = 20) -> None:
        srv = parse_server(address)
        self.cred = gnutls.Credentials()
        self.cred.set_rawpk((keydir / "tls-pubkey.pem").read_bytes(),
                            (keydir / "tls-privkey.pem").read_bytes())
        self.sock = socket.create_connection((srv.host, srv.port), timeout=timeout)
        self.sock.sendall(line)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.deadline = time.monotonic() + timeout
        self.session = gnutls.Session(self.fd, server=True, credentials=self.cred,
                                      priority=tls.effective_priority(None, server=False),
                                      request_peer_key=True)
        tls.drive(self.session, self.fd, self.session.handshake, self.deadline)

    def sendall(self, data: bytes) -> None:
        """Send what the server takes: a server that refused and closed makes the rest
        go nowhere (as for a real peer), and :meth:`recv` then sees the end."""
        try:
            tls.send_all(self.session, self.fd, data, self.deadline)
        except (gnutls.GnuTLSError, OSError):
            pass

    def recv(self, n: int) -> bytes:
        try:
            return tls.drive(self.session, self.fd, lambda: self.session.recv(n), self.deadline)
        except (gnutls.GnuTLSError, OSError):
            return b""

    def server_key(self) -> PeerKey | None:
        try:
            return tls.peer_key(self.session)
        except tls.PeerKeyError:
            return None

    def close(self) -> None:
        self.session.close()
        self.sock.close()
        self.cred.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
