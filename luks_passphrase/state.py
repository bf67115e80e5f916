"""What the tool remembers per LUKS volume, in root-only storage.

One JSON file per LUKS UUID in the state directory (default
``/etc/luks-passphrase``, mode 0700; files 0600), replaced atomically (write
a temporary file, fsync, rename, fsync the directory), so every write is all
or nothing and a crash leaves either the old or the new state.  It holds:

- ``current_backup_slot`` / ``current_backup_salt``: the backup passphrase the
  helpdesk can read from escrow;
- ``pending_backup_slot`` / ``pending_backup_salt``: a new backup passphrase
  whose escrow packet the server has not confirmed yet;
- ``queue``: that escrow packet (the only place a wrapped secret is stored);
- ``backup_needed``: the backup passphrase was used and no replacement exists yet;
- ``journal``: the operation in progress, so the next run finishes or rolls it back.

A slot's salt changes whenever the slot is rewritten, so a recorded slot that
was reused behind our back is noticed.  Everything for one volume happens
under an exclusive ``flock`` on ``UUID.lock``.

The directory is trusted only if it is ours: a real directory (not a symbolic
link) owned by the effective user, never anyone else's (its journal tells the
tool which key slots to destroy and which files to remove).  Group or other
access is tightened to 0700 for an ordinary run, and refused when *strict*
(under pkexec, where the message names the ``chmod`` that fixes it).  State
files, lock files and header backups are opened with ``O_NOFOLLOW``: a symbolic
link planted in the directory is refused, never followed.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/etc/luks-passphrase")
_UUID = re.compile(r"[0-9a-fA-F-]{8,64}")
_HEADER_BACKUP = re.compile(r"(?P<uuid>[0-9a-f-]{8,64})-[0-9]{8}T[0-9]{6}\.[0-9]{6}Z\.img")
MAX_STATE_FILE = 4 * 1024 * 1024


class StateError(Exception):
    """The state directory or a state file is unusable."""


@dataclass(frozen=True)
class SlotRef:
    slot: int
    salt: str


@dataclass(frozen=True)
class Queued:
    """An escrow packet waiting for the escrow server's confirmation."""

    packet: bytes
    created: int  # unix seconds: the server must hold a packet at least this new
    slot: int

    @property
    def sha256(self) -> str:
        import hashlib

        return hashlib.sha256(self.packet).hexdigest()


@dataclass
class VolumeState:
    uuid: str
    current_backup: SlotRef | None = None
    pending_backup: SlotRef | None = None
    queue: Queued | None = None
    backup_needed: bool = False
    journal: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def ref(prefix: str, r: SlotRef | None) -> dict[str, Any]:
            return {f"{prefix}_slot": r.slot if r else None, f"{prefix}_salt": r.salt if r else None}

        out: dict[str, Any] = {"uuid": self.uuid, "version": 1}
        out.update(ref("current_backup", self.current_backup))
        out.update(ref("pending_backup", self.pending_backup))
        out["backup_needed"] = self.backup_needed
        out["queue"] = None if self.queue is None else {
            "packet": base64.b64encode(self.queue.packet).decode(),
            "created": self.queue.created,
            "slot": self.queue.slot,
        }
        out["journal"] = self.journal
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, uuid: str, data: dict[str, Any]) -> VolumeState:
        def ref(prefix: str) -> SlotRef | None:
            slot, salt = data.get(f"{prefix}_slot"), data.get(f"{prefix}_salt")
            if slot is None:
                return None
            if not isinstance(slot, int) or not isinstance(salt, str):
                raise StateError(f"{prefix}_slot/{prefix}_salt malformed")
            return SlotRef(slot, salt)

        q = data.get("queue")
        queue = None
        if q is not None:
            try:
                queue = Queued(base64.b64decode(q["packet"]), int(q["created"]), int(q["slot"]))
            except (KeyError, TypeError, ValueError):
                raise StateError("queue entry malformed") from None
        journal = data.get("journal")
        if journal is not None and not isinstance(journal, dict):
            raise StateError("journal malformed")
        known = {"uuid", "version", "current_backup_slot", "current_backup_salt",
                 "pending_backup_slot", "pending_backup_salt", "backup_needed", "queue",
                 "journal"}
        return cls(
            uuid=uuid,
            current_backup=ref("current_backup"),
            pending_backup=ref("pending_backup"),
            queue=queue,
            backup_needed=bool(data.get("backup_needed", False)),
            journal=journal,
            extra={k: v for k, v in data.items() if k not in known},
        )


class StateStore:
    """The state directory: one file per volume, root-only, atomic writes."""

    def __init__(self, directory: Path = DEFAULT_STATE_DIR, *, strict: bool = False) -> None:
        self.dir = Path(directory)
        self.strict = strict

    def ensure(self) -> None:
        """Create the directory if missing; refuse one that is not ours alone."""
        try:
            self.dir.mkdir(mode=0o700, parents=not self.strict, exist_ok=True)
            st = os.lstat(self.dir)
        except OSError as e:
            raise StateError(f"{self.dir}: {e.strerror}") from None
        _check_private_dir(self.dir, st, self.strict)

    def path(self, uuid: str) -> Path:
        if not _UUID.fullmatch(uuid):
            raise StateError(f"{uuid!r}: not a LUKS UUID")
        return self.dir / f"{uuid.lower()}.json"

    def load(self, uuid: str) -> VolumeState:
        p = self.path(uuid)
        try:
            fd = _open_nofollow(p, os.O_RDONLY)
        except FileNotFoundError:
            return VolumeState(uuid=uuid.lower())
        try:
            with os.fdopen(fd, "rb") as f:
                raw = f.read(MAX_STATE_FILE + 1)
        except OSError as e:
            raise StateError(f"{p}: {e.strerror}") from None
        if len(raw) > MAX_STATE_FILE:
            raise StateError(f"{p}: larger than {MAX_STATE_FILE} bytes")
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return VolumeState.from_json(uuid.lower(), data)
        except (ValueError, StateError) as e:
            raise StateError(f"{p}: {e}") from None

    def save(self, state: VolumeState) -> None:
        self.ensure()
        write_atomic(self.path(state.uuid),
                     (json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n").encode())

    def uuids(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json"))

    @contextmanager
    def locked(self, uuid: str) -> Iterator[None]:
        """Hold the volume's lock (blocks while another run works on it)."""
        self.ensure()
        lock = self.path(uuid).with_suffix(".lock")
        fd = _open_nofollow(lock, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @property
    def header_backup_dir(self) -> Path:
        return self.dir / "header-backups"

    def header_backup_path(self, uuid: str, stamp: str) -> Path:
        d = self.header_backup_dir
        try:
            d.mkdir(mode=0o700, exist_ok=True)
            st = os.lstat(d)
        except OSError as e:
            raise StateError(f"{d}: {e.strerror}") from None
        _check_private_dir(d, st, self.strict)
        return d / f"{uuid.lower()}-{stamp}.img"

    def is_header_backup(self, path: object, uuid: str) -> bool:
        """Is *path* (from a journal) one of our header backups for *uuid*?  Only those
        are ever removed."""
        if not isinstance(path, str):
            return False
        p = Path(path)
        m = _HEADER_BACKUP.fullmatch(p.name)
        return (m is not None and m["uuid"] == uuid.lower()
                and os.path.realpath(p.parent) == os.path.realpath(self.header_backup_dir))


def _check_private_dir(d: Path, st: os.stat_result, strict: bool) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise StateError(f"{d}: is a symbolic link; the state directory must be a real "
                         "directory (remove the link)")
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{d}: not a directory")
    euid = os.geteuid()
    if st.st_uid != euid:
        owner = "root:root" if euid == 0 else str(euid)
        raise StateError(f"{d}: owned by uid {st.st_uid}, not by uid {euid}; its files would "
                         f"decide which key slots to destroy: check them, then chown {owner} {d}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        if strict:
            raise StateError(f"{d}: mode {mode:04o} lets others in; the state directory must be "
                             f"root's alone: chmod 0700 {d}")
        os.chmod(d, 0o700)


def _open_nofollow(path: Path, flags: int) -> int:
    """Open a regular file of ours, never through a symbolic link."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY, 0o600)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StateError(f"{path}: is a symbolic link; refusing to follow it "
                             "(remove it)") from None
        raise StateError(f"{path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise StateError(f"{path}: not a regular file of ours (owner uid {st.st_uid}, "
                         f"{st.st_nlink} links); remove it")
    return fd


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace *path* with *data*: all or nothing, even across a crash."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
