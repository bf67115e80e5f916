"""What a person reads when ``change`` is done, in the terminal and in the window.

The flows return outcomes with key slot numbers, which belong in the journal
(they are logged there as events), not in front of someone who just typed a
new passphrase.  Pure functions; nothing here touches a volume.
"""

from __future__ import annotations

from .flows import Outcome

CHANGED = "Passphrase changed. Your new passphrase is set; the old one no longer works."
RECOVERED = ("Recovery done. Your new passphrase is set, and every other passphrase of this "
             "disk was removed. A new backup passphrase was made for the helpdesk; it goes to "
             "the escrow server at the next 'luks-passphrase sync', and the backup passphrase "
             "you used stops working once the server has the new one.")

RECOVERY_WARNING = ("This is the disk's backup passphrase, so this is a recovery: every other "
                    "passphrase of this disk will be removed (yours, and anyone else's). You then "
                    "choose a new passphrase, and a new backup passphrase is made for the "
                    "helpdesk.")


def plain(outcome: Outcome) -> str:
    """The sentence for *outcome* of ``change``, without key slot numbers."""
    if outcome.kind == "changed":
        return CHANGED
    if outcome.kind == "recovered":
        return RECOVERED
    return outcome.message
