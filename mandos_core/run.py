"""The one way this project runs a program: argv only, minimal environment.

Secrets travel on stdin (``input=``) or through a pipe fd, never in argv or the
environment.  Failures raise :class:`CommandError` (carrying argv, exit code
and stderr) or :class:`ToolMissing` when the program is not installed.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CommandError(Exception):
    """A program exited non-zero (or timed out)."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        what = "timed out" if returncode is None else f"failed with exit code {returncode}"
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        super().__init__(f"{self.argv[0]} {what}" + (f": {last}" if last else ""))


class ToolMissing(CommandError):
    def __init__(self, argv: Sequence[str]) -> None:
        super().__init__(argv, 127, "")
        self.args = (f"{argv[0]}: not installed (not found in PATH)",)


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", DEFAULT_PATH), "LC_ALL": "C.UTF-8"}
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run *argv*; return the completed process with stdout/stderr as bytes."""
    log.debug("+ %s", shlex.join(argv))
    try:
        proc = subprocess.run(  # noqa: S603 - argv list, no shell
            list(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=minimal_env(env),
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError:
        raise ToolMissing(argv) from None
    except subprocess.TimeoutExpired as e:
        raise CommandError(argv, None, (e.stderr or b"").decode(errors="replace")) from None
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc
