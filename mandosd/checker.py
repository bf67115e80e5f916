"""The checker pass: run the checks that are due, record results, disable the unreachable.

Mandos's semantics, run as one pass (by ``mandosd --run-checkers`` from
``mandosd-checker.timer``, or on a schedule inside a standalone ``mandosd``):

* each client's ``checker`` runs every ``interval``; success sets the deadline
  to now + ``timeout``; a checker still running when its interval is over is
  killed (its whole process group) and counts as a failure;
* a client whose deadline has passed is disabled (and audited) until an
  administrator enables it again;
* the command is an argv list: the string is split like a shell would
  (:mod:`mandosd.checker_shell`), then each word gets ``%(attr)s`` substitution
  of the client's attributes, so every value stays one argument.  No shell,
  ever: Mandos's ``ssh-keyscan ... | grep ...`` line runs as ssh-keyscan plus a
  match in Python; other shell syntax is reported once and not run;
* each command runs unprivileged, bounded by its interval, pipes included, and
  its descendants die with it (:mod:`mandosd.checker_run`); only this pass, as
  root, writes results to the state store.

Clients on the default ``fping -q -- %(host)s`` are checked in batches: one
``fping`` process for many hosts.  Other checkers run with bounded concurrency.
Results are written in batched transactions while the pass runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import random
import resource
import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mandos_core.durations import format_duration

from . import checker_shell, policy
from .audit import Kind, audit
from .checker_run import (
    KILLED,
    NOT_EXECUTABLE,
    NOT_FOUND,
    Outcome,
    adopting_escapees,
    run_bounded,
)
from .config import Client
from .state import CheckRecord, ClientState, StateStore, known_clients

log = logging.getLogger("mandosd.checker")

#: The default checker after clients.conf interpolation (``%%(host)s`` there).
DEFAULT_CHECKER = "fping -q -- %(host)s"
FPING_TEMPLATE = ("fping", "-q", "--", "%(host)s")
__all__ = ["KILLED", "NOT_EXECUTABLE", "NOT_FOUND", "CheckerPass", "Limits", "run_pass"]


class CheckerError(Exception):
    """A checker command that cannot be turned into an argv list."""


@dataclass(frozen=True)
class Limits:
    #: checkers other than batched fping running at the same time
    concurrency: int = 64
    #: hosts per fping process
    fping_batch: int = 256
    #: fping processes at the same time
    fping_processes: int = 8
    #: due checks claimed at a time: the next batch is claimed only when this server is
    #: about to run it, so the servers of a pool share a pass instead of one taking all
    claim_batch: int = 256
    #: results are written to the store at least this often (seconds)
    flush_every: float = 0.5
    #: how often a running pass looks for ``mandos-ctl --stop-checker`` (seconds)
    stop_poll: float = 1.0
    #: bytes of a checker's stderr kept for the audit log (the tail)
    stderr_tail: int = 512


def _timestamp(t: float | None) -> str:
    if t is None:
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).replace(tzinfo=None).isoformat(
        timespec="milliseconds")


def runtime_attributes(client: Client, state: ClientState | None) -> dict[str, str]:
    """What ``%(name)s`` may name in a checker: clients.conf keys plus Mandos's runtime ones.

    Mandos's runtime expansions (``approval_delay``, ``approval_duration``,
    ``created``, ``enabled``, ``expires``, ``key_id``, ``fingerprint``, ``host``,
    ``interval``, ``last_approval_request``, ``last_checked_ok``,
    ``last_enabled``, ``name``, ``timeout``) win over raw config values.
    """
    attrs = {k: str(v) for k, v in client.attributes.items()}
    attrs.update({
        "name": client.name,
        "host": client.host,
        "key_id": client.key_id or "",
        "fingerprint": client.fingerprint,
        "timeout": format_duration(client.timeout),
        "interval": format_duration(client.interval),
        "extended_timeout": format_duration(client.extended_timeout),
        "approval_delay": format_duration(client.approval_delay),
        "approval_duration": format_duration(client.approval_duration),
    })
    if state is not None:
        attrs.update({
            "enabled": str(state.enabled),
            "expires": _timestamp(state.deadline),
            "created": _timestamp(state.created),
            "last_checked_ok": _timestamp(state.last_checked_ok),
            "last_enabled": _timestamp(state.last_enabled),
            "last_approval_request": _timestamp(state.last_approval_request),
        })
    attrs.pop("secret", None)
    return attrs


def substitute(words: Sequence[str], attributes: Mapping[str, str], command: str) -> list[str]:
    """``%(attr)s`` substitution in each word: a value never splits or joins arguments."""
    out = []
    for w in words:
        try:
            out.append(w % attributes)
        except KeyError as e:
            raise CheckerError(f"checker {command!r}: unknown attribute %({e.args[0]})s "
                               f"(known: {', '.join(sorted(attributes))})") from None
        except (ValueError, TypeError) as e:
            raise CheckerError(f"checker {command!r}: bad %-substitution in {w!r}: {e} "
                               "(a literal % is %% after clients.conf interpolation, "
                               "so %%%% in clients.conf)") from None
    return out


def checker_argv(command: str, attributes: Mapping[str, str]) -> list[str]:
    """Split *command* into words like a shell would, then substitute ``%(attr)s`` in each.

    A substituted value never splits or joins arguments, whatever spaces or
    quotes it holds.  ``%%`` is a literal ``%``.  Shell syntax (a pipeline,
    ``$(...)``) is refused: see :mod:`mandosd.checker_shell`.
    """
    p = checker_shell.plan(command)
    if not isinstance(p, checker_shell.Command):
        what = p.reason if isinstance(p, checker_shell.Unsupported) else "is a pipeline"
        raise CheckerError(f"checker {command!r} {what}")
    return substitute(p.words, attributes, command)


def fping_batchable(client: Client) -> bool:
    """On the default fping checker, with a host fping can report on by name."""
    p = checker_shell.plan(client.checker)
    host = client.host
    return (isinstance(p, checker_shell.Command) and p.words == FPING_TEMPLATE and bool(host)
            and not any(c.isspace() for c in host))


def unsupported_notice(client: Client) -> str | None:
    """The load-time warning for a checker that mandosd will not run, with its rewrite."""
    p = checker_shell.plan(client.checker)
    if not isinstance(p, checker_shell.Unsupported):
        return None
    return (f"[{client.name}] checker {client.checker!r} {p.reason}; it is not run and the "
            f"client will time out. Rewrite: {p.rewrite}")


NOTICES = "checker-notices"


def report_unsupported(clients: Iterable[Client], statedir: Path | None) -> list[str]:
    """Warn once about each checker that is not run: remembered in *statedir* across passes."""
    seen: set[str] = set()
    path = statedir / NOTICES if statedir is not None else None
    if path is not None:
        with contextlib.suppress(OSError):
            seen = set(path.read_text(encoding="ascii").split())
    current: set[str] = set()
    warned = []
    for c in clients:
        notice = unsupported_notice(c)
        if notice is None:
            continue
        tag = hashlib.sha256(f"{c.name}\0{c.checker}".encode()).hexdigest()[:32]
        current.add(tag)
        if tag not in seen:
            log.warning("%s", notice)
            warned.append(notice)
    if path is not None and current != seen:
        with contextlib.suppress(OSError):
            tmp = path.with_name(NOTICES + ".tmp")
            tmp.write_text("".join(t + "\n" for t in sorted(current)), encoding="ascii")
            os.replace(tmp, path)
    return warned


@dataclass
class PassReport:
    started: float = 0.0
    elapsed: float = 0.0
    checked: int = 0
    succeeded: int = 0
    failed: int = 0
    killed: int = 0
    fping_processes: int = 0
    other_processes: int = 0
    disabled: list[str] = field(default_factory=list)
    #: earliest next_check among enabled clients after the pass (for a scheduler)
    next_due: float | None = None
    #: CPU seconds of this process (all its threads) and of the checker processes
    cpu_pass: float = 0.0
    cpu_checkers: float = 0.0

    def summary(self) -> str:
        return (f"checked {self.checked} clients in {self.elapsed:.2f} s: "
                f"{self.succeeded} up, {self.failed} failed ({self.killed} killed at their "
                f"interval); {self.fping_processes} fping batches, {self.other_processes} "
                f"other checkers; {len(self.disabled)} disabled by timeout; CPU "
                f"{self.cpu_pass:.2f} s in the pass, {self.cpu_checkers:.2f} s in checkers")


def _cpu() -> tuple[float, float]:
    """CPU seconds of this process and of its reaped children (the checkers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    them = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, them.ru_utime + them.ru_stime


@dataclass(frozen=True)
class _Job:
    client: Client
    state: ClientState


class CheckerPass:
    """One pass over the due checkers.  Synchronous store calls run on one worker thread."""

    def __init__(self, store: StateStore, clients: Mapping[str, Client], configdir: Path, *,
                 clock: Callable[[], float] = time.time, limits: Limits = Limits()) -> None:
        self.store = store
        self.configured = clients
        self.configdir = configdir
        self.clock = clock
        self.limits = limits
        self.report = PassReport()
        self._pending: list[CheckRecord] = []
        self._running: dict[str, tuple[float, Callable[[], None]]] = {}
        self._stopped: set[str] = set()

    def _disable_expired(self, now: float) -> None:
        for st in self.store.disable_expired(now):
            self.report.disabled.append(st.name)
            audit(Kind.CLIENT_TIMED_OUT, f"{st.name}: timeout passed without a successful "
                  "checker; client disabled", client=st.name, key_id=st.key_id,
                  reason="deadline passed", deadline=_timestamp(st.deadline))

    async def run(self, only: Iterable[str] | None = None, force: bool = False) -> PassReport:
        """Run the due checks (or, with *force*, those of *only* now); return a report."""
        t0 = time.monotonic()
        cpu0 = _cpu()
        now = self.clock()
        self.report = PassReport(started=now)
        await asyncio.to_thread(self._disable_expired, now)
        states = await asyncio.to_thread(self.store.all)
        by_name = {s.name: s for s in states}
        clients = known_clients(self.configured, states, self.configdir)
        store_path = getattr(self.store, "path", None)  # SQLite: remembered beside the state
        await asyncio.to_thread(report_unsupported, clients.values(),
                                store_path.parent if store_path is not None else None)
        wanted = set(only) if only is not None else None
        candidates: dict[str, float] = {}
        for st in states:
            c = clients.get(st.name)
            if c is None or not st.enabled or (wanted is not None and st.name not in wanted):
                continue
            if force or st.next_check is None or st.next_check <= now:
                candidates[st.name] = policy.effective(c, st).interval
        flusher = asyncio.create_task(self._flush_loop())
        stopper = asyncio.create_task(self._stop_loop())
        try:
            await self._claim_and_run(candidates, clients, by_name, force)
        finally:
            stopper.cancel()
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopper
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await asyncio.to_thread(self._flush)
        end = self.clock()
        await asyncio.to_thread(self._disable_expired, end)
        after = await asyncio.to_thread(self.store.all)
        due = [s.next_check for s in after if s.enabled and s.next_check is not None]
        self.report.next_due = min(due) if due else None
        self.report.elapsed = time.monotonic() - t0
        cpu1 = _cpu()
        self.report.cpu_pass = cpu1[0] - cpu0[0]
        self.report.cpu_checkers = cpu1[1] - cpu0[1]
        return self.report

    # -- results ----------------------------------------------------------

    def _finish(self, job: _Job, started: float, status: int, reason: str,
                argv: Sequence[str]) -> None:
        c = job.client
        finished = self.clock()
        if c.name in self._stopped:
            status, reason = KILLED, "stopped by an administrator (mandos-ctl --stop-checker)"
        ok = status == 0
        deadline = finished + c.timeout if ok else None
        self._pending.append(CheckRecord(name=c.name, started=started, finished=finished,
                                         status=status, next_check=started + c.interval,
                                         deadline=deadline))
        self._running.pop(c.name, None)
        self.report.checked += 1
        command = shlex.join(argv)
        if ok:
            self.report.succeeded += 1
            audit(Kind.CHECKER_SUCCEEDED, f"checker for {c.name} succeeded",
                  client=c.name, key_id=c.key_id, reason=reason, command=command,
                  checker_status=status, deadline=_timestamp(deadline))
        else:
            self.report.failed += 1
            if status == KILLED:
                self.report.killed += 1
            audit(Kind.CHECKER_FAILED, f"checker for {c.name} failed: {reason}",
                  client=c.name, key_id=c.key_id, reason=reason, command=command,
                  checker_status=status)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self.store.record_checks(pending)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.flush_every)
            if self._pending:
                await asyncio.to_thread(self._flush)

    async def _stop_loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.stop_poll)
            if not self._running:
                continue
            since = min(t for t, _ in self._running.values())
            stopped = await asyncio.to_thread(self.store.stop_requested,
                                              list(self._running), since)
            for name in stopped:
                entry = self._running.get(name)
                if entry is not None:
                    self._stopped.add(name)
                    entry[1]()

    def _started(self, job: _Job, argv: Sequence[str], now: float,
                 kill: Callable[[], None]) -> None:
        self._running[job.client.name] = (now, kill)
        audit(Kind.CHECKER_STARTED, f"starting checker for {job.client.name}",
              client=job.client.name, key_id=job.client.key_id, command=shlex.join(argv))

    # -- claiming ----------------------------------------------------------

    async def _claim_and_run(self, candidates: Mapping[str, float],
                             clients: Mapping[str, Client], by_name: Mapping[str, ClientState],
                             force: bool) -> None:
        """Claim the due checks a batch at a time and run them.

        The next batch is claimed when this server has started nearly all it holds,
        so the servers of a pool running a pass at once each claim what they can run
        (a check is still claimed, and run, once).  Each server begins at another
        place in the list, so that their claims seldom meet.
        """
        names = list(candidates)
        size = max(1, self.limits.claim_batch)
        chunks = [names[i:i + size] for i in range(0, len(names), size)]
        if len(chunks) > 1:
            first = random.randrange(len(chunks))  # noqa: S311 - not for security
            chunks = chunks[first:] + chunks[:first]
        others = asyncio.Semaphore(self.limits.concurrency)
        fpings = asyncio.Semaphore(self.limits.fping_processes)
        waiting = [0]  # claimed checks not started yet
        progress = asyncio.Event()

        def started(n: int) -> None:
            waiting[0] -= n
            progress.set()

        async def one(job: _Job) -> None:
            async with others:
                started(1)
                await self._run_one(job)

        async def fping(b: list[_Job]) -> None:
            async with fpings:
                started(len(b))
                await self._fping_batch(b)

        tasks: list[asyncio.Task[None]] = []
        try:
            for part in chunks:
                while waiting[0] > size // 2:  # enough in hand: claim when it runs low
                    progress.clear()
                    await progress.wait()
                claimed = await asyncio.to_thread(
                    self.store.claim_checks, {n: candidates[n] for n in part}, self.clock(),
                    force)
                jobs = [_Job(policy.effective(clients[n], by_name[n]), by_name[n])
                        for n in claimed]
                waiting[0] += len(jobs)
                batched = [j for j in jobs if fping_batchable(j.client)]
                tasks += [asyncio.create_task(fping(b)) for b in self._fping_batches(batched)]
                tasks += [asyncio.create_task(one(j)) for j in jobs
                          if not fping_batchable(j.client)]
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        except BaseException:
            # what was claimed runs to its end, also when a later claim failed
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        await asyncio.gather(*tasks)

    # -- one checker process per client -------------------------------------

    async def _run_one(self, job: _Job) -> None:
        c = job.client
        started = self.clock()
        plan = checker_shell.plan(c.checker)
        attrs = runtime_attributes(c, job.state)
        try:
            if isinstance(plan, checker_shell.Unsupported):
                raise CheckerError(f"checker {plan.reason}; not run (rewrite: {plan.rewrite})")
            words = plan.words if isinstance(plan, checker_shell.Command) else plan.scan
            argv = substitute(words, attrs, c.checker)
            patterns = (tuple(substitute(plan.patterns, attrs, c.checker))
                        if isinstance(plan, checker_shell.KeyScan) else ())
        except CheckerError as e:
            self._finish(job, started, NOT_FOUND, str(e), [c.checker])
            return
        self.report.other_processes += 1
        outcome = await run_bounded(
            argv, c.interval, err_limit=self.limits.stderr_tail,
            out_limit=KEYSCAN_OUTPUT if isinstance(plan, checker_shell.KeyScan) else 0,
            on_start=lambda kill: self._started(job, argv, started, kill))
        if isinstance(plan, checker_shell.KeyScan):
            status, reason = keyscan_result(outcome, patterns, plan.whole_line, c.interval)
            shown = [*argv, "|", "grep", "--fixed-strings",
                     *(["--line-regexp"] if plan.whole_line else []), "--quiet",
                     *(f"--regexp={p}" for p in patterns)]
        else:
            status, reason = command_result(outcome, argv, c.interval)
            shown = argv
        self._finish(job, started, status, reason, shown)

    # -- batched fping ------------------------------------------------------

    def _fping_batches(self, jobs: list[_Job]) -> list[list[_Job]]:
        # similar intervals together: a batch is killed at its shortest interval
        jobs = sorted(jobs, key=lambda j: (j.client.interval, j.client.host))
        size = self.limits.fping_batch
        return [jobs[i:i + size] for i in range(0, len(jobs), size)]

    async def _fping_batch(self, jobs: list[_Job]) -> None:
        hosts = list(dict.fromkeys(j.client.host for j in jobs))
        argv = ["fping", "--", *hosts]
        started = self.clock()
        limit = min(j.client.interval for j in jobs)
        self.report.fping_processes += 1
        kills: list[Callable[[], None]] = []

        def on_start(kill: Callable[[], None]) -> None:
            kills.append(kill)
            for j in jobs:
                one = ["fping", "-q", "--", j.client.host]
                self._started(j, one, started, lambda: None)

        outcome = await run_bounded(argv, limit, out_limit=FPING_OUTPUT, err_limit=FPING_OUTPUT,
                                    err_head=True, on_start=on_start)
        status = NOT_FOUND if outcome.start_error else outcome.status
        if status in (NOT_FOUND, NOT_EXECUTABLE) and not outcome.start_error:
            _, why = command_result(outcome, argv, limit)
            outcome = Outcome(NOT_FOUND, start_error=why)
        out, err = outcome.out.decode(errors="replace"), outcome.err.decode(errors="replace")
        alive, down, errors = parse_fping(out, err)
        for j in jobs:
            h = j.client.host
            one = ["fping", "-q", "--", h]
            if h in alive:
                self._finish(j, started, 0, "alive", one)
            elif h in errors:
                self._finish(j, started, 2, errors[h], one)
            elif h in down:
                self._finish(j, started, 1, "unreachable", one)
            elif status == KILLED:
                self._finish(j, started, KILLED, f"still running after its interval "
                             f"({format_duration(limit)}); killed", one)
            elif status == NOT_FOUND:
                self._finish(j, started, NOT_FOUND,
                             outcome.start_error or "fping: not installed", one)
            else:
                self._finish(j, started, 2, f"fping gave no answer for this host "
                             f"(exit status {status})", one)


