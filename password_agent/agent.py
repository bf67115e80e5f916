"""``mandos-password-agent``: answer systemd's cryptsetup questions with secrets from key servers.

One main thread waits (``selectors``) on inotify for the ask directory, on a
pidfd per asking process, on signals and on its workers.  Every answerable
question gets a :class:`~password_agent.job.Job` thread that asks all known
servers at once (through one bounded pool of fetch threads), retries each failed
server after a growing pause, decrypts the first secret encrypted to our key
and sends ``+password`` to the asker's socket.  A question that disappears,
whose asker exits, or whose ``NotAfter`` passes, is dropped at once.  An asker
that asks again after our answer refused it: that secret is never sent to it
again, and the other servers are still asked.

SIGTERM, SIGINT and SIGHUP stop it cleanly at any point of its life (clean-up
included: the gpg-agent and the temporary GNUPGHOME with the private key go).

Run as ``mandos-password-agent`` or ``python3 -m password_agent.agent``
(the initrd does the latter).  Settings: :mod:`password_agent.agentconf`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import selectors
import signal
import sys
import threading
import time
from collections.abc import Callable

from mandos_core import log as logsetup
from mandos_core.cli import oserror_line, root_hint
from mandos_core.hardening import disable_core_dumps
from mandos_core.inotify import (
    IN_CLOSE_WRITE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
    InotifyError,
)
from mandos_core.keyfiles import KeyError_, KeyFiles, check_private_keys, server_context
from mandos_core.log import event
from mandos_core.secret import Secret
from mandos_core.tls import ClientTLS

from .agentconf import AgentConfig, ConfigError, build_parser, load
from .askfile import (
    AskFileError,
    Question,
    is_ask_name,
    monotonic_us,
    pid_alive,
    read_ask,
    skip_reason,
)
from .client import Server
from .discovery import Discovery
from .gpg import Decryptor, GpgError
from .job import FetchPool, Job, MessageId, elapsed_ms

log = logging.getLogger("mandos-password-agent")

EXIT_OK = 0
EXIT_WATCH = 1
EXIT_USAGE = 2
EXIT_KEYS = 3

WATCH_MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM | IN_ONLYDIR
#: With --exit-when-idle, stay this long after the last question (the next volume's
#: question usually follows within milliseconds).
IDLE_LINGER = 0.5
#: The signals that stop the agent (cleanly, whatever it is doing).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Agent:
    """The main loop: watch the ask directory, start and stop jobs."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.ask_dir = str(cfg.ask_dir)
        self.ctx: ClientTLS | None = None
        self.decryptor: Decryptor | None = None
        self._decrypt_lock = threading.Lock()
        self.discovery: Discovery | None = None
        self.jobs: dict[str, Job] = {}
        self.reported: set[str] = set()  # skipped questions, logged once each
        self.answered_names: set[str] = set()
        #: (Id, PID) of askers answered -> tags of the secrets we sent them.  The same asker
        #: asking the same again means it refused them (systemd-cryptsetup's next try):
        #: those are never sent to it again, and the other servers are still asked.
        self.answered_askers: dict[tuple[str, int], frozenset[bytes]] = {}
        self.tag_key = secrets.token_bytes(32)
        self.fetch_pool = FetchPool()
        self.pidfds: dict[int, str] = {}
        self.pidfd_fallback = not hasattr(os, "pidfd_open")
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.exit_code = EXIT_OK
        self._done: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._warned_no_servers = False
        self._lock = threading.Lock()

    # --- called from job threads ---------------------------------------------------------

    def known_servers(self) -> list[Server]:
        servers = list(self.cfg.connect)
        if self.discovery is not None:
            servers.extend(s for s in self.discovery.servers() if s not in servers)
        return servers

    def warn_no_servers(self) -> None:
        with self._lock:
            if self._warned_no_servers:
                return
            self._warned_no_servers = True
        log.warning("no key server known yet: waiting for a zeroconf announcement"
                    if self.discovery else "no key server to ask (use --connect)")

    def decrypt(self, message: bytes) -> Secret:
        assert self.decryptor is not None
        with self._decrypt_lock:
            return self.decryptor.decrypt(message)

    def answered(self, job: Job) -> None:
        with self._lock:
            self.answered_names.add(job.q.name)
            if job.q.pid is not None and job.answer_tag is not None:
                self.answered_askers = {(i, p): t for (i, p), t in self.answered_askers.items()
                                        if pid_alive(p)}
                key = (job.q.id, job.q.pid)
                self.answered_askers[key] = (self.answered_askers.get(key, frozenset())
                                             | {job.answer_tag})

    def refused_by(self, q: Question) -> frozenset[bytes]:
        """Tags of the secrets this asker refused (it asks again after our answers)."""
        with self._lock:
            if q.pid is None:
                return frozenset()
            return self.answered_askers.get((q.id, q.pid), frozenset())

    def stop(self) -> None:
        """Stop the main loop (from a signal handler or another thread)."""
        self.stopping = True
        self._wake()

    def job_done(self, job: Job) -> None:
        self._done.put(job)
        self._wake()

    def servers_changed(self) -> None:
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.poke()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending), or closed at exit
            os.write(self._wake_w, b"x")

    # --- set-up ----------------------------------------------------------------------------

    def load_keys(self) -> None:
        """Make the TLS context and the gpg home once, so answering is fast.

        The OpenPGP key import runs in the background (it overlaps the first fetch);
        if it fails, the agent stops with EXIT_KEYS rather than retry in vain.
        """
        keys = KeyFiles.from_dir(self.cfg.keydir)
        check_private_keys(self.cfg.keydir, keys)
        self.decryptor = Decryptor(keys.seckey, keys.pubkey)
        self.ctx = server_context(keys)
        wait_ready = getattr(self.decryptor, "wait_ready", None)
        if wait_ready is not None:
            threading.Thread(target=self._wait_gpg, args=(wait_ready,), daemon=True,
                             name="gpg import").start()

    def _wait_gpg(self, wait_ready: Callable[[], None]) -> None:
        try:
            with self._decrypt_lock:  # a decrypt() waits for the import, not beside it
                wait_ready()
        except GpgError as e:
            log.error("%s", e)
            self.exit_code = EXIT_KEYS
            self.stopping = True
            self._wake()

    def start_discovery(self) -> None:
        if not self.cfg.zeroconf:
            return
        d = Discovery(self.servers_changed)
        if d.start():
            self.discovery = d

    def watch(self) -> Inotify:
        os.makedirs(self.ask_dir, mode=0o755, exist_ok=True)
        ino = Inotify()
        ino.add_watch(self.ask_dir, WATCH_MASK)
        return ino

    def answerable_now(self) -> list[Question]:
        """The questions in the directory this agent would answer (no side effects)."""
        out = []
        for name in self._ask_names():
            try:
                q = read_ask(os.path.join(self.ask_dir, name))
            except (OSError, AskFileError):
                continue
            if skip_reason(q, now_us=monotonic_us(), id_prefixes=self.cfg.id_prefix) is None:
                out.append(q)
        return out

    def _ask_names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.ask_dir) if is_ask_name(n))
        except OSError as e:
            log.warning("cannot list %s: %s", self.ask_dir, e.strerror)
            return []

    # --- questions -------------------------------------------------------------------------

    def consider(self, name: str) -> None:
        if name in self.jobs or name in self.answered_names or name in self.reported:
            return
        path = os.path.join(self.ask_dir, name)
        try:
            q = read_ask(path)
        except FileNotFoundError:
            return
        except AskFileError as e:
            self.reported.add(name)
            event(log, logging.WARNING, f"skipping malformed question {name}: {e.reason}",
                  MESSAGE_ID=MessageId.SKIPPED, MANDOS_OUTCOME="malformed",
                  MANDOS_ASK_FILE=path, MANDOS_REASON=e.reason)
            return
        level = logging.INFO
        reason = skip_reason(q, now_us=monotonic_us(), id_prefixes=self.cfg.id_prefix)
        if reason is not None and reason.startswith("Id="):
            level = logging.DEBUG  # someone else's question: not our business
        refused = self.refused_by(q) if reason is None else frozenset()
        if refused:
            event(log, logging.WARNING,
                  f"process {q.pid} asks again after our answer, so it refused that secret: "
                  f"it will not be sent again; asking the key servers for another "
                  f"({len(refused)} refused so far)",
                  MESSAGE_ID=MessageId.SKIPPED, MANDOS_OUTCOME="asked-again",
                  MANDOS_QUESTION_ID=q.id, MANDOS_ASK_FILE=path, MANDOS_ASKER_PID=q.pid)
        if reason:
            self.reported.add(name)
            event(log, level,
                  f"leaving question {q.id or name} alone: {reason}",
                  MESSAGE_ID=MessageId.SKIPPED, MANDOS_OUTCOME="skipped",
                  MANDOS_QUESTION_ID=q.id, MANDOS_ASK_FILE=path, MANDOS_REASON=reason)
            return
        job = Job(self, q, refused=refused, tag_key=self.tag_key)
        event(log, logging.INFO, f"asking key servers for question {q.id or name}",
              MANDOS_OUTCOME="asking", MANDOS_SERVERS=" ".join(map(str, self.known_servers())),
              **job.fields())
        with self._lock:
            self.jobs[name] = job
        self._watch_pid(job)
        job.start()

    def _watch_pid(self, job: Job) -> None:
        pid = job.q.pid
        if pid is None or self.pidfd_fallback:
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            job.stop(f"the asking process {pid} exited")
            return
        except OSError as e:  # old kernel, seccomp: check liveness on every turn instead
            log.debug("pidfd_open: %s; checking the asker's PID every second", e)
            self.pidfd_fallback = True
            return
        self.pidfds[fd] = job.q.name
        self.sel.register(fd, selectors.EVENT_READ, "pidfd")

    def _unwatch_pid(self, name: str) -> None:
        for fd, n in list(self.pidfds.items()):
            if n == name:
                del self.pidfds[fd]
                self.sel.unregister(fd)
                os.close(fd)

    def forget(self, name: str, reason: str) -> None:
        self.reported.discard(name)
        self.answered_names.discard(name)
        job = self.jobs.get(name)
        if job is not None:
            job.stop(reason)

    def rescan(self) -> None:
        names = set(self._ask_names())
        for name in list(self.jobs):
            if name not in names:
                self.forget(name, "the question was withdrawn or answered elsewhere")
        self.reported &= names
        self.answered_names &= names
        for name in sorted(names):
            self.consider(name)

    # --- main loop -------------------------------------------------------------------------

    def _on_inotify(self, ino: Inotify) -> None:
        for ev in ino.read():
            if ev.mask & IN_Q_OVERFLOW:
                log.debug("inotify queue overflow: rescanning %s", self.ask_dir)
                self.rescan()
            elif ev.mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                log.warning("%s was removed; watching it again", self.ask_dir)
                self._rewatch(ino)
            elif not is_ask_name(ev.name):
                continue
            elif ev.mask & (IN_DELETE | IN_MOVED_FROM):
                self.forget(ev.name, "the question was withdrawn or answered elsewhere")
            elif ev.mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
                self.reported.discard(ev.name)
                self.consider(ev.name)

    def _rewatch(self, ino: Inotify) -> None:
        try:
            os.makedirs(self.ask_dir, mode=0o755, exist_ok=True)
            ino.add_watch(self.ask_dir, WATCH_MASK)
        except (OSError, InotifyError) as e:
            log.error("cannot watch %s again: %s", self.ask_dir, e)
            self.stopping = True
            self.exit_code = EXIT_WATCH
            return
        self.rescan()

    def _reap(self) -> None:
        while True:
            try:
                job = self._done.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                if self.jobs.get(job.q.name) is job:
                    del self.jobs[job.q.name]
            self._unwatch_pid(job.q.name)
            if job.outcome == "answered" and self.cfg.once:
                log.debug("--once: the first question is answered, exiting")
                self.stopping = True

    def _on_pidfd(self, fd: int) -> None:
        name = self.pidfds.get(fd)
        job = self.jobs.get(name) if name else None
        if job is not None:
            job.stop(f"the asking process {job.q.pid} exited")
        if name:
            self._unwatch_pid(name)

    def run(self, ino: Inotify) -> int:
        sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
        self.sel.register(ino.fileno(), selectors.EVENT_READ, "inotify")
        self.sel.register(sig_r, selectors.EVENT_READ, "signal")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        idle_since: float | None = None
        try:
            self.rescan()
            while not self.stopping:
                timeout = None
                if self.cfg.exit_when_idle:
                    if self.jobs:
                        idle_since = None
                    else:
                        idle_since = idle_since or time.monotonic()
                        timeout = IDLE_LINGER - (time.monotonic() - idle_since)
                        if timeout <= 0:
                            self.rescan()  # last look, in case an event was missed
                            if not self.jobs:
                                log.debug("no question left to answer, exiting")
                                break
                            continue
                for key, _ in self.sel.select(timeout):
                    try:
                        if key.data == "inotify":
                            self._on_inotify(ino)
                        elif key.data == "pidfd":
                            self._on_pidfd(int(key.fd))
                        else:
                            with contextlib.suppress(BlockingIOError):
                                os.read(int(key.fd), 4096)
                    except Exception as e:  # log, keep watching
                        log.error("error handling an event: %s", e,
                                  exc_info=log.isEnabledFor(logging.DEBUG))
                self._reap()
        finally:
            for job in list(self.jobs.values()):
                job.stop("the agent is stopping")
            signal.set_wakeup_fd(old_wakeup)
            self.sel.close()
            for fd in (sig_r, sig_w, self._wake_r, self._wake_w, *self.pidfds):
                with contextlib.suppress(OSError):
                    os.close(fd)
        return self.exit_code

    def close(self) -> None:
        if self.discovery is not None:
            self.discovery.close()
        if self.decryptor is not None:
            self.decryptor.close()


