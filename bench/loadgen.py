"""A load generator that stands in for many Mandos clients: real TLS, real key_ids.

Each simulated client has its own Ed25519 key (so its own key_id), connects,
sends the version line and does the TLS *server* side of protocol 1 exactly as
a client machine does, then reads to EOF.  It does not decrypt: the herd
benchmark measures the key server.  Two modes, one asyncio process each:

- ``rawpk``: what Mandos 1.8's client and ours do now.  GnuTLS
  (:class:`mandos_core.gnutls.Session` with ``server=True``) presents the key as
  an RFC 7250 raw public key, driven by :class:`mandos_core.tls.AsyncTLS` on the
  socket's descriptor, with Mandos's priority string.
- ``x509``: a legacy client, enrolled before raw keys: Python's ``ssl``
  presenting a self-signed X.509 certificate around the same key.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mandos_core import gnutls, tls
from mandos_core.protocol import VERSION_LINE, key_id
from mandos_keygen.certificate import self_signed_pem

Mode = Literal["rawpk", "x509"]
MODES: tuple[Mode, ...] = ("rawpk", "x509")


def tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Restrict *ctx* to TLS 1.3 without session tickets (Python ssl peers)."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


@dataclass(frozen=True)
class Identity:
    name: str
    key_id: str
    cert: Path
    key: Path
    pub: Path
    secret: bytes

    def context(self) -> ssl.SSLContext:
        ctx = tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def credentials(self) -> gnutls.Credentials:
        cred = gnutls.Credentials()
        cred.set_rawpk(self.pub.read_bytes(), self.key.read_bytes())
        return cred

    def section(self, host: str = "127.0.0.1", *, mandos: bool = False) -> str:
        """Its clients.conf section; for Debian's Mandos (*mandos*) with a ``fingerprint``,
        which Mandos requires (unused: raw-key clients are found by key_id)."""
        b64 = base64.b64encode(self.secret).decode()
        lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
        fpr = f"fingerprint = {self.key_id[:40]}\n" if mandos else ""
        return (f"[{self.name}]\nhost = {host}\nkey_id = {self.key_id}\n{fpr}secret =\n    "
                + "\n    ".join(lines) + "\n")


def make_identities(d: Path, n: int, prefix: str = "herd") -> list[Identity]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        k = ed25519.Ed25519PrivateKey.generate()
        priv = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
        pub = k.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
        spki = k.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
        name = f"{prefix}{i:05d}"
        (d / f"{name}.key").write_bytes(priv)
        (d / f"{name}.pub").write_bytes(pub)
        (d / f"{name}.crt").write_bytes(self_signed_pem(priv, name))
        out.append(Identity(name, key_id(spki), d / f"{name}.crt", d / f"{name}.key",
                            d / f"{name}.pub", os.urandom(600)))
    return out


# --- X.509 (Python ssl) ---------------------------------------------------------------------


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(bytes(self.data))


async def fetch_x509(host: str, port: int, ctx: ssl.SSLContext, timeout: float = 30,
                     source: str | None = None) -> bytes:
    loop = asyncio.get_running_loop()
    transport, proto = await asyncio.wait_for(
        loop.create_connection(_Client, host, port,
                               local_addr=(source, 0) if source else None), timeout)
    try:
        transport.write(VERSION_LINE)
        tls_transport = await asyncio.wait_for(
            loop.start_tls(transport, proto, ctx, server_side=True), timeout)
        if tls_transport is None:
            return b""
        transport = tls_transport
        return await asyncio.wait_for(proto.done, timeout)
    finally:
        transport.close()


fetch_one = fetch_x509  # the old name


# --- raw public keys (GnuTLS) ---------------------------------------------------------------

#: The client machine's priority string: Mandos 1.8's default, TLS 1.3 only.
RAWPK_PRIORITY = tls.effective_priority(None, server=False)


async def fetch_rawpk(host: str, port: int, cred: gnutls.Credentials,
                      timeout: float = 30, source: str | None = None) -> bytes:
    """One exchange as a Mandos 1.8 client machine: raw public key, read to EOF."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    session: gnutls.Session | None = None
    try:
        sock.setblocking(False)
        if source:
            sock.bind((source, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        await loop.sock_sendall(sock, VERSION_LINE)
        fd = sock.fileno()
        session = gnutls.Session(fd, server=True, credentials=cred, priority=RAWPK_PRIORITY)
        t = tls.AsyncTLS(loop, fd, session)
        await t.handshake(deadline)
        data = bytearray()
        while chunk := await t.recv(16384, deadline):
            data += chunk
        return bytes(data)
    finally:
        if session is not None:
            session.close()
        sock.close()


# --- the herd --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HerdResult:
    seconds: float
    ok: int
    failed: int
    errors: tuple[str, ...]


def source_address(host: str, i: int) -> str | None:
    """Client *i*'s own loopback address (127.1.x.y) when *host* is IPv4 loopback.

    A herd comes from N machines; mandosd caps connections per address (256),
    so N simulated clients on one address would be cut off at the cap."""
    if not host.startswith("127.") or i >= 250 * 250:
        return None
    return f"127.1.{i // 250}.{i % 250 + 1}"


async def herd(host: str, port: int, clients: list[Identity], timeout: float = 60,
               mode: Mode = "x509") -> HerdResult:
    """All *clients* ask at the same moment; return when every one has an answer."""
    # keys and contexts are prepared before the clock starts
    sources = [source_address(host, i) for i in range(len(clients))]
    if mode == "rawpk":
        creds = [c.credentials() for c in clients]
        jobs = [fetch_rawpk(host, port, cr, timeout, src) for cr, src in zip(creds, sources,
                                                                            strict=True)]
    else:
        creds = []
        jobs = [fetch_x509(host, port, c.context(), timeout, src)
                for c, src in zip(clients, sources, strict=True)]
    try:
        start = time.perf_counter()
        results = await asyncio.gather(*jobs, return_exceptions=True)
        elapsed = time.perf_counter() - start
    finally:
        for cr in creds:
            cr.close()
    ok = sum(1 for c, r in zip(clients, results, strict=True) if r == c.secret)
    errors = tuple(sorted({type(r).__name__ + (f": {r}" if str(r) else "")
                           for r in results if isinstance(r, BaseException)}))
    wrong = sum(1 for c, r in zip(clients, results, strict=True)
                if isinstance(r, bytes) and r != c.secret)
    if wrong:
        errors += (f"{wrong} answered with other bytes (zero bytes: refused)",)
    return HerdResult(elapsed, ok, len(clients) - ok, errors)
