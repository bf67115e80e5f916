"""The key server's exchange: one place that reads, bounds, decides and answers.

asyncio, one task per connection; every wait is bounded, so a slow or hostile
peer holds only its own connection.  Database calls run on one worker thread,
never on the event loop.  Every refusal looks the same on the wire: the TLS
handshake completes, then close_notify with zero bytes.  The reason goes to
the audit log only.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mandos_core.protocol import (
    EMPTY_KEY_ID,
    ESCROW_LINE,
    MAX_VERSION_LINE,
    VERSION_LINE,
    DERError,
    key_id,
    spki_from_certificate,
    tls13_only,
)

from . import config as configmod
from . import policy
from .audit import Kind, audit
from .config import Client, Config
from .state import ClientState, StateError, added_client
from .stores import change_listener, open_store

log = logging.getLogger("mandosd.server")
T = TypeVar("T")

# asyncio gives every TLS connection a 256 KiB read buffer; a herd of 500 booting
# clients then costs 125 MiB for buffers alone.  Our peers send a handshake and
# nothing else: twice the largest TLS record is plenty.
asyncio.sslproto.SSLProtocol.max_size = 2 * (16384 + 2048)


@dataclass(frozen=True)
class Limits:
    version_timeout: float = 10.0
    handshake_timeout: float = 10.0
    #: bytes a peer may send after the handshake (it should send none)
    max_peer_data: int = 4096
    approval_poll: float = 0.2
    #: cap on any approval wait, whatever approval_delay says
    max_approval_wait: float = 3600.0


def tls_client_context() -> ssl.SSLContext:
    """The key server's TLS role: the TLS *client*, identifying peers by key_id."""
    ctx = tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # identity is the key_id, checked below
    return ctx


