"""The fallback LUKS backend: the ``cryptsetup`` program, passphrases on stdin only.

Used when ``libcryptsetup.so.12`` cannot be loaded, or when
``LUKS_PASSPHRASE_BACKEND=cryptsetup`` asks for it.  Same interface and
errors as :class:`luks_passphrase.libcryptsetup.LuksVolume`.  ``luksAddKey``
reads the existing and the new passphrase from stdin, one per line, so a
passphrase containing a line feed is refused here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from mandos_core.run import CommandError, run
from mandos_core.secret import Secret

from .libcryptsetup import (
    CRYPT_ANY_SLOT,
    LuksError,
    NotLuks,
    SlotError,
    SlotStatus,
    WrongPassphrase,
    luks1_salt,
)

EXIT_WRONG_PASSPHRASE = 2  # cryptsetup: "no permission (bad passphrase)"


def _detail(e: CommandError) -> str:
    lines = [ln for ln in e.stderr.strip().splitlines() if not ln.startswith("WARNING")]
    return lines[-1] if lines else f"exit code {e.returncode}"


class CryptsetupVolume:
    """One LUKS header, through the cryptsetup program."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if not os.path.exists(self.path):
            raise LuksError(f"{self.path}: no such file or device")
        try:
            run(["cryptsetup", "isLuks", self.path], timeout=30)
        except CommandError as e:
            if e.returncode == 127:
                raise LuksError("cryptsetup: not installed") from None
            raise NotLuks(f"{self.path}: not a LUKS volume (or unreadable header)") from None
        self._reload()

    def _reload(self) -> None:
        self.type = "LUKS1"
        self._json: dict[str, Any] = {}
        self._luks1: dict[int, int] = {}  # slot -> iterations
        out = self._run(["luksDump", self.path]).decode(errors="replace")
        m = re.search(r"^Version:\s*(\d)", out, re.MULTILINE)
        if m and m.group(1) == "2":
            self.type = "LUKS2"
            self._json = json.loads(self._run(["luksDump", "--dump-json-metadata", self.path]))
        else:
            for slot, body in re.findall(r"^Key Slot (\d+): ENABLED\n((?:\t.*\n?)*)", out,
                                         re.MULTILINE):
                it = re.search(r"Iterations:\s*(\d+)", body)
                self._luks1[int(slot)] = int(it.group(1)) if it else 1000
        m = re.search(r"^UUID:\s*(\S+)", out, re.MULTILINE)
        if not m:
            raise LuksError(f"{self.path}: the header has no UUID")
        self.uuid = m.group(1)

    def _run(self, args: list[str], secret: bytes | None = None) -> bytes:
        try:
            return run(["cryptsetup", *args], input=secret, timeout=300).stdout
        except CommandError as e:
            if e.returncode == EXIT_WRONG_PASSPHRASE and secret is not None:
                raise WrongPassphrase() from None
            raise LuksError(f"{self.path}: cryptsetup {args[0]}: {_detail(e)}") from None

    def close(self) -> None:
        pass

    def __enter__(self) -> CryptsetupVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def keyslot_max(self) -> int:
        return 32 if self.type == "LUKS2" else 8

    def _active(self) -> list[int]:
        if self.type == "LUKS2":
            return sorted(int(k) for k in self._json.get("keyslots", {}))
        return sorted(self._luks1)

    def status(self, slot: int) -> SlotStatus:
        if not 0 <= slot < self.keyslot_max:
            raise SlotError(f"{self.path}: key slot {slot} out of range 0-{self.keyslot_max - 1}")
        active = self._active()
        if slot not in active:
            return SlotStatus.INACTIVE
        return SlotStatus.ACTIVE_LAST if len(active) == 1 else SlotStatus.ACTIVE

    def active_slots(self) -> list[int]:
        return self._active()

    def free_slots(self) -> list[int]:
        active = set(self._active())
        return [s for s in range(self.keyslot_max) if s not in active]

    def salt(self, slot: int) -> str:
        if not self.status(slot).active:
            raise SlotError(f"{self.path}: key slot {slot} is not in use")
        if self.type == "LUKS1":
            return luks1_salt(self.path, slot)
        import base64

        return base64.b64decode(self._json["keyslots"][str(slot)]["kdf"]["salt"]).hex()

    def metadata(self) -> dict[str, Any]:
        return self._json

    def open_slot(self, passphrase: Secret, slot: int = CRYPT_ANY_SLOT) -> int:
        args = ["open", "--test-passphrase", "-v", "--key-file", "-"]
        if slot != CRYPT_ANY_SLOT:
            self.status(slot)
            args += ["--key-slot", str(slot)]
        try:
            out = self._run(args + [self.path], passphrase.reveal())
        except WrongPassphrase:
            raise WrongPassphrase(
                "no key slot opens with this passphrase" if slot == CRYPT_ANY_SLOT
                else f"key slot {slot} does not open with this passphrase") from None
        m = re.search(rb"Key slot (\d+) unlocked", out)
        if not m:
            raise LuksError(f"{self.path}: cryptsetup did not say which key slot opened")
        return int(m.group(1))

    def _pbkdf_args(self, ref: int) -> list[str]:
        if self.type == "LUKS1":
            return ["--pbkdf-force-iterations", str(max(1000, self._luks1.get(ref, 1000)))]
        kdf = self._json["keyslots"][str(ref)]["kdf"]
        args = ["--pbkdf", kdf["type"], "--pbkdf-force-iterations",
                str(kdf.get("iterations") or kdf.get("time"))]
        if kdf["type"] == "pbkdf2":
            args += ["--hash", kdf["hash"]]
        else:
            args += ["--pbkdf-memory", str(kdf["memory"]), "--pbkdf-parallel", str(kdf["cpus"])]
        return args

    def add(self, unlock: Secret, new: Secret, slot: int, unlock_slot: int | None = None) -> int:
        if self.status(slot) != SlotStatus.INACTIVE:
            raise SlotError(f"{self.path}: key slot {slot} is not free")
        old, pw = unlock.reveal(), new.reveal()
        if b"\n" in old or b"\n" in pw:
            raise LuksError("the cryptsetup program cannot take a passphrase with a line feed "
                            "on stdin; install libcryptsetup12")
        ref = self.open_slot(unlock) if unlock_slot is None else unlock_slot
        self._run(["luksAddKey", "--key-slot", str(slot), *self._pbkdf_args(ref), self.path],
                  old + b"\n" + pw + b"\n")
        self._reload()
        if not self.status(slot).active:
            raise SlotError(f"{self.path}: cryptsetup did not fill key slot {slot}")
        return slot

    def destroy(self, slot: int) -> None:
        if not self.status(slot).active:
            raise SlotError(f"{self.path}: key slot {slot} is not in use")
        self._run(["luksKillSlot", "-q", self.path, str(slot)])
        self._reload()

    def header_backup(self, dest: str | Path) -> None:
        self._run(["luksHeaderBackup", self.path, "--header-backup-file", str(dest)])

    def header_restore(self, src: str | Path) -> None:
        self._run(["luksHeaderRestore", "-q", self.path, "--header-backup-file", str(src)])
