"""Working on one question: ask every key server, retry with back-off, answer the asker.

A :class:`Job` is a thread per question.  It hands one fetch per server that is
due to the agent's :class:`FetchPool` (at most ``MAX_CONCURRENT_FETCHES``
threads for the whole agent, however many servers are announced), waits on its
inbox (results, "stop", "servers changed"), pauses a failed server 0.25 s, then
twice as long each time up to ``--retry-max``, and answers with the first secret
that decrypts, was encrypted to our key, and was not already refused by this
asker (a rogue or stale server's answer is skipped; the others are still asked).  It never gives up while the
question stands; it stops when the question is answered, withdrawn, its asker
exits or its ``NotAfter`` passes.  The agent (:mod:`password_agent.agent`) is
its :class:`Host`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import hmac
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mandos_core.log import event
from mandos_core.secret import Secret
from mandos_core.tls import ClientTLS

from .agentconf import AgentConfig
from .askfile import Question, monotonic_us, pid_alive
from .client import MAX_CONCURRENT_FETCHES, FetchError, Refused, Server, fetch
from .gpg import GpgError, NotForUs

log = logging.getLogger("mandos-password-agent")

#: First pause before asking a failed server again; it doubles up to --retry-max.
RETRY_FIRST = 0.25
#: Pause after an unexpected error in a job, so a bug cannot spin.
ERROR_PAUSE = 1.0


class Host(Protocol):
    """What a job needs from the agent."""

    cfg: AgentConfig
    ctx: ClientTLS | None
    pidfd_fallback: bool

    fetch_pool: FetchPool

    def known_servers(self) -> list[Server]: ...
    def warn_no_servers(self) -> None: ...
    def decrypt(self, message: bytes) -> Secret: ...
    def answered(self, job: Job) -> None: ...
    def job_done(self, job: Job) -> None: ...


class MessageId:
    """journald MESSAGE_IDs of the agent's outcomes (``journalctl MESSAGE_ID=...``)."""

    ANSWERED = "3f0a1c2e8b7d4f5a9c6e2b1d0a9f8e7d"
    DROPPED = "9d4c7b2a1e5f4083b6a2c9d8e7f60514"
    SKIPPED = "b81e3f6c2d9a47e5a0c4f7d2e9b15a63"
    SERVER_FAILED = "5c2e9a7d1b3f4e68a9d0c7b6e5f41a28"
    STARTED = "e6a9d3c1f7b2485e9a0d6c3b2f1e4d57"


class FetchPool:
    """At most *size* daemon threads running fetches for all questions; the rest wait in line.

    Threads start only as needed and then stay; daemon threads, so a fetch stuck in
    a TLS handshake never holds the agent's exit.
    """

    def __init__(self, size: int = MAX_CONCURRENT_FETCHES) -> None:
        self.size = size
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0     # workers waiting for a task that no submit has claimed yet
        self._backlog = 0  # tasks waiting for a worker

    def submit(self, task: Callable[[], None]) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
            elif self._threads < self.size:
                self._threads += 1
                threading.Thread(target=self._work, daemon=True,
                                 name=f"fetch worker {self._threads}").start()
            else:
                self._backlog += 1
        self._tasks.put(task)

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                task()
            except Exception as e:  # noqa: BLE001 - a task reports its own errors
                log.error("fetch worker: %s", e)
            with self._lock:
                if self._backlog > 0:
                    self._backlog -= 1
                else:
                    self._idle += 1


def secret_tag(key: bytes, secret: Secret) -> bytes:
    """A keyed digest of *secret*, to recognise a secret the asker refused without keeping it."""
    return hmac.new(key, secret.reveal(), hashlib.sha256).digest()


def elapsed_ms(start: float) -> int:
    return round((time.monotonic() - start) * 1000)


def send_answer(socket_path: str, secret: Secret) -> None:
    """Send the one ``+password`` datagram; the copy made for it is wiped."""
    data = secret.prefixed(b"+")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(data, socket_path)
    finally:
        for i in range(len(data)):
            data[i] = 0