class _Peer(asyncio.Protocol):
    """Buffers the version line, then relays TLS events to the connection task."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        self.loop = loop
        self.limits = limits
        self.buf = bytearray()
        self.line: asyncio.Future[bytes] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.BaseTransport | None = None
        self.after_tls = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.line.done():
            self.buf += data
            nl = self.buf.find(b"\n")
            if nl >= 0 or len(self.buf) >= MAX_VERSION_LINE:
                end = nl + 1 if nl >= 0 else len(self.buf)
                self.line.set_result(bytes(self.buf[:end]))
                if len(self.buf) > end:  # TLS must wait for us; early bytes are hostile
                    self.after_tls = self.limits.max_peer_data + 1
            return
        self.after_tls += len(data)
        if self.after_tls > self.limits.max_peer_data and self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        if not self.line.done():
            self.line.set_result(bytes(self.buf))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.line.done():
            self.line.set_result(bytes(self.buf))
        if not self.lost.done():
            self.lost.set_result(None)


class KeyServer:
    def __init__(
        self,
        configdir: Path,
        statedir: Path,
        *,
        limits: Limits = Limits(),
        clock: Callable[[], float] = time.time,
        state_url: str | None = None,
        server_name: str | None = None,
    ) -> None:
        self.configdir = configdir
        self.statedir = statedir
        self.state_url = state_url
        self.server_name = server_name
        self.limits = limits
        self.clock = clock
        self.ctx = tls_client_context()
        self.db_thread = ThreadPoolExecutor(1, thread_name_prefix="mandosd-db")
        # NORMAL sync: a commit survives the process being killed; only a power cut may
        # lose the last "secret sent" (its deadline extension), which errs on the safe
        # side.  Admin changes (mandos-ctl) are written with FULL sync.
        self.store = open_store(state_url, statedir, durable=False, name=server_name,
                                lazy=True)
        #: wakes approval waits when another server or mandos-ctl changes the client
        self.changes = change_listener(state_url)
        self.config: Config = configmod.load(configdir)
        self.stamp: Any = configmod.config_stamp(configdir)
        try:
            self.store.sync_clients(self.config.clients.values(), clock())
        except StateError as e:
            if not state_url:
                raise
            # a pool whose database is away: serve (refusing) and merge on a later request
            log.error("state store: %s; will retry", e)
            self.stamp = None
        self.active = 0
        self.last_activity = time.monotonic()
        self.served = 0
        audit(Kind.CONFIG_LOADED, f"loaded {len(self.config.clients)} clients from "
              f"{configdir}", clients=len(self.config.clients))

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.db_thread, fn, *args)

    def _reload_if_changed(self) -> None:
        stamp = configmod.config_stamp(self.configdir)
        if stamp == self.stamp:
            return
        try:
            cfg = configmod.load(self.configdir)
        except configmod.ConfigError as e:
            log.error("config changed but cannot be loaded, keeping the old one: %s", e)
            self.stamp = stamp
            return
        self.store.sync_clients(cfg.clients.values(), self.clock())
        self.config, self.stamp = cfg, stamp
        audit(Kind.CONFIG_LOADED, f"reloaded {len(cfg.clients)} clients from {self.configdir}",
              clients=len(cfg.clients))

    def _lookup(self, kid: str) -> tuple[Client | None, ClientState | None]:
        """Runs on the database thread: re-read config if changed, then the client's state."""
        self._reload_if_changed()
        if kid == EMPTY_KEY_ID:
            return None, None
        client = self.config.by_key_id.get(kid) or added_client(self.store, kid, self.configdir)
        if client is None:
            # in a pool, another server's client: refused here with its own reason
            return None, self.store.get_by_key_id(kid) if self.state_url else None
        state = self.store.get(client.name)
        return policy.effective(client, state), state

    async def handle(self, sock_transport: asyncio.BaseTransport, peer: _Peer,
                     peername: str) -> None:
        loop = asyncio.get_running_loop()
        transport: Any = sock_transport
        self.active += 1
        try:
            try:
                line = await asyncio.wait_for(asyncio.shield(peer.line),
                                              self.limits.version_timeout)
            except TimeoutError:
                audit(Kind.PROTOCOL_ERROR, f"{peername}: no version line in time",
                      peer=peername, reason="version-timeout")
                return
            if line not in (VERSION_LINE, ESCROW_LINE) or peer.after_tls:
                audit(Kind.PROTOCOL_ERROR, f"{peername}: unsupported protocol version line",
                      peer=peername, reason="bad-version-line")
                return
            try:
                transport = await asyncio.wait_for(
                    loop.start_tls(sock_transport, peer, self.ctx,  # type: ignore[arg-type]
                                   server_side=False,
                                   ssl_handshake_timeout=self.limits.handshake_timeout),
                    self.limits.handshake_timeout + 1)
            except (TimeoutError, ssl.SSLError, OSError, ConnectionError) as e:
                transport = sock_transport
                reason = getattr(e, "reason", None) or type(e).__name__
                audit(Kind.PROTOCOL_ERROR, f"{peername}: TLS handshake failed: {reason}",
                      peer=peername, reason="tls-handshake")
                return
            if transport is None:
                return
            try:
                der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
                kid = key_id(spki_from_certificate(der))
            except (AttributeError, TypeError, DERError):
                audit(Kind.PROTOCOL_ERROR, f"{peername}: no usable certificate",
                      peer=peername, reason="no-certificate")
                return
            if line == ESCROW_LINE:
                await self._escrow(transport, peer, kid, peername)
                return
            await self._answer(transport, peer, kid, peername)
        except Exception:
            log.exception("%s: internal error; connection dropped", peername)
        finally:
            self.active -= 1
            self.last_activity = time.monotonic()
            if transport is not None and not transport.is_closing():
                transport.close()

    def _decide(self, kid: str) -> tuple[Client | None, ClientState | None, policy.Decision,
                                         str | None]:
        """On the database thread: look up, decide, and record what the decision changes.

        One round trip to the database thread per request: a secret about to be sent is
        recorded (with its new deadline) before it leaves, and a passed deadline disables
        the client.  Returns the client, its state, the decision and an error, if recording
        failed (then nothing is sent).
        """
        client, state = self._lookup(kid)
        now = self.clock()
        decision = policy.decide(client, state, now)
        error = None
        try:
            if decision.verdict is policy.Verdict.SEND and client is not None:
                self._record_sent(client, state, now)
            elif (decision.verdict is policy.Verdict.TIMED_OUT and state is not None
                  and state.enabled):
                self.store.update(state.name, enabled=False)
        except StateError as e:
            error = str(e)
        return client, state, decision, error

    def _record_sent(self, client: Client, state: ClientState | None, now: float) -> None:
        deadline = policy.deadline_after_secret(client, now, state.deadline if state else None)
        self.store.record_secret_sent(client.name, now, deadline)

    async def _answer(self, transport: Any, peer: _Peer, kid: str, peername: str) -> None:
        try:
            client, state, decision, error = await self._db(self._decide, kid)
        except StateError as e:
            log.error("state store: %s", e)
            audit(Kind.PROTOCOL_ERROR, f"{peername}: refused: state store unavailable",
                  key_id=kid, peer=peername, reason="state-unavailable")
            return
        name = client.name if client else state.name if state else None
        if decision.verdict is policy.Verdict.WAIT and client is not None:
            waited = await self._wait_for_approval(client, peer, kid, peername, self.clock(),
                                                   decision.wait_until or self.clock())
            if waited is None:
                return
            decision = waited
            if decision.verdict is policy.Verdict.SEND:
                try:
                    await self._db(self._record_sent, client, state, self.clock())
                except StateError as e:
                    error = str(e)
        if error is not None:
            # refuse rather than hand out a secret we could not record
            log.error("not sending to %s: state store: %s", name, error)
            audit(Kind.PROTOCOL_ERROR, f"not sending to {name}: could not record it",
                  client=name, key_id=kid, peer=peername, reason="state-unavailable")
            return
        if decision.verdict is policy.Verdict.SEND and client is not None:
            transport.write(client.secret)
            self.served += 1
            audit(Kind.SECRET_SENT, f"sent secret to {client.name}", client=client.name,
                  key_id=kid, peer=peername, reason=decision.reason)
            return
        if decision.verdict is policy.Verdict.TIMED_OUT and state is not None and state.enabled:
            audit(Kind.CLIENT_TIMED_OUT, f"{state.name}: timeout passed; client disabled",
                  client=state.name, key_id=kid, reason="deadline passed")
        audit(decision.verdict.value, f"refused {name or 'unknown client'}: {decision.reason}",
              client=name, key_id=kid, peer=peername, reason=decision.reason)

    async def _wait_for_approval(self, client: Client, peer: _Peer, kid: str, peername: str,
                                 requested_at: float, wait_until: float
                                 ) -> policy.Decision | None:
        wait_until = min(wait_until, requested_at + self.limits.max_approval_wait)
        audit(Kind.APPROVAL_REQUESTED, f"{client.name} waits for approval",
              client=client.name, key_id=kid, peer=peername,
              approval_delay=client.approval_delay)
        # what mandos-ctl shows as "Approval Is Pending" / "Last Approval Request"
        with contextlib.suppress(StateError):
            await self._db(lambda: self.store.update(
                client.name, last_approval_request=requested_at,
                approval_pending_until=wait_until))
        try:
            return await self._approval_loop(client, peer, kid, peername, requested_at,
                                             wait_until)
        finally:
            with contextlib.suppress(StateError):
                await self._db(lambda: self.store.update(client.name,
                                                         approval_pending_until=None))

    async def _approval_loop(self, client: Client, peer: _Peer, kid: str, peername: str,
                             requested_at: float, wait_until: float
                             ) -> policy.Decision | None:
        changed: asyncio.Future[None] | None = None
        while True:
            left = wait_until - self.clock()
            # with a pool, a change anywhere wakes us (LISTEN/NOTIFY); else re-read
            poll = left if self.changes.live and changed is not None else min(
                self.limits.approval_poll, left)
            waits: set[asyncio.Future[Any]] = {peer.lost} | ({changed} if changed else set())
            try:
                await asyncio.wait(waits, timeout=max(0.0, poll),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                if changed is not None:
                    changed.cancel()
            if peer.lost.done():
                audit(Kind.PROTOCOL_ERROR, f"{client.name} disconnected while waiting "
                      "for approval", client=client.name, key_id=kid, peer=peername,
                      reason="disconnected-waiting")
                return None
            changed = self.changes.waiter(client.name)  # before reading: no lost wake-up
            try:
                fresh, state = await self._db(self._lookup, kid)
            except StateError as e:
                log.error("state store: %s", e)
                changed.cancel()
                return None
            decision = policy.decide_waiting(fresh or client, state, self.clock(),
                                             requested_at, wait_until)
            if decision.verdict is not policy.Verdict.WAIT:
                changed.cancel()
                if decision.verdict is policy.Verdict.SEND and state is not None and (
                        state.approval_decision == "approve"):
                    await self._db(lambda: self.store.update(
                        client.name, approved_until=self.clock() + client.approval_duration))
                return decision

    async def _escrow(self, transport: Any, peer: _Peer, kid: str, peername: str) -> None:
        try:
            from . import escrow
        except ImportError:
            audit(Kind.PROTOCOL_ERROR, f"{peername}: escrow not available", peer=peername,
                  key_id=kid, reason="escrow-unavailable")
            return
        client, _ = await self._db(self._lookup, kid)
        if client is None:
            audit(Kind.REFUSED_UNKNOWN, f"escrow from unknown key {kid}", key_id=kid,
                  peer=peername, reason="no client has this key_id")
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 * 1024, loop=loop)
        proto = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        writer = asyncio.StreamWriter(transport, proto, reader, loop)
        store = await self._db(escrow.EscrowStore, self.statedir)
        try:
            await escrow.handle_escrow(reader, writer, client_name=client.name, key_id=kid,
                                       store=store)
        finally:
            await self._db(store.close)

    async def serve(self, socks: list[socket.socket], *, idle_timeout: float | None = None,
                    on_ready: Callable[[], None] | None = None,
                    background: list[Callable[[], Any]] | None = None) -> None:
        """Serve on *socks* until cancelled, or until idle for *idle_timeout* seconds."""
        loop = asyncio.get_running_loop()

        def factory_for() -> Callable[[], asyncio.Protocol]:
            def make() -> asyncio.Protocol:
                peer = _Peer(loop, self.limits)

                orig = peer.connection_made

                def made(transport: asyncio.BaseTransport) -> None:
                    orig(transport)
                    pn = transport.get_extra_info("peername")
                    peername = (f"[{pn[0]}]:{pn[1]}" if pn and ":" in str(pn[0])
                                else f"{pn[0]}:{pn[1]}" if pn else "?")
                    self.last_activity = time.monotonic()
                    task = loop.create_task(self.handle(transport, peer, peername))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

                peer.connection_made = made  # type: ignore[method-assign]
                return peer
            return make

        self._tasks: set[asyncio.Task[None]] = set()
        servers = [await loop.create_server(factory_for(), sock=s) for s in socks]
        bg = [loop.create_task(job()) for job in background or []]
        if on_ready:
            on_ready()
        try:
            while True:
                await asyncio.sleep(1 if idle_timeout else 3600)
                if (idle_timeout and self.active == 0
                        and time.monotonic() - self.last_activity > idle_timeout):
                    log.info("idle for %.0f s; exiting (the socket stays with systemd)",
                             idle_timeout)
                    return
        finally:
            for t in bg:
                t.cancel()
            for srv in servers:
                srv.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, *bg, return_exceptions=True)

    def close(self) -> None:
        self.db_thread.shutdown(wait=True)
        self.store.close()
