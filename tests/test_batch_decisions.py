"""The batched decision path of the key server (mandosd/server.py: ``_decided``,
``_decide_batch``, ``_decide_many``, ``_deliver``), from the attacker's side and
the reliability engineer's.

Requests waiting for a decision are decided together on the database thread.
One request's trouble (a state row that does not parse, a client whose
configuration errors, a failed write) must refuse that request only, never the
others of its batch; a request abandoned while queued must not break the batch;
the batch machinery must never get stuck so that no later request is decided;
approval waits are not starved by a herd; a disable that lands between a
batch's read and its write stops the secret; a config change is seen by the
very next request.

A real in-process key server on 127.0.0.1 answers real TLS peers
(tests/helpers.py RawClient).  To put several requests in one batch, the
database thread is held by a job of the test until they are all queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.helpers import RawClient, raw_clients, wait_for


class Served:
    """A KeyServer serving on 127.0.0.1 in a thread of its own (its own event loop)."""

    def __init__(self, tmp_path: Path, clients: list[RawClient], url: str | None = None,
                 extra: dict[str, str] | None = None) -> None:
        from mandosd.server import KeyServer

        self.conf = tmp_path / "conf"
        self.conf.mkdir()
        self.clients = clients
        self.write_config(clients, extra or {})
        self.srv = KeyServer(self.conf, tmp_path / "state", state_url=url,
                             server_name="ks-batch" if url else None)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.task: asyncio.Task[None] | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.task = self.loop.create_task(self.srv.serve([self.sock],
                                                             on_ready=ready.set))
            with contextlib.suppress(asyncio.CancelledError):
                self.loop.run_until_complete(self.task)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(30)
        self.peers = ThreadPoolExecutor(16)

    def write_config(self, clients: list[RawClient], extra: dict[str, str]) -> None:
        path = self.conf / "clients.conf"
        path.write_text("".join(c.section(extra.get(c.name, "")) for c in clients))
        path.chmod(0o600)

    def hold_db(self) -> threading.Event:
        """Hold the database thread until the returned event is set."""
        release = threading.Event()
        held = threading.Event()

        def job() -> None:
            held.set()
            release.wait(60)

        self.srv.db_thread.submit(job)
        assert held.wait(30)
        return release

    def queued(self, n: int) -> None:
        wait_for(lambda: len(self.srv._asked) >= n, what=f"{n} requests queued")

    def batch(self, clients: list[RawClient]) -> list[bytes]:
        """All of *clients* ask at once and are decided in one batch: what each got."""
        release = self.hold_db()
        futs: list[Future[Any]] = [self.peers.submit(c.exchange, self.address)
                                   for c in clients]
        try:
            self.queued(len(clients))
        finally:
            release.set()
        return [f.result(60).data for f in futs]

    def close(self) -> None:
        self.peers.shutdown(wait=True)
        if self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(30)
        self.loop.close()
        self.sock.close()
        self.srv.close()


@contextlib.contextmanager
def served(tmp_path: Path, clients: list[RawClient], url: str | None = None,
           extra: dict[str, str] | None = None) -> Iterator[Served]:
    s = Served(tmp_path, clients, url, extra)
    try:
        yield s
    finally:
        s.close()


# -- one request's trouble refuses that request only ------------------------------------


def test_a_state_row_that_does_not_parse_refuses_only_its_own_request(
        tmp_path: Path) -> None:
    """A damaged row (overrides that are not JSON) for one client: before batching only
    its own request failed; a batch must not turn the others' secrets into refusals."""
    cs = raw_clients(3)
    with served(tmp_path, cs) as s:
        db = sqlite3.connect(tmp_path / "state" / "clients.sqlite")
        with db:
            db.execute("UPDATE clients SET overrides='{not json' WHERE name=?", (cs[1].name,))
        db.close()
        got = s.batch(cs)
        assert got[1] == b""  # the broken one: refused
        assert got[0] == cs[0].secret and got[2] == cs[2].secret  # the rest: served


def test_a_client_whose_settings_error_refuses_only_its_own_request_pool(
        tmp_path: Path, url: str) -> None:
    """In a pool: one client's stored override does not decode (its secret is not
    base64), so deciding it raises; the others of the batch still get their secrets."""
    cs = raw_clients(3)
    with served(tmp_path, cs, url) as s:
        s.srv.store.update(cs[0].name, overrides={"secret": "abc"})
        got = s.batch(cs)
        assert got[0] == b""
        assert got[1] == cs[1].secret and got[2] == cs[2].secret


