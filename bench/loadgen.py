"""A load generator that stands in for many Mandos clients: real TLS, real key_ids.

Each simulated client has its own Ed25519 key and self-signed certificate (so
its own key_id), connects, sends the version line and does the TLS *server*
side of protocol 1 exactly as ``mandos-client`` does, then reads to EOF.  It
does not decrypt: the herd benchmark measures the key server.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mandos_core.protocol import VERSION_LINE, key_id
from mandos_keygen.certificate import self_signed_pem


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
    secret: bytes

    def context(self) -> ssl.SSLContext:
        ctx = tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def section(self, host: str = "127.0.0.1") -> str:
        b64 = base64.b64encode(self.secret).decode()
        lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
        return (f"[{self.name}]\nhost = {host}\nkey_id = {self.key_id}\nsecret =\n    "
                + "\n    ".join(lines) + "\n")


def make_identities(d: Path, n: int, prefix: str = "herd") -> list[Identity]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        k = ed25519.Ed25519PrivateKey.generate()
        priv = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
        spki = k.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
        name = f"{prefix}{i:05d}"
        (d / f"{name}.key").write_bytes(priv)
        (d / f"{name}.crt").write_bytes(self_signed_pem(priv, name))
        out.append(Identity(name, key_id(spki), d / f"{name}.crt", d / f"{name}.key",
                            os.urandom(600)))
    return out


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


async def fetch_one(host: str, port: int, ctx: ssl.SSLContext, timeout: float = 30) -> bytes:
    loop = asyncio.get_running_loop()
    transport, proto = await asyncio.wait_for(
        loop.create_connection(_Client, host, port), timeout)
    try:
        transport.write(VERSION_LINE)
        tls = await asyncio.wait_for(
            loop.start_tls(transport, proto, ctx, server_side=True), timeout)
        if tls is None:
            return b""
        transport = tls
        return await asyncio.wait_for(proto.done, timeout)
    finally:
        transport.close()


@dataclass(frozen=True)
class HerdResult:
    seconds: float
    ok: int
    failed: int
    errors: tuple[str, ...]


async def herd(host: str, port: int, clients: list[Identity], timeout: float = 60) -> HerdResult:
    """All *clients* ask at the same moment; return when every one has an answer."""
    contexts = [c.context() for c in clients]  # prepared before the clock starts
    start = time.perf_counter()
    results = await asyncio.gather(*(fetch_one(host, port, ctx, timeout) for ctx in contexts),
                                   return_exceptions=True)
    elapsed = time.perf_counter() - start
    ok = sum(1 for c, r in zip(clients, results, strict=True) if r == c.secret)
    errors = tuple(sorted({type(r).__name__ + (f": {r}" if str(r) else "")
                           for r in results if isinstance(r, BaseException)}))
    return HerdResult(elapsed, ok, len(clients) - ok, errors)