def _warn_not_root() -> None:
    if os.geteuid() != 0:
        log.warning("not running as root: systemd's askers accept answers only from root "
                    "(they check the sender's credentials), so answers will be ignored")


class _Signals:
    """Handlers for STOP_SIGNALS for the agent's whole life: they never raise, so no
    signal can cut the clean-up short; before the main loop runs they only take note."""

    def __init__(self) -> None:
        self.agent: Agent | None = None
        self.caught: int | None = None
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.caught = signum
        if self.agent is not None:
            self.agent.stop()

    def attach(self, agent: Agent) -> None:
        self.agent = agent
        if self.caught is not None:
            agent.stop()


def main(argv: list[str] | None = None) -> int:
    disable_core_dumps()
    signals = _Signals()
    try:
        cfg = load(argv)
    except ConfigError as e:
        print(f"mandos-password-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    logsetup.setup("mandos-password-agent", cfg.debug)
    if not cfg.connect and not cfg.zeroconf:
        build_parser().print_usage(sys.stderr)
        print("mandos-password-agent: no server to ask: give --connect HOST:PORT "
              "or allow zeroconf discovery", file=sys.stderr)
        return EXIT_USAGE
    agent = Agent(cfg)
    signals.attach(agent)
    try:
        try:
            ino = agent.watch()
        except (OSError, InotifyError) as e:
            hint = root_hint(e) if isinstance(e, OSError) else ""
            log.error("cannot watch %s: %s%s", cfg.ask_dir, e.strerror or e, hint)
            return EXIT_WATCH
        with ino:
            if cfg.exit_when_idle and not agent.answerable_now():
                log.debug("no question to answer in %s", cfg.ask_dir)
                return EXIT_OK
            t0 = time.monotonic()
            try:
                agent.load_keys()
            except (KeyError_, GpgError) as e:
                log.error("%s", e)
                return EXIT_KEYS
            except OSError as e:  # a key file this user may not read
                log.error("%s", oserror_line(e))
                return EXIT_KEYS
            _warn_not_root()  # after the keys: a key this user cannot read says it all
            if agent.stopping:
                return agent.exit_code
            agent.start_discovery()
            event(log, logging.INFO if not cfg.exit_when_idle else logging.DEBUG,
                  f"watching {cfg.ask_dir} for questions "
                  f"(keys loaded in {elapsed_ms(t0)} ms)", MESSAGE_ID=MessageId.STARTED,
                  MANDOS_OUTCOME="started",
                  MANDOS_SERVERS=" ".join(map(str, cfg.connect)) or None,
                  MANDOS_ZEROCONF="yes" if agent.discovery else "no")
            return agent.run(ino)
    finally:
        agent.close()
        # the clean-up is done: a stop signal now (systemd at switch-root) has nothing
        # left to stop, and must not turn a clean exit into death by signal while the
        # interpreter shuts down (which would restore the default handlers)
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())