def parse_fping(out: str, err: str) -> tuple[set[str], set[str], dict[str, str]]:
    """fping's per-target lines: ``HOST is alive``, ``HOST is unreachable``, ``HOST: error``."""
    alive: set[str] = set()
    down: set[str] = set()
    errors: dict[str, str] = {}
    for line in out.splitlines():
        host, sep, what = line.rpartition(" is ")
        if not sep:
            continue
        if what.strip() == "alive":
            alive.add(host)
        elif what.strip().startswith("unreachable"):
            down.add(host)
    for line in err.splitlines():
        host, sep, what = line.partition(": ")
        if sep and host and " " not in host:
            errors.setdefault(host, what.strip())
    return alive, down - alive, {h: e for h, e in errors.items() if h not in alive}


#: bytes of stdout kept from ssh-keyscan (a host's keys are a few kB) and from a batch fping
KEYSCAN_OUTPUT = 1 << 20
FPING_OUTPUT = 4 << 20


def _interval_reason(interval: float) -> str:
    return f"still running after its interval ({format_duration(interval)}); killed"


def command_result(o: Outcome, argv: Sequence[str], interval: float) -> tuple[int, str]:
    """(status, reason) of a plain checker command, as Mandos reports them."""
    if o.start_error:
        return o.status, o.start_error
    if o.status == KILLED:
        return KILLED, _interval_reason(interval)
    err = o.err.decode(errors="replace").strip()
    last = err.splitlines()[-1] if err else ""
    if o.status < 0:
        return KILLED, f"killed by signal {-o.status}"
    if o.status == 0:
        return 0, "exit status 0"
    if o.status in (NOT_FOUND, NOT_EXECUTABLE) and last.startswith("setpriv: failed to execute"):
        what = "not found" if o.status == NOT_FOUND else "not executable"
        return o.status, f"{argv[0]}: {what}"
    return o.status, f"exit status {o.status}" + (f": {last}" if last else "")


