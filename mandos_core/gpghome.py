"""Private, temporary GnuPG homes: make one, and tear it down with its gpg-agent.

Every program here that runs gpg on a private key does it in a throw-away
GNUPGHOME (0700): the agent and ``mandos-client`` hold the client's secret key
there, ``mandos-keygen`` makes keys there.  gpg starts a gpg-agent for the home
that outlives gpg itself, so the one teardown, :func:`remove`, stops every
gpg-agent serving that home (found through ``/proc``, waited for through a
pidfd) and only then removes the directory: when it returns, no process and no
file of ours is left.  Callers stop their own gpg children first, so that none
can start a new gpg-agent behind our back.

Standard library only (the initrd imports it).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import tempfile
import time

#: How long a gpg-agent has to exit after SIGTERM before it gets SIGKILL.
TERM_GRACE = 1.0


def make(prefix: str, parent: str | None = None) -> str:
    """A new private (0700) directory for GNUPGHOME."""
    home = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(home, 0o700)
    return home


def agent_pids(home: str) -> list[int]:
    """PIDs of the gpg-agents started for *home* (``gpg-agent --homedir HOME ...``)."""
    want = os.fsencode(home)
    out = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if not argv or os.path.basename(argv[0]) != b"gpg-agent":
                continue
            if any(a == b"--homedir" and b == want for a, b in zip(argv, argv[1:], strict=False)):
                out.append(int(name))
    return out


def _wait_gone(pidfd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _stop(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (old kernel): signal by PID and poll /proc
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + TERM_GRACE
        while os.path.exists(f"/proc/{pid}/cmdline") and time.monotonic() < deadline:
            time.sleep(0.01)
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not _wait_gone(pidfd, TERM_GRACE):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            _wait_gone(pidfd, TERM_GRACE)
    finally:
        os.close(pidfd)


def remove(home: str) -> None:
    """Stop the gpg-agents of *home*, then remove it; never raises."""
    for pid in agent_pids(home):
        _stop(pid)
    shutil.rmtree(home, ignore_errors=True)
    for pid in agent_pids(home):  # one that was starting during the scan
        _stop(pid)
