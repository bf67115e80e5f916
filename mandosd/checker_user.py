"""Who checker commands run as: a system user with no rights but ``CAP_NET_RAW``.

The checker pass runs as root: it reads the root-only clients.conf and writes
the state store.  The commands it runs (fping, ssh-keyscan, an admin's script)
talk to the network and parse what comes back, so they run as
:data:`CHECKER_USER` (created when missing, as ``useradd --system`` does; the
systemd unit creates it with ``systemd-sysusers``), with no supplementary
groups, ``no_new_privs``, and only ``CAP_NET_RAW`` (inheritable and ambient, so
fping gets its ICMP socket whether or not its file capability applies).  They
cannot open the state store (0700 root) nor clients.conf (0600 root).

The switch is made by util-linux's ``setpriv`` between fork and exec: Python's
``subprocess`` can change the user but not keep one capability across the
change, and a ``preexec_fn`` is unsafe beside the pass's database thread.

When the pass itself does not run as root there is nothing to drop: commands run
as the pass's own user.  This module must never fall back to running a command
as root.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from mandos_core.run import minimal_env

log = logging.getLogger("mandosd.checker")

CHECKER_USER = "_mandos-checker"
#: used only when CHECKER_USER does not exist and cannot be created
FALLBACK_USER = "nobody"
CAP_NET_RAW = 13
CAP_SETPCAP = 8


class NoIdentity(Exception):
    """Running as root, but no way to run a checker unprivileged: the checker is not run."""


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int


def _capabilities(field: str) -> int:
    """This process's capability set *field* (``CapPrm``, ...) from /proc/self/status."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _create_user() -> None:
    useradd = shutil.which("useradd", path=minimal_env()["PATH"])
    if useradd is None:
        return
    subprocess.run(  # noqa: S603 - argv list, no shell
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", "--comment", "Mandos checker commands", CHECKER_USER],
        stdin=subprocess.DEVNULL, capture_output=True, env=minimal_env(), check=False)


@functools.cache
def identity() -> Identity | None:
    """The unprivileged identity for checkers, or None when this process is not root."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(CHECKER_USER)
    except KeyError:
        _create_user()
        try:
            pw = pwd.getpwnam(CHECKER_USER)
            log.info("created the system user %s for checker commands", CHECKER_USER)
        except KeyError:
            try:
                pw = pwd.getpwnam(FALLBACK_USER)
            except KeyError:
                raise NoIdentity(f"no user {CHECKER_USER} (nor {FALLBACK_USER}) to run "
                                 "checkers as; create it: useradd --system --user-group "
                                 f"{CHECKER_USER}") from None
            log.warning("no user %s and it could not be created; checkers run as %s "
                        "(create it: useradd --system --user-group %s)",
                        CHECKER_USER, FALLBACK_USER, CHECKER_USER)
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise NoIdentity(f"user {pw.pw_name} is root; checkers must not run as root")
    return Identity(pw.pw_name, pw.pw_uid, pw.pw_gid)


@functools.cache
def _setpriv() -> str:
    path = shutil.which("setpriv", path=minimal_env()["PATH"])
    if path is None:
        raise NoIdentity("setpriv (util-linux) not found: cannot run checkers unprivileged")
    return path


def wrap(argv: Sequence[str]) -> list[str]:
    """*argv* as the command to start: through ``setpriv`` to the checker user when root."""
    return [*_prefix(), *argv]


@functools.cache
def _prefix() -> tuple[str, ...]:
    """What goes before a checker's argv (found once: a pass starts thousands)."""
    who = identity()
    if who is None:
        return ()
    opts = [f"--reuid={who.uid}", f"--regid={who.gid}", "--clear-groups", "--no-new-privs"]
    if _capabilities("CapPrm") & (1 << CAP_NET_RAW):
        opts += ["--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw"]
        keep = "+net_raw"
    else:
        opts += ["--inh-caps=-all"]
        keep = ""
    if _capabilities("CapEff") & (1 << CAP_SETPCAP):
        opts.append("--bounding-set=-all" + ("," + keep if keep else ""))
    return (_setpriv(), *opts, "--")
