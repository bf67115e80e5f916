"""The passphrase flows, each a sequence of small steps with a journal.

Every step that changes the LUKS header is preceded by a state write that
says what is about to happen (the *journal*), and followed by one that says
it happened.  A run that dies anywhere leaves a journal behind; the next run
on the volume calls :meth:`Tool.resume` first, which rolls the operation
forward where it is safe (the new passphrase was verified, or slots were
being removed that the user had already asked to remove) and back otherwise
(a new slot that was never verified is destroyed; the old passphrase still
works).  Invariants, checked before every destroy:

- never overwrite a slot in place: passphrases go to free slots only;
- never destroy the last active slot, nor one whose salt changed (reused);
- the backup passphrase the escrow server holds is destroyed only once the
  server has confirmed it holds the new one;
- the header is backed up before a multi-step change; the backup is removed
  when the operation completes (it still holds the old passphrases).

Recovery ("the backup passphrase was used"): clear every slot but the backup
slot, drop any pending packet, set the new user passphrase, then make a new
random backup passphrase in another slot with its escrow packet, recorded as
pending and queued.  :meth:`Tool.promote` finishes it after the escrow
server's confirmation: the old backup slot is destroyed, pending becomes current.

Steps: after every step the flow announces it by name (``change:added``,
``recover:cleared-2``, ...): a debug log line, then :attr:`Tool.step` and the
callables in :data:`step_hooks`.  Production code sets neither and reads no
switch from the environment; the tests make a step raise (in-process) or kill
the process (``tests/crashpoint_runner.py``, a test-only entry point).

A journal is validated before it is acted on (known operation, slot numbers in
range, salts as strings, a header backup path inside the state directory's
``header-backups``); a malformed one stops the run with nothing changed.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mandos_core import escrow_packet
from mandos_core.log import event
from mandos_core.secret import Secret

from .backend import Luks, open_volume
from .state import Queued, SlotRef, StateStore, VolumeState

log = logging.getLogger("luks_passphrase")

MIN_PASSPHRASE = 8
BACKUP_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz./"


class Refused(Exception):
    """The operation is not allowed (nothing was changed)."""


RECOVERY_NOT_CONFIRMED = ("this is the disk's backup passphrase, so this would be a recovery "
                          "(every other passphrase of the disk removed); nothing was changed: "
                          "confirm it with --recovery, or run the command on a terminal")


class RecoveryNotConfirmed(Refused):
    """The current passphrase is the backup one, and nobody confirmed a recovery."""


class FlowError(Exception):
    """The operation could not be done."""


def random_backup_passphrase() -> Secret:
    """20 characters of [0-9A-Za-z./] from the OS's CSPRNG, as four dash-joined groups."""
    chars = [secrets.choice(BACKUP_ALPHABET) for _ in range(20)]
    groups = ["".join(chars[i:i + 5]) for i in range(0, 20, 5)]
    return Secret("-".join(groups).encode())


def strength_hint(passphrase: bytes) -> str:
    """A rough hint for people (not a policy): estimated bits of guessing work."""
    import math

    if not passphrase:
        return "empty"
    classes = 0
    text = passphrase.decode(errors="replace")
    for test in (str.islower, str.isupper, str.isdigit):
        if any(test(c) for c in text):
            classes += {str.islower: 26, str.isupper: 26, str.isdigit: 10}[test]
    if any(not c.isalnum() for c in text):
        classes += 33
    bits = len(set(text)) and len(text) * math.log2(max(classes, 2)) * min(1.0, len(set(text)) / 4)
    if len(passphrase) < MIN_PASSPHRASE:
        return f"too short (at least {MIN_PASSPHRASE} characters)"
    if bits < 40:
        return "weak"
    if bits < 64:
        return "fair"
    if bits < 90:
        return "good"
    return "strong"


@dataclass(frozen=True)
class Outcome:
    kind: str  # "changed", "recovered", "resumed", "promoted", "imported", "nothing"
    message: str
    header_backup: str | None = None


