"""The key server's exchange: one place that reads, bounds, decides and answers.

asyncio, one task per connection, TLS through GnuTLS on the non-blocking
socket (:mod:`mandos_core.tls`): no thread or process per connection, and
every wait is bounded, so a slow or hostile peer holds only its own
connection.  Database calls run on one worker thread, never on the event
loop; the requests waiting for a decision go to it together, so a herd
costs one thread hand-off and one read and one write per batch, not per
request.  Every refusal looks the same on the wire: the TLS handshake completes,
then close_notify with zero bytes.  The reason goes to the audit log only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from mandos_core import gnutls
from mandos_core.protocol import EMPTY_KEY_ID, ESCROW_LINE, MAX_VERSION_LINE, VERSION_LINE
from mandos_core.tls import (
    AsyncTLS,
    PeerKey,
    PeerKeyError,
    allows_x509,
    effective_priority,
    peer_key,
    wait_fd,
)

from . import config as configmod
from . import identity as identitymod
from . import policy
from .audit import Kind, audit
from .changes import Changes
from .config import Client, Config
from .connections import (
    Conn,
    ConnectionTable,
    RateLimitedLog,
    accept_loop,
    raise_fd_limit,
)
from .state import ClientState, StateError, StateStore, added_client
from .stores import EscrowOpener, change_listener, open_store

log = logging.getLogger("mandosd.server")
T = TypeVar("T")
#: a request's (client, state, decision, error recording it)
Decided = tuple[Client | None, ClientState | None, policy.Decision, str | None]


@dataclass(frozen=True)
class Limits:
    version_timeout: float = 10.0
    handshake_timeout: float = 10.0
    send_timeout: float = 10.0
    #: bytes a peer may send after the handshake (it should send none)
    max_peer_data: int = 4096
    #: re-check a waiting approval this often even without a change notification
    approval_recheck: float = 5.0
    #: ... and this often while the change notifications are down (a pool's LISTEN)
    approval_poll: float = 0.2
    #: cap on any approval wait, whatever approval_delay says
    max_approval_wait: float = 3600.0
    #: connections from one address; the oldest unproved one makes room for a newcomer
    per_address: int = 256
    #: connections in all (further capped by the file-descriptor limit)
    total: int = 4096


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
        self.db_thread = ThreadPoolExecutor(1, thread_name_prefix="mandosd-db")
        #: requests waiting for their decision (:meth:`_decided`), and whether a
        #: database-thread job that will take them is queued
        self._asked: list[tuple[str, asyncio.Future[Decided]]] = []
        self._batch_lock = threading.Lock()
        self._batch_queued = False
        # NORMAL sync: a commit survives the process being killed; only a power cut may
        # lose the last "secret sent" (its deadline extension), which errs on the safe
        # side.  Admin changes (mandos-ctl) are written with FULL sync.
        self.store = open_store(state_url, statedir, durable=False, name=server_name,
                                lazy=True)
        self.open_escrow = EscrowOpener(state_url, self.store, statedir)
        #: wakes approval waits when another server or mandos-ctl changes the client
        self.changes = change_listener(state_url) if state_url else Changes(statedir)
        self.config: Config = configmod.load(configdir)
        self.stamp: Any = configmod.config_stamp(configdir, self.config.secfiles)
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
        self.identity = identitymod.load_or_create(statedir)
        self.priority = effective_priority(self.config.server.priority, server=True)
        self.accept_x509 = allows_x509(self.priority)
        #: parsed once, not per connection
        self.tls_priority = gnutls.Priority(self.priority)
        self.credentials = gnutls.Credentials()
        self.credentials.set_rawpk(self.identity.spki_pem, self.identity.key_pem)
        self.conns = ConnectionTable(limits.per_address, limits.total)
        self.errors = RateLimitedLog(log)
        audit(Kind.CONFIG_LOADED, f"loaded {len(self.config.clients)} clients from "
              f"{configdir}", clients=len(self.config.clients))

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.db_thread, fn, *args)

    def _reload_if_changed(self) -> None:
        stamp = configmod.config_stamp(self.configdir, self.config.secfiles)
        if stamp == self.stamp:
            return
        try:
            cfg = configmod.load(self.configdir)
        except configmod.ConfigError as e:
            # nothing is merged or pruned: the stored state waits for a readable file
            log.error("config changed but cannot be loaded, keeping the old one: %s", e)
            audit(Kind.CONFIG_REJECTED, f"configuration not reloaded: {e}", reason=str(e))
            self.stamp = stamp
            return
        self.store.sync_clients(cfg.clients.values(), self.clock())
        if cfg.secfiles != self.config.secfiles:  # stamp the files this load read
            stamp = configmod.config_stamp(self.configdir, cfg.secfiles)
        self.config, self.stamp = cfg, stamp
        audit(Kind.CONFIG_LOADED, f"reloaded {len(cfg.clients)} clients from {self.configdir}",
              clients=len(cfg.clients))

    async def current_config(self) -> Config:
        """The configuration, re-read first if clients.conf changed (on the database thread).

        For work beside the exchange (the standalone checker schedule), so that it
        sees the same clients as the next request does.
        """
        await self._db(self._reload_if_changed)
        return self.config

    def _find(self, kid: str) -> tuple[Client | None, ClientState | None]:
        """On the database thread: the configured (or added) client with *kid*; when there
        is none, in a pool, the state of another server's client (refused here with its
        own reason)."""
        if kid == EMPTY_KEY_ID:
            return None, None
        client = self.config.by_key_id.get(kid) or added_client(self.store, kid,
                                                                self.config.defaults)
        if client is None:
            return None, self.store.get_by_key_id(kid) if self.state_url else None
        return client, None

    def _lookup(self, kid: str) -> tuple[Client | None, ClientState | None]:
        """Runs on the database thread: re-read config if changed, then the client's state."""
        self._reload_if_changed()
        client, elsewhere = self._find(kid)
        if client is None:
            return None, elsewhere
        state = self.store.get(client.name)
        return policy.effective(client, state), state

    async def _read_line(self, conn: Conn, deadline: float) -> bytes:
        """The protocol line, read without consuming a byte beyond it (at most 16 bytes)."""
        loop = asyncio.get_running_loop()
        buf = b""
        while True:
            try:
                data = conn.sock.recv(MAX_VERSION_LINE - len(buf))
            except BlockingIOError:
                await wait_fd(loop, conn.sock.fileno(), False, deadline)
                continue
            if not data:
                return buf
            buf += data
            if b"\n" in buf or len(buf) >= MAX_VERSION_LINE:
                return buf

    async def handle(self, conn: Conn) -> None:
        loop = asyncio.get_running_loop()
        peername = conn.peername
        session: gnutls.Session | None = None
        tls: AsyncTLS | None = None
        self.active += 1
        self.last_activity = time.monotonic()
        try:
            try:
                line = await self._read_line(conn, loop.time() + self.limits.version_timeout)
            except TimeoutError:
                audit(Kind.PROTOCOL_ERROR, f"{peername}: no version line in time",
                      peer=peername, reason="version-timeout")
                return
            except OSError as e:
                audit(Kind.PROTOCOL_ERROR, f"{peername}: connection failed: {e.strerror}",
                      peer=peername, reason="connection-error")
                return
            if line not in (VERSION_LINE, ESCROW_LINE):
                audit(Kind.PROTOCOL_ERROR, f"{peername}: unsupported protocol version line",
                      peer=peername, reason="bad-version-line")
                return
            fd = conn.sock.fileno()
            # one key share (the first group, X25519), not GnuTLS's default two: a
            # client machine that wants another group asks for it (one more round trip)
            session = gnutls.Session(fd, server=False, credentials=self.credentials,
                                     priority=self.tls_priority,
                                     extra_flags=gnutls.KEY_SHARE_TOP)
            tls = AsyncTLS(loop, fd, session)
            try:
                await tls.handshake(loop.time() + self.limits.handshake_timeout)
            except TimeoutError:
                audit(Kind.PROTOCOL_ERROR, f"{peername}: TLS handshake timed out",
                      peer=peername, reason="tls-handshake", tls_error="timeout")
                return
            except gnutls.GnuTLSError as e:
                audit(Kind.PROTOCOL_ERROR, f"{peername}: TLS handshake failed: {e}",
                      peer=peername, reason="tls-handshake", tls_error=e.reason)
                return
            except OSError as e:
                audit(Kind.PROTOCOL_ERROR, f"{peername}: TLS handshake failed: {e.strerror}",
                      peer=peername, reason="tls-handshake", tls_error="connection-error")
                return
            try:
                peer = peer_key(session, x509=self.accept_x509)
            except PeerKeyError as e:
                audit(Kind.PROTOCOL_ERROR, f"{peername}: {e}", peer=peername,
                      reason=e.reason)
                return
            conn.proved = True
            if line == ESCROW_LINE:
                await self._escrow(tls, peer, peername)
            else:
                await self._answer(tls, peer, peername)
        except Exception:
            log.exception("%s: internal error; connection dropped", peername)
        finally:
            self.active -= 1
            self.last_activity = time.monotonic()
            if session is not None:
                with contextlib.suppress(gnutls.GnuTLSError, gnutls.WouldBlock, OSError):
                    session.bye()  # close_notify if the socket takes it now; never wait
                session.close()

    def _decide_many(self, kids: list[str]) -> list[Decided | Exception]:
        """On the database thread: look up, decide, and record what the decisions change,
        for every request that arrived since the last batch.

        A secret about to be sent is recorded (with its new deadline) before it leaves,
        and a passed deadline disables the client.  For each request: the client, its
        state, the decision and an error, if recording failed (then nothing is sent);
        or the exception deciding it raised (a row that does not parse, a setting that
        does not decode): that request alone is refused, as it was before batching.
        Under load this is one state read and one "secrets sent" write for many
        requests (two round trips to a pool's database, not two per request).
        """
        self._reload_if_changed()
        found: list[tuple[Client | None, ClientState | None] | Exception] = []
        for kid in kids:
            try:
                found.append(self._find(kid))
            except StateError:
                raise  # the store unavailable: the whole batch refuses, at once
            except Exception as e:  # this request's own trouble
                found.append(e)
        names = list(dict.fromkeys(f[0].name for f in found
                                   if not isinstance(f, Exception) and f[0] is not None))
        states = _get_many(self.store, names)
        now = self.clock()
        out: list[Decided | Exception] = []
        sends: dict[str, float] = {}
        for f in found:
            if isinstance(f, Exception):
                out.append(f)
                continue
            client, state = f
            try:
                if client is not None:
                    got = states.get(client.name)
                    if isinstance(got, Exception):
                        raise got
                    state = got
                    client = policy.effective(client, state)
                decision = policy.decide(client, state, now)
                if decision.verdict is policy.Verdict.SEND and client is not None:
                    deadline = policy.deadline_after_secret(client, now,
                                                            state.deadline if state else None)
                    sends[client.name] = max(deadline, sends.get(client.name, deadline))
            except Exception as e:  # this request's own trouble
                out.append(e)
                continue
            out.append((client, state, decision, None))
        recorded = _record_many(self.store, sends, now)
        for i, item in enumerate(out):
            if isinstance(item, Exception):
                continue
            client, state, decision, _ = item
            error = None
            try:
                if decision.verdict is policy.Verdict.SEND and client is not None:
                    error = recorded[client.name]
                elif (decision.verdict is policy.Verdict.TIMED_OUT and state is not None
                      and state.enabled):
                    self.store.update(state.name, enabled=False)
            except StateError as e:
                error = str(e)
            out[i] = (client, state, decision, error)
        return out

    async def _decided(self, kid: str) -> Decided:
        """:meth:`_decide_many` for this request, batched with the others waiting.

        One database-thread job takes every request queued since it last ran, and
        hands all the answers back to the loop at once: under a herd, neither a
        thread hand-off nor a database round trip per request.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decided] = loop.create_future()
        with self._batch_lock:
            self._asked.append((kid, fut))
            start = not self._batch_queued
            self._batch_queued = True
        if start:
            self.db_thread.submit(self._decide_batch, loop)
        return await fut

    def _decide_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the database thread: one batch; requeued behind other database jobs if
        more requests arrived meanwhile (approval waits are not starved by a herd)."""
        with self._batch_lock:
            batch, self._asked = self._asked, []
        results: list[Decided | Exception] | Exception
        try:
            results = self._decide_many([kid for kid, _ in batch])
        except BaseException as e:  # StateError: each request refuses;
            # else each one logs; never left unanswered with the 'queued' flag stuck
            results = e if isinstance(e, Exception) else RuntimeError(f"decisions: {e!r}")
        with self._batch_lock:
            again = bool(self._asked)
            self._batch_queued = again
        try:
            loop.call_soon_threadsafe(_deliver, [f for _, f in batch], results)
            if again:
                self.db_thread.submit(self._decide_batch, loop)
        except RuntimeError:  # the loop or the executor is closing: nobody waits
            with self._batch_lock:
                self._batch_queued = False

    def _record_sent(self, client: Client, state: ClientState | None, now: float) -> None:
        """After an approval: record the secret about to be sent, as a batch does (a
        disable committed meanwhile stops it, on SQLite as in a pool)."""
        deadline = policy.deadline_after_secret(client, now, state.deadline if state else None)
        error = _record_many(self.store, {client.name: deadline}, now)[client.name]
        if error is not None:
            raise StateError(error)

    async def _answer(self, tls: AsyncTLS, peer: PeerKey, peername: str) -> None:
        kid = peer.key_id
        ctype = peer.cert_type
        try:
            client, state, decision, error = await self._decided(kid)
        except StateError as e:
            log.error("state store: %s", e)
            audit(Kind.PROTOCOL_ERROR, f"{peername}: refused: state store unavailable",
                  key_id=kid, peer=peername, reason="state-unavailable")
            return
        name = client.name if client else state.name if state else None
        if decision.verdict is policy.Verdict.WAIT and client is not None:
            waited = await self._wait_for_approval(client, tls, kid, peername, self.clock(),
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
            try:
                await tls.send_all(bytes(client.secret),
                                   tls.loop.time() + self.limits.send_timeout)
            except (TimeoutError, gnutls.GnuTLSError, OSError) as e:
                audit(Kind.PROTOCOL_ERROR, f"{client.name}: sending the secret failed: {e}",
                      client=client.name, key_id=kid, peer=peername, reason="send-failed",
                      cert_type=ctype)
                return
            self.served += 1
            audit(Kind.SECRET_SENT, f"sent secret to {client.name}", client=client.name,
                  key_id=kid, peer=peername, reason=decision.reason, cert_type=ctype)
            return
        if decision.verdict is policy.Verdict.TIMED_OUT and state is not None and state.enabled:
            audit(Kind.CLIENT_TIMED_OUT, f"{state.name}: timeout passed; client disabled",
                  client=state.name, key_id=kid, reason="deadline passed")
        audit(decision.verdict.value, f"refused {name or 'unknown client'}: {decision.reason}",
              client=name, key_id=kid, peer=peername, reason=decision.reason, cert_type=ctype)

    async def _wait_for_approval(self, client: Client, tls: AsyncTLS, kid: str, peername: str,
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
            return await self._approval_loop(client, tls, kid, peername, requested_at,
                                             wait_until)
        finally:
            with contextlib.suppress(StateError):
                await self._db(lambda: self.store.update(client.name,
                                                         approval_pending_until=None))

    async def _peer_gone(self, tls: AsyncTLS, received: list[int]) -> bool:
        """After the socket turned readable while waiting: did the peer hang up?"""
        try:
            data = tls.session.recv(4096)
        except gnutls.WouldBlock:
            return False
        except gnutls.GnuTLSError:
            return True
        if not data:
            return True
        received[0] += len(data)
        return received[0] > self.limits.max_peer_data

    async def _approval_loop(self, client: Client, tls: AsyncTLS, kid: str, peername: str,
                             requested_at: float, wait_until: float
                             ) -> policy.Decision | None:
        """Wait for an approve/deny, woken by changes to the state (not by polling)."""
        loop = tls.loop
        received = [0]
        # registered before the state is read again: no change is lost in between
        changed: asyncio.Future[None] = self.changes.waiter(client.name)
        while True:
            left = wait_until - self.clock()
            # a live waker: re-read only when woken (and rarely, as a safety net);
            # otherwise (a pool whose LISTEN connection is down) poll
            recheck = (self.limits.approval_recheck if self.changes.live
                       else self.limits.approval_poll)
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(tls.fd, _resolve, readable)
            try:
                await asyncio.wait({readable, changed}, timeout=max(0.0, min(left, recheck)),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                loop.remove_reader(tls.fd)
                readable.cancel()
            if readable.done() and not readable.cancelled() and await self._peer_gone(
                    tls, received):
                audit(Kind.PROTOCOL_ERROR, f"{client.name} disconnected while waiting "
                      "for approval", client=client.name, key_id=kid, peer=peername,
                      reason="disconnected-waiting")
                return None
            why = ("the state changed" if changed.done() and not changed.cancelled()
                   else "the peer sent data" if readable.done() and not readable.cancelled()
                   else "timer")
            changed.cancel()
            changed = self.changes.waiter(client.name)  # before reading: no lost wake-up
            log.debug("%s: approval state re-read (%s)", client.name, why)
            try:
                fresh, state = await self._db(self._lookup, kid)
                decision = policy.decide_waiting(fresh or client, state, self.clock(),
                                                 requested_at, wait_until)
                if decision.verdict is not policy.Verdict.WAIT:
                    changed.cancel()
                    if decision.verdict is policy.Verdict.SEND and state is not None and (
                            state.approval_decision == "approve"):
                        await self._db(lambda: self.store.update(
                            client.name,
                            approved_until=self.clock() + client.approval_duration))
                    return decision
            except StateError as e:
                # the database went away while the request waited: refused, with its
                # reason, as any request the pool cannot decide and record
                changed.cancel()
                log.error("state store: %s", e)
                audit(Kind.PROTOCOL_ERROR, f"{peername}: refused {client.name} while it "
                      "waited for approval: state store unavailable", client=client.name,
                      key_id=kid, peer=peername, reason="state-unavailable")
                return None

    async def _escrow(self, tls: AsyncTLS, peer: PeerKey, peername: str) -> None:
        from . import escrow

        kid = peer.key_id
        reader, writer, pump = tls_streams(tls)
        try:
            # known/enabled/timeout, quota, rate and disk reserve: mandosd/escrow_policy.py
            await escrow.handle_escrow(reader, writer, key_id=kid,  # type: ignore[arg-type]
                                       peer=peername, lookup=lambda: self._db(self._lookup, kid),
                                       open_store=self.open_escrow,
                                       reserve=self.config.server.escrow_reserve,
                                       clock=self.clock)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump

    def _refused_connection(self, conn: Conn, why: str) -> None:
        self.errors.log(logging.WARNING, f"{why} {conn.address}",
                        f"{conn.peername}: connection dropped ({why}: more than "
                        f"{self.limits.per_address} from {conn.address} or "
                        f"{self.conns.total} in all)")

    async def serve(self, socks: list[socket.socket], *, idle_timeout: float | None = None,
                    on_ready: Callable[[], None] | None = None,
                    background: list[Callable[[], Any]] | None = None) -> None:
        """Serve on *socks* until cancelled, or until idle for *idle_timeout* seconds."""
        fds = raise_fd_limit()
        self.conns.total = max(16, min(self.limits.total, fds - 64))
        loop = asyncio.get_running_loop()
        acceptors = [loop.create_task(accept_loop(s, self.conns, self.handle,
                                                  self._refused_connection, self.errors))
                     for s in socks]
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
            for t in acceptors + bg:
                t.cancel()
            for c in self.conns.all():
                c.drop()
            tasks = [c.task for c in self.conns.all() if c.task is not None]
            await asyncio.gather(*acceptors, *bg, *tasks, return_exceptions=True)
            await self.changes.aclose()

    def close(self) -> None:
        self.db_thread.shutdown(wait=True)
        self.store.close()
        self.open_escrow.close()
        self.credentials.close()
        self.tls_priority.close()


@runtime_checkable
class _BatchStore(Protocol):
    """A store that reads and records many requests in one round trip (the pool's)."""

    def get_many(self, names: list[str]) -> dict[str, ClientState]: ...

    def record_secrets_sent(self, deadlines: Mapping[str, float], now: float) -> set[str]: ...


def _get_many(store: StateStore, names: list[str]) -> dict[str, ClientState | Exception]:
    """The states of *names*; a row that does not parse is its client's exception (that
    request alone is refused).  A StateError (the store unavailable) is raised."""
    if isinstance(store, _BatchStore) and names:
        try:
            return dict(store.get_many(names))
        except StateError:
            raise
        except Exception:  # one bad row: find it, one by one
            pass
    out: dict[str, ClientState | Exception] = {}
    for n in names:
        try:
            st = store.get(n)
        except StateError:
            raise
        except Exception as e:
            out[n] = e
            continue
        if st is not None:
            out[n] = st
    return out


def _record_many(store: StateStore, deadlines: Mapping[str, float], now: float
                 ) -> dict[str, str | None]:
    """Record secrets about to be sent (name: new deadline): for each name, None when
    recorded, else why not (then its secret is not sent)."""
    if not deadlines:
        return {}
    out: dict[str, str | None] = {}
    if isinstance(store, _BatchStore):
        try:
            done = store.record_secrets_sent(deadlines, now)
        except StateError as e:
            return dict.fromkeys(deadlines, str(e))
        for name in deadlines:
            out[name] = None if name in done else (
                f"{name}: disabled or timed out by another server meanwhile")
        return out
    for name, deadline in deadlines.items():
        try:
            store.record_secret_sent(name, now, deadline)
            # read again after the write: a disable committed since the batch's read
            # (mandos-ctl, another process) stops the secret, as the pool's conditional
            # write does (the "sent" just recorded errs on the safe side)
            st = store.get(name)
            out[name] = None if st is not None and st.enabled else (
                f"{name}: disabled meanwhile")
        except Exception as e:  # StateError, or its row no longer parses: not sent
            out[name] = str(e)
    return out


def _deliver(futures: list[asyncio.Future[Decided]],
             results: list[Decided | Exception] | Exception) -> None:
    for i, fut in enumerate(futures):
        if fut.done():  # its connection was dropped meanwhile
            continue
        if isinstance(results, StateError):
            fut.set_exception(StateError(str(results)))  # one each: tracebacks differ
        elif isinstance(results, Exception):
            fut.set_exception(results)
        elif isinstance(mine := results[i], Exception):
            fut.set_exception(mine)  # this request's own trouble
        else:
            fut.set_result(mine)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _TLSWriter:
    """What the escrow handler needs of a StreamWriter, over an :class:`AsyncTLS`."""

    def __init__(self, tls: AsyncTLS, timeout: float = 10.0) -> None:
        self.tls = tls
        self.timeout = timeout
        self.buf = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.buf += data

    async def drain(self) -> None:
        data, self.buf = bytes(self.buf), bytearray()
        if data:
            await self.tls.send_all(data, self.tls.loop.time() + self.timeout)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    async def wait_closed(self) -> None:
        await self.drain()


def tls_streams(tls: AsyncTLS, limit: int = 64 * 1024, max_total: int = 4 * 1024 * 1024
                ) -> tuple[asyncio.StreamReader, _TLSWriter, asyncio.Task[None]]:
    """A StreamReader fed from the TLS session by a pump task, and a writer.

    Every byte GnuTLS has received (also what arrived with the handshake) is
    read from the session itself, so nothing is lost at the switch.  A peer that
    sends more than *max_total* bytes on one connection is cut off."""
    reader = asyncio.StreamReader(limit=limit, loop=tls.loop)

    async def pump() -> None:
        total = 0
        try:
            while True:
                data = await tls.recv(16384, None)
                if not data:
                    break
                total += len(data)
                if total > max_total:
                    reader.set_exception(ConnectionResetError("peer sent too much"))
                    return
                reader.feed_data(data)
        except (gnutls.GnuTLSError, OSError) as e:
            reader.set_exception(ConnectionResetError(str(e)))
            return
        reader.feed_eof()

    return reader, _TLSWriter(tls), tls.loop.create_task(pump())