def test_a_failed_disable_of_a_timed_out_client_refuses_only_it(tmp_path: Path) -> None:
    """The write disabling a timed-out client fails (StateError): that request is
    refused; the others are sent, and recorded before being sent."""
    from mandosd.state import SQLiteStore, StateError

    cs = raw_clients(3)
    with served(tmp_path, cs) as s:
        store = s.srv.store
        store.update(cs[2].name, deadline=1.0)  # long passed
        real = store.update

        def update(name: str, **changes: Any) -> None:
            if changes.get("enabled") is False:
                raise StateError("database is locked")
            real(name, **changes)

        store.update = update  # type: ignore[method-assign]
        got = s.batch(cs)
        assert got[2] == b""
        assert got[0] == cs[0].secret and got[1] == cs[1].secret
        other = SQLiteStore(tmp_path / "state", readonly=True)
        try:
            for c in cs[:2]:
                st = other.get(c.name)
                assert st is not None and st.last_secret_sent is not None
        finally:
            other.close()


# -- abandoned requests, and a batch that cannot get stuck ------------------------------


def _server(tmp_path: Path, clients: list[RawClient]) -> Any:
    from mandosd.server import KeyServer

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "clients.conf").write_text("".join(c.section() for c in clients))
    (conf / "clients.conf").chmod(0o600)
    return KeyServer(conf, tmp_path / "state")


def test_a_request_abandoned_while_queued_leaves_the_rest_of_its_batch_decided(
        tmp_path: Path) -> None:
    """A request whose task is cancelled (its connection dropped, the server stopping)
    while it waits in the queue: the others of its batch still get their decisions."""
    from mandosd import policy

    cs = raw_clients(3)
    srv = _server(tmp_path, cs)
    release = threading.Event()
    srv.db_thread.submit(release.wait, 60)

    async def main() -> list[Any]:
        tasks = [asyncio.ensure_future(srv._decided(c.key_id)) for c in cs]
        while len(srv._asked) < 3:
            await asyncio.sleep(0)
        tasks[0].cancel()  # abandoned first: its future is cancelled before delivery
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        out = asyncio.run(asyncio.wait_for(main(), 60))  # the bound only guards a hang
    finally:
        release.set()
        srv.close()
    assert isinstance(out[0], asyncio.CancelledError)
    assert [d.verdict for _, _, d, _ in out[1:]] == [policy.Verdict.SEND] * 2


class Boom(BaseException):
    """Something that is not an Exception, raised on the database thread."""


def test_a_batch_that_blows_up_does_not_stop_later_requests_being_decided(
        tmp_path: Path) -> None:
    """Whatever escapes a batch, the 'batch queued' flag is cleared and its requests
    are answered: otherwise no later request would ever be decided."""
    from mandosd import policy

    cs = raw_clients(2)
    srv = _server(tmp_path, cs)
    real = srv._decide_many
    calls = [0]

    def once(kids: list[str]) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise Boom()
        return real(kids)

    srv._decide_many = once

    async def main() -> tuple[Any, Any]:
        first = asyncio.ensure_future(srv._decided(cs[0].key_id))
        await asyncio.wait({first}, timeout=60)  # the bound only guards a hang
        assert first.done(), "the request of the batch that blew up was never answered"
        await asyncio.get_running_loop().run_in_executor(srv.db_thread, lambda: None)
        assert not srv._batch_queued, "'batch queued' stuck: nothing is decided any more"
        second = await asyncio.wait_for(srv._decided(cs[1].key_id), 60)
        return first, second

    try:
        first, second = asyncio.run(main())
    finally:
        srv.close()
    assert first.exception() is not None
    assert second[2].verdict is policy.Verdict.SEND


def test_approval_waits_are_not_starved_by_a_continuous_herd(tmp_path: Path) -> None:
    """A database job of an approval wait, queued while a batch runs, runs before the
    next batch: a herd arriving all the time does not keep the thread to itself."""
    cs = raw_clients(3)
    srv = _server(tmp_path, cs)
    real = srv._decide_many
    order: list[str] = []
    in_batch = threading.Event()
    go = threading.Event()

    def batch(kids: list[str]) -> Any:
        order.append("batch")
        if len(order) == 1:
            in_batch.set()
            go.wait(60)
        return real(kids)

    srv._decide_many = batch

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a = asyncio.ensure_future(srv._decided(cs[0].key_id))
        await loop.run_in_executor(None, in_batch.wait, 60)
        approval = asyncio.ensure_future(srv._db(lambda: order.append("approval")))
        b = asyncio.ensure_future(srv._decided(cs[1].key_id))  # the herd goes on
        while not srv._asked:
            await asyncio.sleep(0)
        go.set()
        await asyncio.wait_for(asyncio.gather(a, approval, b), 60)

    try:
        asyncio.run(main())
    finally:
        go.set()
        srv.close()
    assert order == ["batch", "approval", "batch"]


# -- a disable between the batch's read and its write; a config change ---------------


