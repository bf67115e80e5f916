"""Run one checker process: unprivileged, bounded in time, pipes included, descendants killed.

* The process runs as the checker user (:mod:`mandosd.checker_user`) through
  ``setpriv``; it starts a new session, so it leads its own process group.
* The checker's *interval* bounds the whole run: the process, and the reads of
  its stdout and stderr.  A background child that keeps a pipe open
  (``sh -c 'sleep 60 & exit 0'``) cannot hold the pass.
* Descendants die with the checker: when the checker exits (or its interval
  is over), its whole process group gets SIGKILL.  The group is killed while the
  checker is still an unreaped zombie (its exit is seen through a pidfd, the
  zombie reaped only afterwards), so the group id cannot have been reused by
  then.  A descendant that escaped into a session of its own is beyond a
  process group: :func:`adopting_escapees` makes the pass adopt and kill it,
  and under systemd the unit's cgroup (``KillMode=control-group``) ends it too.

This module never decides what a result means; :mod:`mandosd.checker` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from mandos_core.run import minimal_env

from . import checker_user

log = logging.getLogger("mandosd.checker")

#: status values as Mandos reports LastCheckerStatus
KILLED = -1
NOT_FOUND = 127
NOT_EXECUTABLE = 126
#: after the checker exited, how long its pipes may still be read when its interval is over
GRACE = 0.2


@dataclass(frozen=True)
class Outcome:
    """How one checker process ended."""

    #: exit status, ``-N`` for a signal, :data:`KILLED` when killed at its interval
    status: int
    #: the first bytes of stdout (only when asked for)
    out: bytes = b""
    #: the last bytes of stderr (all of it up to the limit, when asked for a head)
    err: bytes = b""
    #: set when the program could not be started at all
    start_error: str = ""


async def _drain(fd: int, limit: int, *, head: bool) -> bytes:
    """Read *fd* to EOF; keep the first (*head*) or last *limit* bytes.  Closes *fd*."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = bytearray()
    eof: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                loop.remove_reader(fd)
                if not eof.done():
                    eof.set_result(None)
                return
            if head:
                if len(buf) < limit:
                    buf.extend(chunk[:limit - len(buf)])
            else:
                buf.extend(chunk)
                del buf[:-limit or len(buf)]

    loop.add_reader(fd, readable)
    try:
        await eof
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return bytes(buf)


class _Group:
    """A started checker: its Popen, a pidfd for its exit, and a safe group kill."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pidfd = os.pidfd_open(proc.pid)
        self.reaped = False

    def kill(self) -> None:
        """SIGKILL the whole process group (a no-op once the leader has been reaped)."""
        if self.reaped:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def exited(self, timeout: float | None) -> bool:
        """Wait until the leader exits (a zombie, not yet reaped); False on timeout."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(self.pidfd, ready)
        try:
            await asyncio.wait({done}, timeout=timeout)
        finally:
            loop.remove_reader(self.pidfd)
        return done.done()

    def reap(self) -> int:
        """Kill what is left of the group, then reap the leader; its exit status."""
        self.kill()
        rc = self.proc.wait()
        self.reaped = True
        os.close(self.pidfd)
        return rc


def _spawn(argv: Sequence[str], out_fd: int | None, err_fd: int) -> subprocess.Popen[bytes]:
    log.debug("+ %s", shlex.join(argv))
    return subprocess.Popen(  # noqa: S603 - argv list, no shell
        list(argv), stdin=subprocess.DEVNULL,
        stdout=out_fd if out_fd is not None else subprocess.DEVNULL, stderr=err_fd,
        env=minimal_env(), cwd="/", start_new_session=True, close_fds=True)


