"""What every command line here shares: ``--version``, and OSErrors as one line.

Standard library only (the agent imports it in the initrd).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import __version__

#: Mandos's protocol and file formats that the programs follow.
MANDOS_VERSION = "1.8.16"


def add_version(p: argparse.ArgumentParser) -> None:
    """``--version``: this project's version (and the Mandos version it follows)."""
    p.add_argument("--version", action="version",
                   version=f"%(prog)s (mandos-nbde) {__version__}, compatible with "
                   f"Mandos {MANDOS_VERSION}",
                   help="print the version and exit")


def root_hint(e: OSError) -> str:
    """`` (run as root)`` when *e* is a permission error that root would not meet."""
    return " (run as root)" if isinstance(e, PermissionError) and os.geteuid() != 0 else ""


def oserror_line(e: OSError, what: object = None) -> str:
    """``FILE: Permission denied (run as root)``: an OSError as one line, naming the file."""
    name = what if what is not None else e.filename
    reason = e.strerror or str(e)
    return f"{name}: {reason}{root_hint(e)}" if name is not None else f"{reason}{root_hint(e)}"


def unreachable(path: Path, *, create: bool = False) -> str | None:
    """One line if this user cannot reach *path* (``… Permission denied (run as root)``),
    or, with *create*, cannot make it where it is missing; None when all is well."""
    try:
        os.stat(path)
        return None
    except PermissionError as e:
        return oserror_line(e, path)
    except OSError:
        pass
    if not create:
        return None
    parent = path.parent
    while parent != parent.parent and not parent.exists():
        parent = parent.parent
    if os.access(parent, os.W_OK | os.X_OK):
        return None
    hint = " (run as root)" if os.geteuid() != 0 else ""
    return f"{path}: cannot be made here: {parent} is not writable{hint}"