def test_a_disable_between_the_batchs_read_and_write_stops_the_secret_sqlite(
        tmp_path: Path) -> None:
    """mandos-ctl --disable (another process, another connection to the SQLite state)
    commits after this server read the batch's states and before it recorded them:
    that client's secret is not sent; the others are."""
    from mandosd.state import SQLiteStore

    cs = raw_clients(3)
    srv = _server(tmp_path, cs)
    admin = SQLiteStore(tmp_path / "state")
    real = srv.store.get
    read: list[str] = []

    def get(name: str) -> Any:
        st = real(name)
        read.append(name)
        if len(read) == len(cs):  # the batch's reads are done: the admin acts now
            admin.update(cs[1].name, enabled=False)
        return st

    srv.store.get = get
    try:
        out = srv._decide_many([c.key_id for c in cs])
    finally:
        admin.close()
        srv.close()
    errors = [e for _, _, _, e in out]
    assert errors[0] is None and errors[2] is None
    assert errors[1] is not None, "a client disabled meanwhile would get its secret"


def test_a_config_change_takes_effect_for_the_very_next_request(tmp_path: Path) -> None:
    """clients.conf gains a client and loses one: the next requests see it (once-per-
    batch reload), also when a batch was running while the file changed."""
    cs = raw_clients(3)
    with served(tmp_path, cs[:2]) as s:
        assert s.batch(cs) == [cs[0].secret, cs[1].secret, b""]
        s.write_config([cs[0], cs[2]], {})
        assert s.batch(cs) == [cs[0].secret, b"", cs[2].secret]
        s.write_config([cs[1]], {})
        assert cs[1].exchange(s.address).data == cs[1].secret
        assert cs[2].exchange(s.address).data == b""


def test_a_herd_in_a_pool_is_decided_in_one_batch_and_served(tmp_path: Path, url: str) -> None:
    """Sanity for the pool: several peers in one batch, all served, and recorded."""
    from mandosd.pgstate import PostgresStore

    cs = raw_clients(4)
    with served(tmp_path, cs, url) as s:
        assert s.batch(cs) == [c.secret for c in cs]
    admin = PostgresStore(url, server_name=f"admin-{uuid.uuid4().hex[:6]}")
    try:
        got = admin.get_many([c.name for c in cs])
        assert all(got[c.name].last_secret_sent is not None for c in cs)
    finally:
        admin.close()


def test_a_store_outage_fails_the_batch_at_once_not_request_by_request(
        tmp_path: Path) -> None:
    """The state store unavailable (StateError) while a herd of unknown keys is
    queued: one failed call refuses the whole batch; the database thread does not try
    (and, in a pool, wait for a connection) once per request."""
    from mandosd.state import StateError

    known = raw_clients(1)
    srv = _server(tmp_path, known)
    calls = [0]

    def down(key_id: str) -> Any:
        calls[0] += 1
        raise StateError("could not connect to the database")

    srv.store.get_by_key_id = down
    try:
        with contextlib.suppress(StateError):
            srv._decide_many([c.key_id for c in raw_clients(20, "u")])
    finally:
        srv.close()
    assert calls[0] == 1


def _handshake_and_hang_up(c: RawClient, address: str, queued: Any) -> None:
    """A client machine that completes the TLS handshake, waits until its request is
    queued for a decision, then hangs up (RST: unread data is discarded)."""
    import struct
    import time

    from mandos_core import gnutls, tls
    from mandos_core.protocol import VERSION_LINE

    host, port = address.rsplit(":", 1)
    with gnutls.Credentials() as cred:
        cred.set_rawpk(c.spki_pem, c.key_pem)
        s = socket.create_connection((host, int(port)), timeout=10)
        try:
            s.sendall(VERSION_LINE)
            s.setblocking(False)
            with gnutls.Session(s.fileno(), server=True, credentials=cred,
                                priority=tls.effective_priority(None, server=False)) as sess:
                tls.drive(sess, s.fileno(), sess.handshake, time.monotonic() + 10)
                queued()
        finally:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()


def test_a_peer_that_hangs_up_while_queued_costs_the_others_nothing(tmp_path: Path) -> None:
    """One peer of a batch disconnects while its request waits: the batch is decided,
    the others get their secrets, and later requests are decided too."""
    cs = raw_clients(3)
    with served(tmp_path, cs) as s:
        release = s.hold_db()
        try:
            _handshake_and_hang_up(cs[0], s.address, lambda: s.queued(1))
            futs = [s.peers.submit(c.exchange, s.address) for c in cs[1:]]
            s.queued(3)
        finally:
            release.set()
        assert [f.result(60).data for f in futs] == [c.secret for c in cs[1:]]
        assert cs[0].exchange(s.address).data == cs[0].secret


def test_a_state_row_that_does_not_parse_refuses_only_its_own_request_pool(
        tmp_path: Path, url: str) -> None:
    """The pool's one-statement read of a batch meets a damaged row: that client's
    request is refused, the others of the batch are served (read one by one)."""
    import psycopg

    cs = raw_clients(3)
    with served(tmp_path, cs, url) as s:
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("UPDATE clients SET overrides='{not json' WHERE name=%s", (cs[2].name,))
        got = s.batch(cs)
        assert got[2] == b""
        assert got[0] == cs[0].secret and got[1] == cs[1].secret
