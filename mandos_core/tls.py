"""Protocol 1's TLS: raw public keys through GnuTLS, for both roles.

Roles are inverted (Mandos's design): the *client machine* is the TLS server
and presents its Ed25519 key as an RFC 7250 raw public key; the *key server*
is the TLS client.  The key server accepts a raw key or, for clients enrolled
before raw keys, the same key inside a self-signed X.509 certificate; either
way the identity is :func:`~mandos_core.protocol.key_id` of the
SubjectPublicKeyInfo, and nothing is verified beyond the handshake's own
signature (CertificateVerify), which proves the peer holds the private key.

Server identity (beyond Mandos): the key server presents its own raw public
key when the client machine asks for it (``request_peer_key``), so a client
that pinned that key at enrollment can tell the real key server from a fake.

Two drivers over one non-blocking :class:`~mandos_core.gnutls.Session`:
:func:`blocking_handshake` etc. wait with ``poll`` (the client side: one
thread, a deadline on every wait), and :class:`AsyncTLS` waits on the asyncio
loop (the key server: one process, no thread per connection).

Standard library + libgnutls only: the initrd agent imports this module.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from . import gnutls
from .gnutls import GnuTLSError, WouldBlock
from .protocol import KEY_ALGORITHMS, DERError, key_id, spki_algorithm, spki_from_certificate

if TYPE_CHECKING:
    import asyncio

T = TypeVar("T")

#: What Mandos 1.8's client and server use (mandos.conf(5)); the client's role uses it as is.
MANDOS_PRIORITY = ("SECURE128:!CTYPE-X.509:+CTYPE-RAWPK:!RSA:!VERS-ALL:+VERS-TLS1.3"
                   ":%PROFILE_ULTRA")
#: Groups in SECURE128's set, X25519 first.  GnuTLS offers SECP256R1 first, so a client
#: machine picks P-256 and the key server pays a P-256 key share and exchange per
#: connection; X25519 first costs the key server about 0.08 ms less CPU per handshake
#: (bench/profile_herd).  The same groups: a peer that wants another still gets it.
_GROUPS_X25519_FIRST = ("-GROUP-ALL:+GROUP-X25519:+GROUP-SECP256R1:+GROUP-SECP384R1"
                        ":+GROUP-SECP521R1:+GROUP-X448:+GROUP-FFDHE2048:+GROUP-FFDHE3072"
                        ":+GROUP-FFDHE4096:+GROUP-FFDHE6144:+GROUP-FFDHE8192")
#: The key server's default: Mandos's, but also accepting the key in an X.509 certificate
#: (clients enrolled before raw keys), X25519 preferred.
SERVER_PRIORITY = ("SECURE128:" + _GROUPS_X25519_FIRST
                   + ":+CTYPE-RAWPK:!RSA:!VERS-ALL:+VERS-TLS1.3:%PROFILE_ULTRA")
#: Appended to any configured priority string: TLS 1.3 only, whatever it says.
TLS13_ONLY = ":!VERS-ALL:+VERS-TLS1.3"

CERT_TYPES = {gnutls.CRT_RAWPK: "raw-public-key", gnutls.CRT_X509: "x509"}


def effective_priority(configured: str | None, *, server: bool) -> str:
    """The priority string to use: the configured one (Mandos's ``priority =``) or ours,
    always restricted to TLS 1.3.  Obsolete OpenPGP certificate types (old Mandos
    examples) mean raw public keys, as in Mandos 1.8."""
    text = (configured or "").strip() or (SERVER_PRIORITY if server else MANDOS_PRIORITY)
    text = text.replace("CTYPE-OPENPGP", "CTYPE-RAWPK")
    return text + TLS13_ONLY


def allows_x509(priority: str) -> bool:
    """Whether *priority* leaves X.509 certificates allowed for the client machine's key.

    GnuTLS falls back to X.509 when a peer ignores the certificate-type extension
    (OpenSSL does), so a string that removes X.509 (Mandos's default) must be
    enforced after the handshake: the last CTYPE keyword about it wins."""
    allowed = True
    for word in priority.replace(";", ":").split(":"):
        w = word.strip().upper()
        if w[1:] in ("CTYPE-X.509", "CTYPE-X509", "CTYPE-SRV-X509", "CTYPE-SRV-X.509",
                     "CTYPE-ALL", "CTYPE-SRV-ALL"):
            allowed = w[0] == "+" or (w[0] not in "!-" and allowed)
    return allowed


def check_priority(text: str) -> None:
    """Raise :class:`gnutls.PriorityError` if GnuTLS does not accept *text*."""
    import socket

    a, b = socket.socketpair()
    try:
        with gnutls.Credentials() as cred:
            gnutls.Session(a.fileno(), server=False, credentials=cred,
                           priority=effective_priority(text, server=True)).close()
    finally:
        a.close()
        b.close()


@dataclass(frozen=True)
class PeerKey:
    """Who the peer proved to be: its SPKI's key_id and how it presented it."""

    key_id: str
    cert_type: str  # "raw-public-key" or "x509"
    spki: bytes


class PeerKeyError(Exception):
    """The peer presented no key we can identify it by.  ``reason`` is for audit logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def peer_key(session: gnutls.Session, *, x509: bool = True) -> PeerKey:
    """The peer's key, after a completed handshake (TLS 1.3 is checked here too).

    With *x509* false, a key inside an X.509 certificate is refused."""
    if not session.version_is_tls13():
        raise PeerKeyError("not-tls13", "the peer did not negotiate TLS 1.3")
    ctype = session.peer_certificate_type()
    der = session.peer_certificate()
    if der is None:
        raise PeerKeyError("no-certificate", "the peer presented no key")
    if ctype == gnutls.CRT_RAWPK:
        spki = der
    elif ctype == gnutls.CRT_X509:
        if not x509:
            raise PeerKeyError("certificate-type-not-allowed",
                               "an X.509 certificate, which the priority string excludes")
        try:
            spki = spki_from_certificate(der)
        except DERError as e:
            raise PeerKeyError("bad-certificate", f"unusable certificate: {e}") from None
    else:
        raise PeerKeyError("unsupported-certificate-type", f"certificate type {ctype}")
    try:
        algorithm = spki_algorithm(spki)
    except DERError as e:
        raise PeerKeyError("bad-certificate", f"unusable public key: {e}") from None
    if algorithm not in KEY_ALGORITHMS.values():
        raise PeerKeyError("unsupported-key-type",
                           f"a {algorithm} key; only Ed25519 and Ed448 identify clients")
    return PeerKey(key_id(spki), CERT_TYPES[ctype], spki)


class UnpinnedServer(Exception):
    """The key server did not prove a key this client pinned."""


@dataclass
class ClientTLS:
    """The client machine's TLS side: its raw public key, priorities and server pins.

    *pins* are key_ids of key servers this machine was told about at enrollment.
    With pins and *require_pin* (the default when pins exist), a server that
    does not prove one of them is not trusted with anything, secrets included.
    """

    credentials: gnutls.Credentials
    priority: str
    pins: frozenset[str] = frozenset()
    require_pin: bool = True

    def server_key(self, session: gnutls.Session) -> PeerKey | None:
        """The key the key server proved in this handshake, if it presented one."""
        try:
            return peer_key(session)
        except PeerKeyError:
            return None

    def check_server(self, session: gnutls.Session, name: str) -> PeerKey | None:
        """Raise :class:`UnpinnedServer` when pins are required and not proved."""
        key = self.server_key(session) if self.pins else None
        if self.pins and self.require_pin and (key is None or key.key_id not in self.pins):
            what = "presented no key" if key is None else f"proved key {key.key_id[:16]}…"
            raise UnpinnedServer(f"{name} is not a pinned key server ({what})")
        return key

    def proved_pin(self, session: gnutls.Session) -> bool:
        key = self.server_key(session)
        return key is not None and key.key_id in self.pins


# --- blocking driver (client side) -------------------------------------------------------


class TLSTimeout(Exception):
    pass


def _wait(fd: int, write: bool, deadline: float, cancel: Callable[[], bool] | None) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (cancel is not None and cancel()):
            raise TLSTimeout()
        step = min(left, 0.25) if cancel is not None else left
        if poller.poll(step * 1000):
            return


def drive(session: gnutls.Session, fd: int, op: Callable[[], T], deadline: float,
          cancel: Callable[[], bool] | None = None) -> T:
    """Run one non-blocking *op* to completion, waiting on *fd* until *deadline*."""
    while True:
        try:
            return op()
        except WouldBlock as wb:
            _wait(fd, wb.write, deadline, cancel)


def send_all(session: gnutls.Session, fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        n = drive(session, fd, partial(session.send, bytes(view[:16384])), deadline)
        view = view[n:]


# --- asyncio driver (key server side) ----------------------------------------------------


async def wait_fd(loop: asyncio.AbstractEventLoop, fd: int, write: bool,
                  deadline: float | None) -> None:
    """Wait on the loop until *fd* is readable (or writable); TimeoutError at *deadline*
    (loop time).  No thread, no polling: one reader/writer callback and one timer."""
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    def expire() -> None:
        if not fut.done():
            fut.set_exception(TimeoutError())

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    timer = loop.call_at(deadline, expire) if deadline is not None else None
    try:
        await fut
    finally:
        if timer is not None:
            timer.cancel()
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


class AsyncTLS:
    """One session driven by the asyncio loop: every wait is a reader/writer callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, session: gnutls.Session) -> None:
        self.loop = loop
        self.fd = fd
        self.session = session

    async def wait(self, write: bool, deadline: float | None) -> None:
        """Wait until the socket is readable/writable; TimeoutError at *deadline* (loop time)."""
        await wait_fd(self.loop, self.fd, write, deadline)

    async def run(self, op: Callable[[], T], deadline: float | None) -> T:
        while True:
            try:
                return op()
            except WouldBlock as wb:
                await self.wait(wb.write, deadline)

    async def handshake(self, deadline: float) -> None:
        await self.run(self.session.handshake, deadline)

    async def send_all(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            chunk = bytes(view[:16384])
            n = await self.run(partial(self.session.send, chunk), deadline)
            view = view[n:]

    async def recv(self, size: int, deadline: float | None) -> bytes:
        return await self.run(lambda: self.session.recv(size), deadline)

    async def bye(self, deadline: float) -> None:
        try:
            await self.run(self.session.bye, deadline)
        except (GnuTLSError, TimeoutError, OSError):
            pass