@dataclass
class _ServerState:
    inflight: bool = False
    failures: int = 0
    next_at: float = 0.0
    last_reason: str = ""


@dataclass(frozen=True)
class _Result:
    server: Server
    data: bytes | None
    error: FetchError | None
    elapsed_ms: int


class Job(threading.Thread):
    """Work on one question until it is answered, withdrawn or past its deadline."""

    def __init__(self, agent: Host, question: Question, *,
                 refused: frozenset[bytes] = frozenset(), tag_key: bytes = b"") -> None:
        super().__init__(name=f"question {question.name}", daemon=True)
        self.agent = agent
        self.q = question
        #: tags (:func:`secret_tag`) of the secrets this asker already refused
        self.refused = refused
        self.tag_key = tag_key
        #: the tag of the secret we answered with (for the agent to remember)
        self.answer_tag: bytes | None = None
        self.inbox: queue.SimpleQueue[_Result | str] = queue.SimpleQueue()
        self.stopped = threading.Event()
        self.stop_reason = ""
        self.outcome = "pending"
        self.started = time.monotonic()
        self.servers: dict[Server, _ServerState] = {}

    def fields(self, **more: object) -> dict[str, object]:
        return {"MANDOS_QUESTION_ID": self.q.id, "MANDOS_ASK_FILE": self.q.path,
                "MANDOS_ASKER_PID": self.q.pid, **more}

    def stop(self, reason: str) -> None:
        """Stop working on the question (called from other threads)."""
        if not self.stopped.is_set():
            self.stop_reason = reason
            self.stopped.set()
            self.inbox.put("stop")

    def poke(self) -> None:
        """The set of servers changed: look again."""
        self.inbox.put("servers")

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.stopped.set()
            self.agent.job_done(self)

    def _run(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except Exception as e:  # never die while the question is pending
                log.error("error while working on %s: %s", self.q.name, e,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                with contextlib.suppress(queue.Empty):
                    self.inbox.get(timeout=ERROR_PAUSE)

    def _gone(self) -> str | None:
        if self.stopped.is_set():
            return self.stop_reason or "stopped"
        if self.q.expired(monotonic_us()):
            return "NotAfter has passed"
        if self.q.pid is not None and not pid_alive(self.q.pid):
            return f"the asking process {self.q.pid} exited"
        if not os.path.exists(self.q.path):
            return "the question was withdrawn or answered elsewhere"
        return None

    def _drop(self, reason: str) -> bool:
        self.outcome = "dropped"
        self.stopped.set()
        event(log, logging.INFO, f"dropped question {self.q.id or self.q.name}: {reason}",
              MESSAGE_ID=MessageId.DROPPED, MANDOS_OUTCOME="dropped", MANDOS_REASON=reason,
              MANDOS_ELAPSED_MS=elapsed_ms(self.started), **self.fields())
        return True

    def _launch_due(self) -> float | None:
        """Start a fetch from every idle server that is due; return the next due time."""
        now = time.monotonic()
        servers = self.agent.known_servers()
        if not servers and not self.servers:
            self.agent.warn_no_servers()
        next_due: float | None = None
        for server in servers:
            st = self.servers.setdefault(server, _ServerState())
            if st.inflight:
                continue
            if st.next_at <= now:
                st.inflight = True
                self.agent.fetch_pool.submit(functools.partial(self._fetch, server))
            elif next_due is None or st.next_at < next_due:
                next_due = st.next_at
        return next_due

    def _fetch(self, server: Server) -> None:
        cfg, ctx = self.agent.cfg, self.agent.ctx
        assert ctx is not None
        start = time.monotonic()
        if self.stopped.is_set():  # waited in the pool's line past the question's end
            self.inbox.put(_Result(server, None, FetchError(server, "stopped"), 0))
            return
        try:
            data = fetch(server, ctx, connect_timeout=cfg.connect_timeout,
                         timeout=cfg.timeout, cancel=self.stopped)
        except FetchError as e:
            self.inbox.put(_Result(server, None, e, elapsed_ms(start)))
        except Exception as e:  # noqa: BLE001 - reported as this server's failure
            self.inbox.put(_Result(server, None, FetchError(server, str(e)), elapsed_ms(start)))
        else:
            self.inbox.put(_Result(server, data, None, elapsed_ms(start)))

    def _step(self) -> bool:
        """One turn of the loop; True when the job is over."""
        reason = self._gone()
        if reason:
            return self._drop(reason)
        next_due = self._launch_due()
        timeout = None if next_due is None else max(0.0, next_due - time.monotonic())
        left = self.q.seconds_left(monotonic_us())
        if left is not None:
            timeout = max(0.0, left) if timeout is None else min(timeout, max(0.0, left))
        if self.agent.pidfd_fallback and self.q.pid is not None:
            timeout = 1.0 if timeout is None else min(timeout, 1.0)
        try:
            msg = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return False
        if isinstance(msg, str):
            return False
        return self._result(msg)

    def _result(self, r: _Result) -> bool:
        st = self.servers.setdefault(r.server, _ServerState())
        st.inflight = False
        if r.error is None and r.data is not None:
            try:
                secret = self.agent.decrypt(r.data)
            except NotForUs as e:
                self._failed(r.server, st, str(e), r.elapsed_ms, outcome="not-for-us")
                return False
            except GpgError as e:
                self._failed(r.server, st, str(e), r.elapsed_ms)
                return False
            with secret:
                tag = secret_tag(self.tag_key, secret)
                if tag in self.refused:
                    self._failed(r.server, st, "its secret was already refused by this asker",
                                 r.elapsed_ms, outcome="secret-refused")
                    return False
                self.answer_tag = tag
                return self._answer(r.server, secret, r.elapsed_ms)
        assert r.error is not None
        self._failed(r.server, st, r.error.reason, r.elapsed_ms,
                     refused=isinstance(r.error, Refused))
        return False

    def _failed(self, server: Server, st: _ServerState, reason: str, elapsed_ms: int,
                refused: bool = False, outcome: str = "") -> None:
        st.failures += 1
        pause = min(self.agent.cfg.retry_max, RETRY_FIRST * 2 ** (st.failures - 1))
        st.next_at = time.monotonic() + pause
        # The first failure and every change of reason are worth an INFO line;
        # the same failure again (waiting for the network) only at debug level.
        level = logging.INFO if reason != st.last_reason else logging.DEBUG
        st.last_reason = reason
        if self.stopped.is_set():
            level = logging.DEBUG
        event(log, level, f"{server}: {reason} (try {st.failures}, again in {pause:g} s)",
              MESSAGE_ID=MessageId.SERVER_FAILED,
              MANDOS_OUTCOME=outcome or ("refused" if refused else "server-failed"),
              MANDOS_SERVER=server, MANDOS_REASON=reason, MANDOS_ELAPSED_MS=elapsed_ms,
              MANDOS_ATTEMPT=st.failures, **self.fields())

    def _answer(self, server: Server, secret: Secret, fetch_ms: int) -> bool:
        reason = self._gone()
        if reason:
            return self._drop(reason)
        # Noted before sending: the asker's next try may follow at once and must find it.
        self.agent.answered(self)
        try:
            send_answer(self.q.socket, secret)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                return self._drop(f"the asker's socket is gone ({e.strerror})")
            raise
        self.outcome = "answered"
        self.stopped.set()
        total = elapsed_ms(self.started)
        note = "" if os.geteuid() == 0 else " (not root: the asker will ignore it)"
        event(log, logging.INFO,
              f"answered question {self.q.id or self.q.name} with the secret from {server} "
              f"in {total} ms{note}",
              MESSAGE_ID=MessageId.ANSWERED, MANDOS_OUTCOME="answered", MANDOS_SERVER=server,
              MANDOS_ELAPSED_MS=total, MANDOS_FETCH_MS=fetch_ms, **self.fields())
        return True

