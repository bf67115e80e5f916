"""``change`` on a terminal: the conversation with the person at the keyboard.

Three tries for the current passphrase; what it opens (their own slot, the
backup passphrase, the pending backup) is said before anything else is
asked, and a recovery must be confirmed; a new passphrase is checked for
length and strength before the repeat is asked for.  Reads the volume and
the state, changes nothing: the flow (:meth:`.flows.Tool.change`) decides
again under the volume's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mandos_core.log import event
from mandos_core.secret import Secret

from .backend import open_volume
from .flows import MIN_PASSPHRASE, Refused, strength_hint
from .libcryptsetup import WrongPassphrase
from .messages import RECOVERY_WARNING
from .prompt import TRIES, InputError, Interrupted, Prompter
from .state import StateStore
from .volumes import Volume

log = logging.getLogger("luks_passphrase")


def _retry(left: int) -> str:
    return f" Try again ({left} {'try' if left == 1 else 'tries'} left)." if left else ""


def ask_current(p: Prompter, store: StateStore, vol: Volume) -> tuple[Secret, str]:
    """Up to three tries for the current passphrase; it and what it opens (see :func:`role`)."""
    for left in range(TRIES - 1, -1, -1):
        try:
            current = p.ask(f"Current passphrase for {vol}: ")
        except Interrupted:
            raise
        except InputError:
            if not left:
                raise InputError("no passphrase typed; nothing was changed") from None
            p.say("Nothing typed." + _retry(left))
            continue
        try:
            return current, role(store, vol, current)
        except WrongPassphrase:
            current.wipe()
            event(log, logging.INFO, f"{vol}: wrong passphrase typed", LUKS_PATH=vol.device)
            if not left:
                raise WrongPassphrase(f"that passphrase does not open {vol} either ({TRIES} "
                                      "tries); nothing was changed") from None
            p.say(f"That passphrase does not open {vol}." + _retry(left))
    raise AssertionError("unreachable")


def role(store: StateStore, vol: Volume, current: Secret) -> str:
    """What the slot *current* opens is: "user", "backup" or "pending" (reads only)."""
    with open_volume(vol.device) as lv:
        slot = lv.open_slot(current)
        st = store.load(lv.uuid)
        salt = lv.salt(slot)
    for ref, name in ((st.pending_backup, "pending"), (st.current_backup, "backup")):
        if ref is not None and ref.slot == slot and ref.salt == salt:
            return name
    return "user"


def new_passphrase(p: Prompter, what: str, current: Secret, *,
                   confirmed: bool = False) -> Callable[[], Secret]:
    """What the flow calls for the new passphrase, once it knows the current one's role
    (*confirmed*: ``--recovery`` said yes to a recovery in advance)."""
    def ask() -> Secret:
        if what == "backup":
            p.say(RECOVERY_WARNING)
            if not confirmed and not p.confirm("Go on with the recovery?"):
                raise Refused("recovery cancelled; nothing was changed")
        return p.ask_new("New passphrase", check=lambda new: problem(new, current),
                         strength=strength)
    return ask


def problem(new: Secret, current: Secret) -> str | None:
    """Why *new* cannot be the new passphrase (the flow's own rules, asked before the repeat)."""
    if len(new) < MIN_PASSPHRASE:
        return f"Too short: at least {MIN_PASSPHRASE} characters."
    if new == current:
        return "That is the current passphrase."
    return None


def strength(new: Secret) -> tuple[str, bool]:
    """The strength line to show, and whether to ask before taking a weak passphrase."""
    hint = strength_hint(new.reveal())
    if hint == "weak":
        return ("Strength: weak. It would be easy to guess; a few unrelated words are "
                "better.", True)
    return f"Strength: {hint}.", False