async def run_bounded(argv: Sequence[str], limit: float, *, out_limit: int = 0,
                      err_limit: int = 512, err_head: bool = False,
                      on_start: Callable[[Callable[[], None]], None] | None = None
                      ) -> Outcome:
    """Run *argv* as the checker user for at most *limit* seconds, pipes included.

    *out_limit* > 0 captures that many bytes of stdout (else it goes to
    /dev/null); stderr keeps its last *err_limit* bytes (its first, with
    *err_head*).  *on_start* receives a function that kills the checker's group
    (``mandos-ctl --stop-checker``).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    try:
        wrapped = checker_user.wrap(argv)
    except checker_user.NoIdentity as e:
        return Outcome(NOT_EXECUTABLE, start_error=str(e))
    err_r, err_w = os.pipe()
    out_r, out_w = os.pipe() if out_limit else (None, None)
    try:
        proc = _spawn(wrapped, out_w, err_w)
    except FileNotFoundError:
        for fd in (err_r, out_r):
            if fd is not None:
                os.close(fd)
        return Outcome(NOT_FOUND, start_error=f"{wrapped[0]}: not found")
    except PermissionError:
        for fd in (err_r, out_r):
            if fd is not None:
                os.close(fd)
        return Outcome(NOT_EXECUTABLE, start_error=f"{wrapped[0]}: not executable")
    finally:
        os.close(err_w)
        if out_w is not None:
            os.close(out_w)
    group = _Group(proc)
    if on_start:
        on_start(group.kill)
    readers = [asyncio.ensure_future(_drain(err_r, err_limit, head=err_head))]
    if out_r is not None:
        readers.append(asyncio.ensure_future(_drain(out_r, out_limit, head=True)))
    killed = False
    try:
        if not await group.exited(max(0.0, deadline - loop.time())):
            killed = True
            group.kill()
            await group.exited(None)
        rc = group.reap()
        # The group is dead, so the pipes end now, unless an escaped process holds
        # one: read them only until the interval is over.
        await asyncio.wait(readers, timeout=max(GRACE, deadline - loop.time()))
    except asyncio.CancelledError:
        if not group.reaped:
            group.kill()
            group.reap()
        raise
    finally:
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    err = readers[0].result() if not readers[0].cancelled() else b""
    out = b""
    if len(readers) > 1 and not readers[1].cancelled():
        out = readers[1].result()
    return Outcome(KILLED if killed else rc, out=out, err=err)


PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def _prctl(option: int, arg: int | ctypes.c_int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    value = ctypes.byref(arg) if isinstance(arg, ctypes.c_int) else ctypes.c_ulong(arg)
    return int(libc.prctl(option, value, 0, 0, 0))


def _checker_children(uid: int) -> list[int]:
    """This process's children that run as *uid* (adopted descendants of checkers)."""
    me = os.getpid()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status", encoding="ascii", errors="replace") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if (int(fields.get("PPid", "0")) == me
                and int(fields.get("Uid", "-1 ").split()[0]) == uid):
            found.append(int(d))
    return found


@contextlib.contextmanager
def adopting_escapees() -> Iterator[None]:
    """Adopt checker descendants that left their process group; kill them at the end.

    A checker's child that starts a session of its own (``setsid``, a daemon's
    double fork) is out of reach of the group kill.  For the length of a pass this
    process is a child subreaper, so such orphans become its children instead of
    init's; when the pass ends, those running as the checker user are killed and
    reaped.  Only when checkers run as their own user (the pass is root): that uid
    says which children are checkers'.  Under systemd the unit's cgroup does the same.
    """
    try:
        who = checker_user.identity()
    except checker_user.NoIdentity:
        who = None
    if who is None:
        yield
        return
    was = ctypes.c_int(0)
    _prctl(PR_GET_CHILD_SUBREAPER, was)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
    finally:
        for _ in range(16):  # a killed escapee's own children are adopted in turn
            pids = _checker_children(who.uid)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for pid in pids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            log.info("killed %d checker processes that had left their checker's group",
                     len(pids))
        if not was.value:
            _prctl(PR_SET_CHILD_SUBREAPER, 0)