def keyscan_result(o: Outcome, patterns: Sequence[str], whole_line: bool,
                   interval: float) -> tuple[int, str]:
    """(status, reason) of Mandos's ``ssh-keyscan ... | grep -Fxq LINE``: grep's status.

    0 when ssh-keyscan printed the expected line; else 1, whatever went wrong
    before (ssh-keyscan missing, the host down, another host key), as the
    shell pipeline reports it.  Killed at its interval, it counts as killed.
    """
    if o.status == KILLED:
        return KILLED, _interval_reason(interval)
    if checker_shell.matches(o.out, tuple(patterns), whole_line):
        return 0, "host key matches ssh_fingerprint"
    if o.start_error:
        return 1, o.start_error
    err = o.err.decode(errors="replace").strip()
    last = err.splitlines()[-1] if err else ""
    if o.status in (NOT_FOUND, NOT_EXECUTABLE) and last.startswith("setpriv: failed to execute"):
        return 1, "ssh-keyscan: not found"
    if not o.out.strip():
        return 1, "ssh-keyscan got no host key" + (f" ({last})" if last else "")
    return 1, "host key differs from ssh_fingerprint"


def run_pass(store: StateStore, clients: Mapping[str, Client], configdir: Path, *,
             clock: Callable[[], float] = time.time, limits: Limits = Limits(),
             only: Iterable[str] | None = None, force: bool = False) -> PassReport:
    """Synchronous entry point (``mandosd --run-checkers``, ``mandos-ctl --start-checker``)."""
    with adopting_escapees():
        return asyncio.run(CheckerPass(store, clients, configdir, clock=clock,
                                       limits=limits).run(only=only, force=force))
