"""The passphrase tool's flows on real LUKS1 and LUKS2 images, refusals, and crash safety.

Fault injection: every flow is run once to list the steps it announces; then,
for each step, on a fresh image, the run is made to die right after it (an
exception that nothing catches, or SIGKILL of the real CLI process started
through the test-only ``tests/crashpoint_runner.py``; the program itself has
no such switch).  After each one: the volume still opens with the old or the
new passphrase, the backup passphrase is not lost (both checked with
libcryptsetup and with the ``cryptsetup`` program, whose ``luksDump`` must show
the same key slots), and the next run finishes or rolls back, after which the
flow completes normally.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from luks_passphrase.flows import Refused, Tool, random_backup_passphrase
from luks_passphrase.libcryptsetup import LuksVolume, WrongPassphrase
from luks_passphrase.state import StateStore
from mandos_core import escrow_packet
from mandos_core.secret import Secret
from tests.lukslib import (
    BACKUP0,
    ROOT,
    USER0,
    EscrowKeys,
    active_slots,
    add_key,
    cli,
    dump_slots,
    luks_uuid,
    make_escrow_keys,
    make_image,
    opens,
    opens_fast,
    setup_volume,
)

KINDS = ["luks1", "luks2"]
USER1 = b"user passphrase one!"
OTHER = b"another user passphrase"
CRASH_POINTS_COVERED: dict[str, int] = {}
CHANGE_POINTS = ["change:begun", "change:added", "change:recorded", "change:verified",
                 "change:old-destroyed", "change:done"]
RECOVERY_POINTS = ["recover:begun", "recover:cleared-0", "recover:cleared-2", "recover:cleared",
                   "recover:add-user", "recover:user-added", "recover:user-recorded",
                   "recover:user-verified", "backup:begun", "backup:added", "backup:done",
                   "promote:begun", "promote:old-destroyed", "promote:done"]
#: the real program, killed at every step of a recovery (promotion needs a server: not here)
SIGKILL_POINTS = [p for p in RECOVERY_POINTS if not p.startswith("promote:")]
#: what each crash test covers, and so the figure the docs give
EXPECTED_COVERAGE = {
    **{f"change-{k}": len(CHANGE_POINTS) for k in KINDS},
    **{f"recovery+promotion-{k}": len(RECOVERY_POINTS) for k in KINDS},
    **{f"change-{k}-cryptsetup-program": len(CHANGE_POINTS) for k in KINDS},
    "sigkill-cli-luks2": len(SIGKILL_POINTS),
}


class Crash(BaseException):
    """A simulated crash: BaseException, so no `except Exception` in the code catches it."""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> EscrowKeys:
    return make_escrow_keys(tmp_path_factory.mktemp("escrow"))


def tool(store: StateStore, keys: EscrowKeys, crash_at: str | None = None,
         seen: list[str] | None = None) -> Tool:
    def hook(name: str) -> None:
        if seen is not None:
            seen.append(name)
        if name == crash_at:
            raise Crash(name)

    return Tool(store, certificate=keys.cert_pem, step=hook, hostname="testhost",
                progress=lambda m: None)


def queued_passphrase(store: StateStore, uuid: str, keys: EscrowKeys) -> bytes | None:
    st = store.load(uuid)
    if st.queue is None:
        return None
    return escrow_packet.unwrap(escrow_packet.parse(st.queue.packet), keys.key_pem).reveal()


def no_header_backups(store: StateStore) -> bool:
    d = store.dir / "header-backups"
    return not d.exists() or not any(d.iterdir())


# -- the flows, straight through ----------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_change_own_passphrase(tmp_path: Path, kind: str, keys: EscrowKeys) -> None:
    image, store = setup_volume(tmp_path, kind, keys)
    out = tool(store, keys).change(str(image), Secret(USER0), lambda: Secret(USER1))
    assert out.kind == "changed"
    assert active_slots(image) == [1, 2]
    assert opens(image, USER1, 2) and not opens(image, USER0)
    assert opens(image, BACKUP0, 1)
    st = store.load(luks_uuid(image))
    assert st.current_backup is not None and st.current_backup.slot == 1
    assert st.journal is None and no_header_backups(store)


@pytest.mark.parametrize("kind", KINDS)
def test_new_slot_uses_the_volumes_pbkdf(tmp_path: Path, kind: str, keys: EscrowKeys) -> None:
    image, store = setup_volume(tmp_path, kind, keys)
    tool(store, keys).change(str(image), Secret(USER0), lambda: Secret(USER1))
    import subprocess

    dump = subprocess.run(["cryptsetup", "luksDump", str(image)], capture_output=True,
                          check=True).stdout.decode()
    # the fast PBKDF of slot 0 was reused (no benchmark, no argon2 default)
    assert "argon2" not in dump
    if kind == "luks2":
        assert dump.count("Iterations: 1000") >= 2


@pytest.mark.parametrize("kind", KINDS)
def test_recovery_then_escrow_confirmation(tmp_path: Path, kind: str, keys: EscrowKeys) -> None:
    image, store = setup_volume(tmp_path, kind, keys, extra_user=True)
    uuid = luks_uuid(image)
    out = tool(store, keys).change(str(image), Secret(BACKUP0), lambda: Secret(USER1))
    assert out.kind == "recovered"
    st = store.load(uuid)
    assert st.pending_backup is not None and st.queue is not None and not st.backup_needed
    pending = st.pending_backup.slot
    user_slot = next(s for s in active_slots(image) if s not in (1, pending))
    assert sorted(active_slots(image)) == sorted([1, user_slot, pending])
    assert not opens(image, USER0) and not opens(image, OTHER)
    assert opens(image, USER1, user_slot) and opens(image, BACKUP0, 1)
    new_backup = queued_passphrase(store, uuid, keys)
    assert new_backup is not None and opens(image, new_backup, pending)
    meta = escrow_packet.parse(st.queue.packet).metadata
    assert (meta.volume_uuid, meta.passphrase_slot, meta.host_name) == (uuid, pending, "testhost")
    # the pending backup passphrase is refused until the server has it
    with pytest.raises(Refused):
        tool(store, keys).change(str(image), Secret(new_backup), lambda: Secret(b"whatever1"))
    # the escrow server confirmed: the used backup passphrase goes
    out = tool(store, keys).promote(str(image), st.queue.sha256)
    assert out.kind == "promoted"
    assert not opens(image, BACKUP0) and opens(image, new_backup, pending)
    st = store.load(uuid)
    assert st.current_backup is not None and st.current_backup.slot == pending
    assert st.pending_backup is None and st.queue is None
    assert no_header_backups(store)
    # and the new backup passphrase now recovers again
    out = tool(store, keys).change(str(image), Secret(new_backup), lambda: Secret(b"third passphrase"))
    assert out.kind == "recovered"


def test_random_backup_passphrase_format() -> None:
    import re

    seen = set()
    for _ in range(50):
        pw = random_backup_passphrase().reveal().decode()
        assert re.fullmatch(r"[0-9A-Za-z./]{5}(-[0-9A-Za-z./]{5}){3}", pw)
        seen.add(pw)
    assert len(seen) == 50


# -- refusals ----------------------------------------------------------------

def test_wrong_passphrase(tmp_path: Path, keys: EscrowKeys) -> None:
    image, store = setup_volume(tmp_path, "luks2", keys)
    with pytest.raises(WrongPassphrase):
        tool(store, keys).change(str(image), Secret(b"not the passphrase"), lambda: Secret(USER1))
    assert active_slots(image) == [0, 1]


def test_all_slots_full(tmp_path: Path, keys: EscrowKeys) -> None:
    image, store = setup_volume(tmp_path, "luks1", keys)
    for s in range(2, 8):
        add_key(image, USER0, b"filler passphrase %d" % s, s, tmp_path)
    with pytest.raises(Refused, match="all 8 key slots"):
        tool(store, keys).change(str(image), Secret(USER0), lambda: Secret(USER1))
    assert active_slots(image) == list(range(8)) and opens(image, USER0, 0)
    # recovery still works with all slots full: it clears them first
    out = tool(store, keys).change(str(image), Secret(BACKUP0), lambda: Secret(USER1))
    assert out.kind == "recovered"


def test_never_destroys_the_last_slot(tmp_path: Path, keys: EscrowKeys) -> None:
    image = make_image(tmp_path / "one.img", "luks2")
    t = tool(StateStore(tmp_path / "state"), keys)
    with LuksVolume(image) as vol, pytest.raises(Refused, match="last working"):
        t._destroy(vol, 0, None, "test")
    assert opens(image, USER0, 0)


def test_promote_refuses_without_the_pending_slot(tmp_path: Path, keys: EscrowKeys) -> None:
    image, store = setup_volume(tmp_path, "luks2", keys)
    tool(store, keys).change(str(image), Secret(BACKUP0), lambda: Secret(USER1))
    st = store.load(luks_uuid(image))
    assert st.pending_backup is not None and st.queue is not None
    import subprocess

    subprocess.run(["cryptsetup", "luksKillSlot", "-q", str(image), str(st.pending_backup.slot)],
                   check=True, capture_output=True)
    with pytest.raises(Refused):
        tool(store, keys).promote(str(image), st.queue.sha256)
    assert opens(image, BACKUP0, 1)


def test_too_short_and_same_passphrase(tmp_path: Path, keys: EscrowKeys) -> None:
    image, store = setup_volume(tmp_path, "luks2", keys)
    with pytest.raises(Refused, match="too short"):
        tool(store, keys).change(str(image), Secret(USER0), lambda: Secret(b"short"))
    with pytest.raises(Refused, match="same"):
        tool(store, keys).change(str(image), Secret(USER0), lambda: Secret(USER0))
    assert active_slots(image) == [0, 1]


def test_reused_backup_slot_is_noticed(tmp_path: Path, keys: EscrowKeys) -> None:
    image, store = setup_volume(tmp_path, "luks2", keys)
    import subprocess

    subprocess.run(["cryptsetup", "luksKillSlot", "-q", str(image), "1"], check=True,
                   capture_output=True)
    add_key(image, USER0, OTHER, 1, tmp_path)  # slot 1 reused behind our back
    out = tool(store, keys).change(str(image), Secret(OTHER), lambda: Secret(USER1))
    assert out.kind == "changed"  # a normal change, not a recovery
    assert opens(image, USER0, 0)
    assert store.load(luks_uuid(image)).current_backup is None


# -- fault injection ---------------------------------------------------------

def _points(run: object) -> list[str]:
    seen: list[str] = []
    run(seen)  # type: ignore[operator]
    return seen


def _check_invariants(image: Path, store: StateStore, keys: EscrowKeys, uuid: str,
                      users: tuple[bytes, ...], backups: tuple[bytes, ...]) -> None:
    """A user passphrase and a backup passphrase open: libcryptsetup and the program agree."""
    user = next((u for u in users if opens_fast(image, u)), None)
    assert user is not None, "no user passphrase opens"
    assert opens(image, user), "the cryptsetup program does not open with the user passphrase"
    queued = queued_passphrase(store, uuid, keys)
    candidates = (*backups, *((queued,) if queued else ()))
    backup = next((b for b in candidates if opens_fast(image, b)), None)
    assert backup is not None, "the backup passphrase was lost"
    assert opens(image, backup), "the cryptsetup program does not open with the backup passphrase"
    assert dump_slots(image) == active_slots(image), "luksDump shows other key slots"


def _resume(store: StateStore, keys: EscrowKeys, image: Path, users: tuple[bytes, ...]) -> None:
    t = tool(store, keys)
    t.resume(str(image))
    if store.load(luks_uuid(image)).backup_needed:
        unlock = next(u for u in users if opens_fast(image, u))
        t.resume(str(image), Secret(unlock))
    st = store.load(luks_uuid(image))
    assert st.journal is None and not st.backup_needed
    assert no_header_backups(store)


@pytest.mark.parametrize("kind", KINDS)
def test_crash_during_change(tmp_path: Path, kind: str, keys: EscrowKeys) -> None:
    def run(seen: list[str], crash_at: str | None = None, base: Path = tmp_path / "list") -> Path:
        image, store = setup_volume(base, kind, keys)
        tool(store, keys, crash_at, seen).change(str(image), Secret(USER0), lambda: Secret(USER1))
        return image

    points = _points(run)
    assert points == CHANGE_POINTS
    for i, point in enumerate(points):
        base = tmp_path / f"p{i}"
        image, store = setup_volume(base, kind, keys)
        uuid = luks_uuid(image)
        with pytest.raises(Crash):
            tool(store, keys, point).change(str(image), Secret(USER0), lambda: Secret(USER1))
        _check_invariants(image, store, keys, uuid, (USER0, USER1), (BACKUP0,))
        _resume(store, keys, image, (USER0, USER1))
        _check_invariants(image, store, keys, uuid, (USER0, USER1), (BACKUP0,))
        assert opens_fast(image, USER0) != opens_fast(image, USER1), point  # exactly one of them
        if opens_fast(image, USER0):  # rolled back: the next run does it
            tool(store, keys).change(str(image), Secret(USER0), lambda: Secret(USER1))
        assert opens_fast(image, USER1) and not opens_fast(image, USER0) and opens_fast(image, BACKUP0, 1)
        assert store.load(uuid).current_backup.slot == 1  # type: ignore[union-attr]
    CRASH_POINTS_COVERED[f"change-{kind}"] = len(points)


@pytest.mark.parametrize("kind", KINDS)
def test_crash_during_recovery_and_promotion(tmp_path: Path, kind: str, keys: EscrowKeys) -> None:
    def run(seen: list[str], crash_at: str | None = None, base: Path = tmp_path / "list") -> None:
        image, store = setup_volume(base, kind, keys, extra_user=True)
        t = tool(store, keys, crash_at, seen)
        t.change(str(image), Secret(BACKUP0), lambda: Secret(USER1))
        t.promote(str(image), store.load(luks_uuid(image)).queue.sha256)  # type: ignore[union-attr]

    points = _points(run)
    assert points == RECOVERY_POINTS
    for i, point in enumerate(points):
        base = tmp_path / f"p{i}"
        image, store = setup_volume(base, kind, keys, extra_user=True)
        uuid = luks_uuid(image)
        users = (USER0, OTHER, USER1, BACKUP0)  # after a rollback, BACKUP0 recovers again
        t = tool(store, keys, point)
        queued_sha = None
        with pytest.raises(Crash):
            t.change(str(image), Secret(BACKUP0), lambda: Secret(USER1))
            st = store.load(uuid)
            queued_sha = st.queue.sha256  # type: ignore[union-attr]
            new_backup = queued_passphrase(store, uuid, keys)
            t.promote(str(image), queued_sha)
        if point.startswith("promote:"):
            assert new_backup is not None
            _check_invariants(image, store, keys, uuid, (USER1,), (BACKUP0, new_backup))
        else:
            _check_invariants(image, store, keys, uuid, users, (BACKUP0,))
        _resume(store, keys, image, (USER1, USER0, OTHER))
        st = store.load(uuid)
        if point.startswith("promote:"):
            assert not opens_fast(image, BACKUP0) and opens_fast(image, new_backup)
            assert st.current_backup is not None and st.pending_backup is None
            continue
        assert opens_fast(image, BACKUP0, 1), point  # never lost before the server has the new one
        if not opens_fast(image, USER1):  # rolled back to the backup passphrase: run again
            assert not opens_fast(image, USER0) or point == "recover:begun"
            tool(store, keys).change(str(image), Secret(BACKUP0), lambda: Secret(USER1))
            st = store.load(uuid)
        assert opens_fast(image, USER1) and not opens_fast(image, OTHER)
        new_backup = queued_passphrase(store, uuid, keys)
        assert new_backup is not None and st.pending_backup is not None
        assert opens_fast(image, new_backup, st.pending_backup.slot)
        tool(store, keys).promote(str(image), st.queue.sha256)  # type: ignore[union-attr]
        assert not opens_fast(image, BACKUP0) and opens_fast(image, new_backup) and opens_fast(image, USER1)
    CRASH_POINTS_COVERED[f"recovery+promotion-{kind}"] = len(points)


def crash_cli(point: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The real program's main() under tests/crashpoint_runner.py, SIGKILLed after *point*."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "crashpoint_runner.py"), point,
                           *args], input=stdin, capture_output=True, env=env, timeout=60,
                          cwd=ROOT)


@pytest.mark.parametrize("kind", ["luks2"])
def test_sigkill_at_every_step_of_the_cli(tmp_path: Path, kind: str, keys: EscrowKeys) -> None:
    """The real program killed with SIGKILL after each step of a recovery; rerun finishes."""
    for i, point in enumerate(SIGKILL_POINTS):
        image, store = setup_volume(tmp_path / f"k{i}", kind, keys, extra_user=True)
        proc = crash_cli(point, "--state-dir", str(store.dir), "--certificate", str(keys.cert),
                         "change", "--recovery", str(image),
                         stdin=BACKUP0 + b"\n" + USER1 + b"\n" + USER1 + b"\n")
        assert proc.returncode == -9, (point, proc.returncode, proc.stderr)
        uuid = luks_uuid(image)
        _check_invariants(image, store, keys, uuid, (USER0, OTHER, USER1, BACKUP0), (BACKUP0,))
        assert opens(image, BACKUP0, 1)
        # the next run: `resume`, with a passphrase on stdin if it needs one
        proc = cli("--state-dir", str(store.dir), "--certificate", str(keys.cert), "resume",
                   str(image), stdin=USER1 + b"\n")
        assert proc.returncode == 0, proc.stderr
        st = store.load(uuid)
        assert st.journal is None and not st.backup_needed
        if not opens(image, USER1):
            proc = cli("--state-dir", str(store.dir), "--certificate", str(keys.cert), "change",
                       "--recovery", str(image), stdin=BACKUP0 + b"\n" + USER1 + b"\n" + USER1 + b"\n")
            assert proc.returncode == 0, proc.stderr
        st = store.load(uuid)
        assert opens(image, USER1) and opens(image, BACKUP0, 1) and st.pending_backup is not None
        assert json.loads((store.dir / f"{uuid}.json").read_text())["journal"] is None
        assert dump_slots(image) == active_slots(image)
    CRASH_POINTS_COVERED[f"sigkill-cli-{kind}"] = len(SIGKILL_POINTS)


def test_crashpoint_runner_needs_the_step_to_be_reached(tmp_path: Path, keys: EscrowKeys) -> None:
    """A step that is never announced is reported (99), not mistaken for a clean run."""
    image, store = setup_volume(tmp_path, "luks2", keys)
    proc = crash_cli("no-such-step", "--state-dir", str(store.dir), "change", str(image),
                     stdin=USER0 + b"\n" + USER1 + b"\n" + USER1 + b"\n")
    assert proc.returncode == 99, proc.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_cryptsetup_program_backend(tmp_path: Path, kind: str, keys: EscrowKeys,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The same flows and crash points through the fallback backend (the cryptsetup program)."""
    from luks_passphrase.backend import open_volume
    from luks_passphrase.cryptsetup_cli import CryptsetupVolume

    monkeypatch.setenv("LUKS_PASSPHRASE_BACKEND", "cryptsetup")
    assert isinstance(open_volume(make_image(tmp_path / "probe.img", kind)), CryptsetupVolume)
    test_change_own_passphrase(tmp_path / "c", kind, keys)
    test_new_slot_uses_the_volumes_pbkdf(tmp_path / "p", kind, keys)
    test_recovery_then_escrow_confirmation(tmp_path / "r", kind, keys)
    before = CRASH_POINTS_COVERED.pop(f"change-{kind}", None)
    test_crash_during_change(tmp_path / "x", kind, keys)
    CRASH_POINTS_COVERED[f"change-{kind}-cryptsetup-program"] = CRASH_POINTS_COVERED.pop(
        f"change-{kind}")
    if before is not None:
        CRASH_POINTS_COVERED[f"change-{kind}"] = before


def test_report_crash_points() -> None:
    """The figure the docs give is the number of crash points the tests above kill at.

    Each crash test asserts the steps it found are exactly its list; with -s this
    prints the figure and, when the crash tests ran in this session, checks that
    each covered every step of its list.
    """
    figure = sum(EXPECTED_COVERAGE.values())
    assert figure == 63
    assert f"**{figure} crash points**" in (ROOT / "docs" / "passphrase-tool.md").read_text()
    assert re.search(rf"\b{figure} crash points are tested", (ROOT / "README.md").read_text())
    for name, covered in CRASH_POINTS_COVERED.items():
        assert covered == EXPECTED_COVERAGE[name], name
    print(f"\ncrash points covered: {sum(CRASH_POINTS_COVERED.values())} of {figure} "
          f"{CRASH_POINTS_COVERED}")