#: Test-only: called with each step's name.  Empty in production (nothing reads the
#: environment for it); tests/crashpoint_runner.py appends a hook that kills the process.
step_hooks: list[Callable[[str], None]] = []

_JOURNAL_SLOTS = ("old_slot", "target", "new_slot", "backup_slot", "user_slot")
_JOURNAL_SALTS = ("old_salt", "new_salt", "backup_salt", "user_salt")
_JOURNAL_OPS = ("change", "recover", "backup", "promote")


class Tool:
    """The core shared by the CLI and the GUI."""

    def __init__(
        self,
        store: StateStore,
        *,
        certificate: bytes | None = None,
        step: Callable[[str], None] | None = None,
        progress: Callable[[str], None] | None = None,
        hostname: str | None = None,
        keep_header_backups: bool = False,
    ) -> None:
        self.store = store
        self.certificate = certificate
        self.step = step
        self.progress = progress or (lambda msg: log.info("%s", msg))
        self.hostname = hostname or socket.gethostname()
        self.keep_header_backups = keep_header_backups

    def _step(self, name: str) -> None:
        """Announce that the step *name* is done (tests stop the run here)."""
        log.debug("step %s", name)
        if self.step is not None:
            self.step(name)
        for hook in step_hooks:
            hook(name)

    # -- the commands --------------------------------------------------------

    def change(self, path: str, current: Secret, get_new: Callable[[], Secret], *,
               recovery: bool = True) -> Outcome:
        """``luks-passphrase change``: a normal change, or recovery when *current* is the backup.

        *recovery* false: a backup passphrase is refused (:class:`RecoveryNotConfirmed`,
        nothing changed) instead of starting a recovery nobody confirmed.
        """
        with open_volume(path) as vol:
            uuid = vol.uuid
            with self.store.locked(uuid):
                st = self.store.load(uuid)
                resumed = self.resume_locked(vol, st)
                slot = vol.open_slot(current)
                role = self._role(vol, st, slot)
                if role == "pending":
                    raise Refused(
                        f"key slot {slot} holds the new backup passphrase, which is waiting for "
                        "the escrow server; use your own passphrase (or the previous backup "
                        "passphrase)")
                if st.backup_needed and role == "user":
                    self._make_backup(vol, st, current, path, slot)
                    return Outcome("resumed", (resumed + " " if resumed else "")
                                   + "Finished the interrupted recovery: a new backup passphrase "
                                   "was made and queued for escrow; run again to change your "
                                   "passphrase.")
                if resumed:
                    self.progress(resumed)
                if role == "backup" and not recovery:
                    raise RecoveryNotConfirmed(RECOVERY_NOT_CONFIRMED)
                if role == "backup" and self.certificate is None:
                    raise Refused("this is the backup passphrase, but no escrow certificate is "
                                  "configured, so no new backup passphrase could be escrowed; "
                                  "nothing was changed")
                new = get_new()
                self._check_new(vol, current, new, need_free=role != "backup")
                if role == "backup":
                    return self._recover(vol, st, current, slot, new, path)
                return self._change(vol, st, current, slot, new)

    def resume(self, path: str, unlock: Secret | None = None) -> Outcome:
        """Finish or roll back whatever a previous run left (``luks-passphrase resume``)."""
        with open_volume(path) as vol, self.store.locked(vol.uuid):
            st = self.store.load(vol.uuid)
            msg = self.resume_locked(vol, st)
            if st.backup_needed:
                if unlock is None:
                    return Outcome("resumed", (msg + " " if msg else "") + "A new backup "
                                   "passphrase still has to be made: run `luks-passphrase resume` "
                                   "with your passphrase.")
                slot = vol.open_slot(unlock)
                if self._role(vol, st, slot) == "pending":
                    raise Refused(f"key slot {slot} holds the pending backup passphrase")
                self._make_backup(vol, st, unlock, path, slot)
                msg = (msg + " " if msg else "") + "A new backup passphrase was made and queued."
            return Outcome("resumed" if msg else "nothing", msg or "Nothing to finish.")

    def needs_passphrase_to_resume(self, path: str) -> bool:
        with open_volume(path) as vol:
            st = self.store.load(vol.uuid)
            return st.backup_needed or bool(st.journal and st.journal.get("op") == "backup")

    # -- roles -------------------------------------------------------------

    def _role(self, vol: Luks, st: VolumeState, slot: int) -> str:
        """"pending", "backup" or "user": what the slot that opened is to us."""
        salt = vol.salt(slot)
        changed = False
        role = "user"
        for attr, name in (("pending_backup", "pending"), ("current_backup", "backup")):
            ref: SlotRef | None = getattr(st, attr)
            if ref is None or ref.slot != slot:
                continue
            if ref.salt == salt:
                role = name
            else:
                event(log, logging.WARNING, f"key slot {slot} was rewritten since it was recorded "
                      f"as the {name} backup slot; forgetting that record",
                      LUKS_UUID=st.uuid, LUKS_SLOT=slot)
                setattr(st, attr, None)
                if name == "pending":
                    st.queue = None
                changed = True
        if changed:
            self.store.save(st)
        return role

    def _check_new(self, vol: Luks, current: Secret, new: Secret, need_free: bool) -> None:
        if len(new) < MIN_PASSPHRASE:
            raise Refused(f"the new passphrase is too short (at least {MIN_PASSPHRASE} characters)")
        if new == current:
            raise Refused("the new passphrase is the same as the current one")
        if need_free and not vol.free_slots():
            raise Refused(f"all {vol.keyslot_max} key slots are in use: remove one first "
                          "(luks-passphrase never overwrites a slot)")

    # -- the journal ---------------------------------------------------------

    def _begin(self, vol: Luks, st: VolumeState, journal: dict[str, Any]) -> str:
        """Back up the header, then write the journal.  Return the backup's path."""
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        dest = self.store.header_backup_path(st.uuid, stamp)
        vol.header_backup(dest)
        os.chmod(dest, 0o600)
        self.progress(f"Header backed up to {dest}"
                      + ("" if self.keep_header_backups else " (removed once this step is complete)"))
        journal["header_backup"] = str(dest)
        st.journal = journal
        self.store.save(st)
        self._step(f"{journal['op']}:begun")
        return str(dest)

    def _end(self, st: VolumeState) -> None:
        backup = (st.journal or {}).get("header_backup")
        st.journal = None
        self.store.save(st)
        if backup and not self.keep_header_backups and self.store.is_header_backup(backup, st.uuid):
            try:
                os.unlink(backup)
            except FileNotFoundError:
                pass

    def _destroy(self, vol: Luks, slot: int, salt: str | None, why: str) -> bool:
        """Destroy *slot* if it is still the slot we mean; never the last one."""
        if not vol.status(slot).active:
            return False
        if salt is not None and vol.salt(slot) != salt:
            event(log, logging.WARNING, f"key slot {slot} was rewritten meanwhile; not touching it",
                  LUKS_SLOT=slot)
            return False
        if vol.active_slots() == [slot]:
            raise Refused(f"refusing to destroy key slot {slot}: it is the last working one")
        vol.destroy(slot)
        event(log, logging.INFO, f"destroyed key slot {slot} ({why})", LUKS_SLOT=slot,
              LUKS_PATH=vol.path)
        return True

    # -- a normal change -----------------------------------------------------

    def _change(self, vol: Luks, st: VolumeState, current: Secret, old: int,
                new: Secret) -> Outcome:
        target = vol.free_slots()[0]
        backup = self._begin(vol, st, {
            "op": "change", "phase": "add", "old_slot": old, "old_salt": vol.salt(old),
            "target": target, "before": vol.active_slots()})
        vol.add(current, new, target, unlock_slot=old)
        self._step("change:added")
        assert st.journal is not None
        st.journal.update(phase="added", new_slot=target, new_salt=vol.salt(target))
        self.store.save(st)
        self._step("change:recorded")
        vol.open_slot(new, target)
        st.journal["phase"] = "verified"
        self.store.save(st)
        self._step("change:verified")
        self._destroy(vol, old, st.journal["old_salt"], "old passphrase")
        self._step("change:old-destroyed")
        self._end(st)
        self._step("change:done")
        event(log, logging.INFO, f"passphrase changed: key slot {old} -> {target}",
              LUKS_UUID=st.uuid, LUKS_SLOT=target)
        return Outcome("changed", f"Passphrase changed (key slot {old} replaced by key slot "
                       f"{target}).", backup)

    # -- recovery with the backup passphrase ---------------------------------

    def _recover(self, vol: Luks, st: VolumeState, backup_pw: Secret, bslot: int,
                 new: Secret, path: str) -> Outcome:
        hb = self._begin(vol, st, {
            "op": "recover", "phase": "clear", "backup_slot": bslot,
            "backup_salt": vol.salt(bslot)})
        self._recover_clear(vol, st)
        assert st.journal is not None
        target = next(s for s in vol.free_slots() if s != bslot)
        st.journal.update(phase="add-user", target=target)
        self.store.save(st)
        self._step("recover:add-user")
        vol.add(backup_pw, new, target, unlock_slot=bslot)
        self._step("recover:user-added")
        st.journal.update(phase="user-added", user_slot=target, user_salt=vol.salt(target))
        self.store.save(st)
        self._step("recover:user-recorded")
        vol.open_slot(new, target)
        st.backup_needed = True
        self._end(st)
        self._step("recover:user-verified")
        event(log, logging.INFO, f"backup passphrase used: user passphrase now in key slot {target}",
              LUKS_UUID=st.uuid, LUKS_SLOT=target)
        pending = self._make_backup(vol, st, new, path, target)
        return Outcome("recovered", f"Recovered: your new passphrase is in key slot {target}. "
                       f"A new backup passphrase (key slot {pending}) waits for the escrow "
                       "server (luks-passphrase sync); the used one is removed once the server "
                       "has it.", hb)

    def _recover_clear(self, vol: Luks, st: VolumeState) -> None:
        """Destroy every slot but the backup slot; drop the pending backup and its packet."""
        j = st.journal
        assert j is not None
        bslot, bsalt = j["backup_slot"], j["backup_salt"]
        if not vol.status(bslot).active or vol.salt(bslot) != bsalt:
            raise FlowError(f"key slot {bslot} no longer holds the backup passphrase; "
                            "stopping before touching anything else")
        for s in vol.active_slots():
            if s != bslot:
                self._destroy(vol, s, None, "recovery: every slot but the backup slot")
                self._step(f"recover:cleared-{s}")
        st.pending_backup = None
        st.queue = None
        j["phase"] = "cleared"
        self.store.save(st)
        self._step("recover:cleared")

    def _make_backup(self, vol: Luks, st: VolumeState, unlock: Secret, path: str,
                     unlock_slot: int) -> int:
        """A new random backup passphrase in a free slot, its packet written first."""
        if self.certificate is None:
            raise Refused("no escrow certificate configured; cannot make a backup passphrase")
        free = vol.free_slots()
        if not free:
            raise Refused("no free key slot for the new backup passphrase")
        target = free[0]
        pw = random_backup_passphrase()
        try:
            packet = escrow_packet.build(self.certificate, pw, escrow_packet.Metadata(
                host_name=self.hostname, volume_uuid=st.uuid, volume_path=os.path.abspath(path),
                volume_format=escrow_packet.VOLUME_FORMAT_LUKS, passphrase_slot=target))
            self._begin(vol, st, {
                "op": "backup", "phase": "add", "target": target,
                "packet": base64.b64encode(packet).decode(), "created": int(time.time())})
            vol.add(unlock, pw, target, unlock_slot=unlock_slot)
        finally:
            pw.wipe()
        self._step("backup:added")
        self._backup_added(vol, st)
        self._step("backup:done")
        return target

    def _backup_added(self, vol: Luks, st: VolumeState) -> None:
        j = st.journal
        assert j is not None
        target = j["target"]
        st.pending_backup = SlotRef(target, vol.salt(target))
        st.queue = Queued(base64.b64decode(j["packet"]), int(j["created"]), target)
        st.backup_needed = False
        self._end(st)
        event(log, logging.INFO, f"new backup passphrase in key slot {target}, queued for escrow",
              LUKS_UUID=st.uuid, LUKS_SLOT=target)

    # -- after the escrow server's confirmation ------------------------------

    def promote(self, path: str, confirmed_sha256: str) -> Outcome:
        """The server holds the queued packet: kill the old backup slot, pending becomes current."""
        with open_volume(path) as vol, self.store.locked(vol.uuid):
            st = self.store.load(vol.uuid)
            self.resume_locked(vol, st)
            if st.queue is None or st.pending_backup is None:
                return Outcome("nothing", "Nothing queued.")
            if st.queue.sha256 != confirmed_sha256:
                raise FlowError("the escrow server confirmed a different packet; keeping the "
                                "old backup passphrase")
            p = st.pending_backup
            if not vol.status(p.slot).active or vol.salt(p.slot) != p.salt:
                raise Refused(f"key slot {p.slot} no longer holds the pending backup passphrase; "
                              "refusing to remove the old one")
            old = st.current_backup
            self._begin(vol, st, {
                "op": "promote", "old_slot": old.slot if old else None,
                "old_salt": old.salt if old else None, "new_slot": p.slot, "new_salt": p.salt})
            return self._promote_finish(vol, st)

    def _promote_finish(self, vol: Luks, st: VolumeState) -> Outcome:
        j = st.journal
        assert j is not None
        if j["old_slot"] is not None and j["old_slot"] != j["new_slot"]:
            self._destroy(vol, j["old_slot"], j["old_salt"], "old backup passphrase, escrowed "
                          "replacement confirmed")
        self._step("promote:old-destroyed")
        st.current_backup = SlotRef(j["new_slot"], j["new_salt"])
        st.pending_backup = None
        st.queue = None
        self._end(st)
        self._step("promote:done")
        event(log, logging.INFO, f"backup passphrase in key slot {j['new_slot']} is now current",
              LUKS_UUID=st.uuid, LUKS_SLOT=j["new_slot"])
        return Outcome("promoted", f"The escrow server holds the new backup passphrase (key slot "
                       f"{j['new_slot']}); the old one was removed.")

    # -- import of installer packets -----------------------------------------

    def import_packet(self, path: str, packet: escrow_packet.Packet) -> Outcome:
        meta = packet.metadata
        if meta.passphrase_slot is None:
            raise FlowError("the packet names no passphrase slot")
        with open_volume(path) as vol, self.store.locked(vol.uuid):
            if meta.volume_uuid.lower() != vol.uuid.lower():
                raise FlowError(f"the packet is for volume {meta.volume_uuid}, not {vol.uuid}")
            st = self.store.load(vol.uuid)
            self.resume_locked(vol, st)
            slot = meta.passphrase_slot
            if not vol.status(slot).active:
                raise FlowError(f"key slot {slot} named by the packet is not in use")
            if st.pending_backup and st.pending_backup.slot == slot:
                raise Refused(f"key slot {slot} is the pending backup slot")
            st.current_backup = SlotRef(slot, vol.salt(slot))
            self.store.save(st)
            event(log, logging.INFO, f"imported escrow packet: backup passphrase in key slot {slot}",
                  LUKS_UUID=vol.uuid, LUKS_SLOT=slot)
            return Outcome("imported", f"{vol.uuid}: key slot {slot} is the current backup "
                           "passphrase.")

    # -- crash recovery ------------------------------------------------------

    def resume_locked(self, vol: Luks, st: VolumeState) -> str:
        """Finish or roll back the journal's operation; return what was done ('' if nothing)."""
        j = st.journal
        if not j:
            return ""
        self._check_journal(vol, st, j)
        op, phase = j.get("op"), j.get("phase")
        event(log, logging.WARNING, f"found an interrupted operation ({op}, {phase}); resuming",
              LUKS_UUID=st.uuid)
        if op == "change":
            if phase == "verified":
                self._destroy(vol, j["old_slot"], j["old_salt"], "finishing a verified change")
                self._end(st)
                return ("Finished an interrupted passphrase change: the new passphrase works, "
                        "the old one was removed.")
            self._rollback_new(vol, j, "target" if phase == "add" else "new_slot",
                               None if phase == "add" else j.get("new_salt"),
                               keep=j["old_slot"], before=j.get("before"))
            self._end(st)
            return ("Rolled back an interrupted passphrase change: the old passphrase still "
                    "works; run `luks-passphrase change` again.")
        if op == "recover":
            if phase == "clear":
                self._recover_clear(vol, st)
                phase = "cleared"
            if phase in ("add-user", "user-added"):
                self._rollback_new(vol, j, "target" if phase == "add-user" else "user_slot",
                                   j.get("user_salt"), keep=j["backup_slot"],
                                   before=[j["backup_slot"]])
            self._end(st)
            return ("An interrupted recovery was rolled back to the backup passphrase, which "
                    "still works: run `luks-passphrase change` with it again.")
        if op == "backup":
            target = j["target"]
            if vol.status(target).active:
                self._backup_added(vol, st)
                return (f"Finished an interrupted backup passphrase: key slot {target}, queued "
                        "for escrow.")
            st.backup_needed = True
            self._end(st)
            return "An interrupted backup passphrase creation was rolled back."
        if op == "promote":
            return self._promote_finish(vol, st).message
        raise FlowError(f"unknown operation {op!r} in the state file")

    def _check_journal(self, vol: Luks, st: VolumeState, j: dict[str, Any]) -> None:
        """Refuse a journal this tool could not have written (nothing is changed)."""
        def bad(why: str) -> FlowError:
            return FlowError(f"{self.store.path(st.uuid)}: the journal is malformed ({why}); "
                             "nothing was changed: inspect the file, restore the header from "
                             "header-backups if needed, and remove the journal by hand")

        if j.get("op") not in _JOURNAL_OPS:
            return  # an unknown operation is refused below, before anything is done
        for key in _JOURNAL_SLOTS:
            v = j.get(key)
            if v is not None and (type(v) is not int or not 0 <= v < vol.keyslot_max):
                raise bad(f"{key}={v!r}")
        for key in _JOURNAL_SALTS:
            if not isinstance(j.get(key, ""), (str, type(None))):
                raise bad(f"{key} is not a salt")
        before = j.get("before")
        if before is not None and not (isinstance(before, list)
                                       and all(type(s) is int for s in before)):
            raise bad("before is not a list of key slots")
        hb = j.get("header_backup")
        if hb is not None and not self.store.is_header_backup(hb, st.uuid):
            raise bad(f"header_backup {str(hb)[:200]!r} is not in {self.store.header_backup_dir}")

    def _rollback_new(self, vol: Luks, j: dict[str, Any], key: str, salt: str | None,
                      keep: int, before: list[int] | None) -> None:
        slot = j.get(key)
        if slot is None or slot == keep or (before is not None and slot in before):
            return
        if not vol.status(keep).active:
            raise FlowError(f"key slot {keep} is gone; not rolling back key slot {slot}")
        self._destroy(vol, slot, salt, "rolling back an unverified new passphrase")

