"""LUKS key slots through libcryptsetup (``libcryptsetup.so.12``) and ctypes.

Only what the passphrase tool needs, and only operations on the LUKS header:
load, key slot status, which slot a passphrase opens, add a passphrase to a
chosen slot with the PBKDF of the slot that unlocked it, destroy a slot, the
UUID, each slot's salt, and header backup/restore.  Works on image files as
well as block devices (``crypt_activate_by_passphrase`` with a NULL name only
checks the passphrase).  LUKS1 and LUKS2.

libcryptsetup's own log lines are routed to the ``luks_passphrase.libcryptsetup``
logger at debug level; its last error line is kept and put into our typed
exceptions.  libcryptsetup never logs passphrases.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Any

from mandos_core.secret import Secret

log = logging.getLogger("luks_passphrase.libcryptsetup")

LIBRARY = "libcryptsetup.so.12"

CRYPT_ANY_SLOT = -1
CRYPT_PBKDF_ITER_TIME_SET = 1 << 0
CRYPT_PBKDF_NO_BENCHMARK = 1 << 1

CRYPT_LOG_ERROR = 1


class SlotStatus(IntEnum):
    INVALID = 0
    INACTIVE = 1
    ACTIVE = 2
    ACTIVE_LAST = 3
    UNBOUND = 4

    @property
    def active(self) -> bool:
        return self in (SlotStatus.ACTIVE, SlotStatus.ACTIVE_LAST)


class LuksError(Exception):
    """A LUKS operation failed (the message says which and why)."""


class LibraryMissing(LuksError):
    pass


class NotLuks(LuksError):
    pass


class WrongPassphrase(LuksError):
    def __init__(self, what: str = "no key slot opens with this passphrase") -> None:
        super().__init__(what)


class SlotError(LuksError):
    """A slot is out of range, in use, or not in the expected state."""


class _PbkdfType(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_char_p),
        ("hash", ctypes.c_char_p),
        ("time_ms", ctypes.c_uint32),
        ("iterations", ctypes.c_uint32),
        ("max_memory_kb", ctypes.c_uint32),
        ("parallel_threads", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


_LOG_CB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()
_last_error = threading.local()


def _log_callback(level: int, msg: bytes | None, _usr: object) -> None:
    text = (msg or b"").decode(errors="replace").rstrip()
    if level == CRYPT_LOG_ERROR:
        _last_error.text = text
    log.debug("libcryptsetup: %s", text)


_log_cb = _LOG_CB(_log_callback)  # kept alive for the life of the process


def load_library() -> ctypes.CDLL:
    """Load libcryptsetup once and declare the functions we use."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        try:
            lib = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError as e:
            raise LibraryMissing(f"{LIBRARY}: cannot load ({e}); install libcryptsetup12") from None
        vp, cp, ci, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
        sigs: dict[str, tuple[object, list[object]]] = {
            "crypt_init": (ci, [ctypes.POINTER(vp), cp]),
            "crypt_load": (ci, [vp, cp, vp]),
            "crypt_free": (None, [vp]),
            "crypt_get_type": (cp, [vp]),
            "crypt_get_uuid": (cp, [vp]),
            "crypt_keyslot_max": (ci, [cp]),
            "crypt_keyslot_status": (ci, [vp, ci]),
            "crypt_activate_by_passphrase": (ci, [vp, cp, ci, cp, sz, ctypes.c_uint32]),
            "crypt_keyslot_add_by_passphrase": (ci, [vp, ci, cp, sz, cp, sz]),
            "crypt_keyslot_destroy": (ci, [vp, ci]),
            "crypt_keyslot_get_pbkdf": (ci, [vp, ci, ctypes.POINTER(_PbkdfType)]),
            "crypt_set_pbkdf_type": (ci, [vp, ctypes.POINTER(_PbkdfType)]),
            "crypt_header_backup": (ci, [vp, cp, cp]),
            "crypt_header_restore": (ci, [vp, cp, cp]),
            "crypt_set_log_callback": (None, [vp, _LOG_CB, vp]),
            "crypt_get_volume_key_size": (ci, [vp]),
            "crypt_volume_key_get": (ci, [vp, ci, ctypes.c_void_p, ctypes.POINTER(sz), cp, sz]),
            "crypt_keyslot_add_by_volume_key": (ci, [vp, ci, ctypes.c_void_p, sz, cp, sz]),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
        try:
            lib.crypt_dump_json.restype = ci
            lib.crypt_dump_json.argtypes = [vp, ctypes.POINTER(cp), ctypes.c_uint32]
        except AttributeError:  # libcryptsetup < 2.4: LUKS2 salts from the header instead
            pass
        lib.crypt_set_log_callback(None, _log_cb, None)
        _lib = lib
        return lib


def _take_error() -> str:
    text = getattr(_last_error, "text", "")
    _last_error.text = ""
    return text


def _fail(what: str, rc: int, cls: type[LuksError] = LuksError) -> LuksError:
    detail = _take_error() or os.strerror(-rc if rc < 0 else rc)
    return cls(f"{what}: {detail}")


# LUKS1 binary header: 208 bytes of fields, then 8 key slots of 48 bytes
# (active u32, iterations u32, salt[32], key material offset u32, stripes u32).
_LUKS1_SLOTS_OFFSET = 208
_LUKS1_SLOT_SIZE = 48
_LUKS1_SALT_SIZE = 32
_LUKS1_ACTIVE = 0x00AC71F3


def luks1_salt(path: str, slot: int) -> str:
    """A LUKS1 key slot's salt, hex, read from the binary header."""
    off = _LUKS1_SLOTS_OFFSET + _LUKS1_SLOT_SIZE * slot
    with open(path, "rb") as f:
        f.seek(off)
        raw = f.read(_LUKS1_SLOT_SIZE)
    if len(raw) != _LUKS1_SLOT_SIZE or int.from_bytes(raw[:4], "big") != _LUKS1_ACTIVE:
        raise LuksError(f"{path}: key slot {slot}: unexpected LUKS1 header")
    return raw[8:8 + _LUKS1_SALT_SIZE].hex()


class LuksVolume:
    """One LUKS header, loaded with libcryptsetup.  Use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lib = load_library()
        self._cd = ctypes.c_void_p()
        _take_error()
        if not os.path.exists(self.path):
            raise LuksError(f"{self.path}: no such file or device")
        rc = self._lib.crypt_init(ctypes.byref(self._cd), self.path.encode())
        if rc < 0:
            raise _fail(f"{self.path}: cannot open", rc)
        self._lib.crypt_set_log_callback(self._cd, _log_cb, None)
        rc = self._lib.crypt_load(self._cd, None, None)
        if rc < 0:
            self.close()
            _take_error()
            raise NotLuks(f"{self.path}: not a LUKS volume (or unreadable header)")

    def close(self) -> None:
        if self._cd:
            self._lib.crypt_free(self._cd)
            self._cd = ctypes.c_void_p()

    def __enter__(self) -> LuksVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- facts -------------------------------------------------------------

    @property
    def type(self) -> str:
        t = self._lib.crypt_get_type(self._cd)
        return t.decode() if t else "unknown"

    @property
    def uuid(self) -> str:
        u = self._lib.crypt_get_uuid(self._cd)
        if not u:
            raise LuksError(f"{self.path}: the header has no UUID")
        return u.decode()

    @property
    def keyslot_max(self) -> int:
        return int(self._lib.crypt_keyslot_max(self.type.encode()))

    def status(self, slot: int) -> SlotStatus:
        self._check_range(slot)
        return SlotStatus(self._lib.crypt_keyslot_status(self._cd, slot))

    def active_slots(self) -> list[int]:
        return [s for s in range(self.keyslot_max) if self.status(s).active]

    def free_slots(self) -> list[int]:
        return [s for s in range(self.keyslot_max) if self.status(s) == SlotStatus.INACTIVE]

    def salt(self, slot: int) -> str:
        """The salt of an active slot, hex: it changes whenever a slot is reused."""
        if not self.status(slot).active:
            raise SlotError(f"{self.path}: key slot {slot} is not in use")
        if self.type == "LUKS1":
            return luks1_salt(self.path, slot)
        meta = self.metadata()
        try:
            salt = meta["keyslots"][str(slot)]["kdf"]["salt"]
        except (KeyError, TypeError):
            raise LuksError(f"{self.path}: key slot {slot}: no salt in the LUKS2 metadata") from None
        return base64.b64decode(salt).hex()

    def metadata(self) -> dict[str, Any]:
        """The LUKS2 JSON metadata (crypt_dump_json, or read from the header)."""
        if hasattr(self._lib, "crypt_dump_json"):
            out = ctypes.c_char_p()
            rc = self._lib.crypt_dump_json(self._cd, ctypes.byref(out), 0)
            if rc >= 0 and out.value:
                return json.loads(out.value.decode())  # type: ignore[no-any-return]
        with open(self.path, "rb") as f:
            hdr = f.read(4096)
            size = int.from_bytes(hdr[8:16], "big")
            area = f.read(max(0, size - 4096))
        return json.loads(area.split(b"\0", 1)[0].decode())  # type: ignore[no-any-return]

    # -- passphrases -------------------------------------------------------

    def open_slot(self, passphrase: Secret, slot: int = CRYPT_ANY_SLOT) -> int:
        """The slot *passphrase* opens (checks only; activates nothing)."""
        if slot != CRYPT_ANY_SLOT:
            self._check_range(slot)
        pw = passphrase.reveal()
        _take_error()
        rc = self._lib.crypt_activate_by_passphrase(self._cd, None, slot, pw, len(pw), 0)
        del pw
        if rc == -errno.EPERM or rc == -errno.ENOENT:
            _take_error()
            raise WrongPassphrase(
                "no key slot opens with this passphrase" if slot == CRYPT_ANY_SLOT
                else f"key slot {slot} does not open with this passphrase")
        if rc < 0:
            raise _fail(f"{self.path}: checking the passphrase", rc)
        return int(rc)

    def add(self, unlock: Secret, new: Secret, slot: int, unlock_slot: int | None = None) -> int:
        """Add *new* to the free *slot*, unlocking with *unlock*.

        The new slot gets the PBKDF (type, hash, cost) of the slot that
        *unlock* opens, without benchmarking.  Never overwrites: *slot* must
        be inactive.  With *unlock_slot* known, only that slot is unlocked
        (one PBKDF run instead of trying every slot): the volume key is taken
        from it and the new slot made from the volume key, which is wiped.
        """
        if self.status(slot) != SlotStatus.INACTIVE:
            raise SlotError(f"{self.path}: key slot {slot} is not free")
        ref = self.open_slot(unlock) if unlock_slot is None else unlock_slot
        pbkdf = _PbkdfType()
        rc = self._lib.crypt_keyslot_get_pbkdf(self._cd, ref, ctypes.byref(pbkdf))
        if rc < 0:
            raise _fail(f"{self.path}: reading the PBKDF of key slot {ref}", rc)
        pbkdf.time_ms = 0
        pbkdf.flags = (pbkdf.flags | CRYPT_PBKDF_NO_BENCHMARK) & ~CRYPT_PBKDF_ITER_TIME_SET
        rc = self._lib.crypt_set_pbkdf_type(self._cd, ctypes.byref(pbkdf))
        if rc < 0:
            raise _fail(f"{self.path}: setting the PBKDF", rc)
        size = self._lib.crypt_get_volume_key_size(self._cd)
        if size <= 0:
            raise LuksError(f"{self.path}: unknown volume key size")
        vk = ctypes.create_string_buffer(size)
        vk_size = ctypes.c_size_t(size)
        old, pw = unlock.reveal(), new.reveal()
        try:
            rc = self._lib.crypt_volume_key_get(self._cd, ref, vk, ctypes.byref(vk_size),
                                                old, len(old))
            if rc == -errno.EPERM or rc == -errno.ENOENT:
                _take_error()
                raise WrongPassphrase(f"key slot {ref} does not open with this passphrase")
            if rc < 0:
                raise _fail(f"{self.path}: unlocking key slot {ref}", rc)
            rc = self._lib.crypt_keyslot_add_by_volume_key(self._cd, slot, vk, vk_size.value,
                                                           pw, len(pw))
        finally:
            ctypes.memset(vk, 0, size)
            del old, pw
        if rc < 0:
            raise _fail(f"{self.path}: adding a passphrase to key slot {slot}", rc)
        if rc != slot:
            raise SlotError(f"{self.path}: libcryptsetup used key slot {rc}, not {slot}")
        return int(rc)

    def destroy(self, slot: int) -> None:
        """Wipe *slot*.  The caller makes sure another working slot remains."""
        if not self.status(slot).active:
            raise SlotError(f"{self.path}: key slot {slot} is not in use")
        rc = self._lib.crypt_keyslot_destroy(self._cd, slot)
        if rc < 0:
            raise _fail(f"{self.path}: destroying key slot {slot}", rc)

    def header_backup(self, dest: str | Path) -> None:
        rc = self._lib.crypt_header_backup(self._cd, None, str(dest).encode())
        if rc < 0:
            raise _fail(f"{self.path}: header backup to {dest}", rc)

    def header_restore(self, src: str | Path) -> None:
        rc = self._lib.crypt_header_restore(self._cd, None, str(src).encode())
        if rc < 0:
            raise _fail(f"{self.path}: header restore from {src}", rc)

    def _check_range(self, slot: int) -> None:
        if not 0 <= slot < self.keyslot_max:
            raise SlotError(f"{self.path}: key slot {slot} out of range 0-{self.keyslot_max - 1}")


@contextmanager
def opened(path: str | Path) -> Iterator[LuksVolume]:
    vol = LuksVolume(path)
    try:
        yield vol
    finally:
        vol.close()
