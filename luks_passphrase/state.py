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
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/etc/luks-passphrase")
_UUID = re.compile(r"[0-9a-fA-F-]{8,64}")


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

    def __init__(self, directory: Path = DEFAULT_STATE_DIR) -> None:
        self.dir = Path(directory)

    def ensure(self) -> None:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = self.dir.stat()
            if st.st_mode & 0o077:
                os.chmod(self.dir, 0o700)
        except OSError as e:
            raise StateError(f"{self.dir}: {e.strerror}") from None

    def path(self, uuid: str) -> Path:
        if not _UUID.fullmatch(uuid):
            raise StateError(f"{uuid!r}: not a LUKS UUID")
        return self.dir / f"{uuid.lower()}.json"

    def load(self, uuid: str) -> VolumeState:
        p = self.path(uuid)
        try:
            text = p.read_text()
        except FileNotFoundError:
            return VolumeState(uuid=uuid.lower())
        except OSError as e:
            raise StateError(f"{p}: {e.strerror}") from None
        try:
            data = json.loads(text)
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
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def header_backup_path(self, uuid: str, stamp: str) -> Path:
        d = self.dir / "header-backups"
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        return d / f"{uuid.lower()}-{stamp}.img"


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
