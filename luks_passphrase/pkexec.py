"""What ``luks-passphrase`` accepts when polkit's ``pkexec`` started it for a user.

The polkit action (``org.mandos-nbde.luks-passphrase.change``) makes this one
program root for a user who may change disk passphrases; the program itself
must then narrow that to the one thing the action is for: ``change VOLUME``
(``--recovery`` alone may come before VOLUME: it confirms a recovery, the window's question),
with the passphrase the user knows, on a volume the machine lists
(``/etc/crypttab`` or an active dm-crypt mapping), with the default state
directory, which must be root's alone.  No option (every one names a path or
changes what is kept), no other command (``resume``, ``sync``, ``import``,
``status``, ``gui``): a journal, a certificate or a crypttab of the caller's
choosing would let them destroy key slots or files as root.

Pure functions of the environment, the uids and the arguments: this module
reads nothing else, and never widens what an ordinary root run may do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: pkexec sets it to the calling user's uid (and clears the rest of the environment).
PKEXEC_UID = "PKEXEC_UID"
ONLY = "only `change [--recovery] VOLUME` is allowed through pkexec"


class NotAllowed(Exception):
    """A command line that pkexec's caller may not run (exit status 2)."""


def started_by_pkexec(environ: Mapping[str, str], uid: int, euid: int) -> bool:
    """Root for someone else: pkexec's ``PKEXEC_UID``, or a real uid that is not root's."""
    return PKEXEC_UID in environ or (euid == 0 and uid != 0)


def shown(arg: str) -> str:
    """*arg* as it may appear in a message: non-printable characters escaped."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in arg)[:200]


def allowed_change(argv: Sequence[str]) -> list[str]:
    """``change [--recovery] VOLUME`` as it may run; anything else raises :class:`NotAllowed`.

    ``--recovery`` names no path and widens nothing: it says yes in advance to the
    question a terminal would ask (the window asks it in its own dialog).
    """
    args = list(argv)
    recovery = args[1:2] == ["--recovery"]
    if recovery:
        del args[1]
    return ["change", *(["--recovery"] if recovery else []), allowed_volume(args)]


def allowed_volume(argv: Sequence[str]) -> str:
    """The VOLUME of ``change VOLUME``; any other command line raises :class:`NotAllowed`."""
    args = list(argv)
    if not args:
        raise NotAllowed(f"no command: {ONLY}")
    if args[0] != "change":
        raise NotAllowed(f"{shown(args[0])}: not allowed under pkexec; {ONLY}")
    if len(args) == 1:
        raise NotAllowed(f"change: name the VOLUME ({ONLY})")
    volume = args[1]
    if volume.startswith("-") or not volume:
        raise NotAllowed(f"{shown(volume)}: not allowed under pkexec; {ONLY}")
    if len(args) > 2:
        raise NotAllowed(f"{shown(args[2])}: not allowed under pkexec; {ONLY}")
    return volume
