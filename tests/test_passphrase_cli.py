"""The ``luks-passphrase`` program: volumes from crypttab/dmsetup, stdin scripting,
exit codes, no secrets anywhere but the escrow packet, file modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from luks_passphrase.volumes import find, list_volumes, parse_crypttab, parse_dmsetup_table
from tests.lukslib import (
    BACKUP0,
    USER0,
    EscrowKeys,
    active_slots,
    add_key,
    cli,
    luks_uuid,
    make_escrow_keys,
    make_image,
    opens,
)

USER1 = b"user passphrase one!"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> EscrowKeys:
    return make_escrow_keys(tmp_path_factory.mktemp("escrow"))


def test_help_reads_like_a_man_page() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    out = proc.stdout.decode()
    for word in ("change", "sync", "import", "resume", "exit status", "one per line",
                 "--state-dir", "--crypttab"):
        assert word in out


def test_crypttab_and_dmsetup_parsing(tmp_path: Path) -> None:
    text = """# comment
root UUID=0d1e8a5e-6a4c-4c44-9d22-0e0e0e0e0e0e none luks,discard
swap /dev/sda3 /dev/urandom swap,cipher=aes-xts-plain64
data /dev/sdb1 /etc/keys/data.key luks
"""
    vols = parse_crypttab(text)
    assert [(v.name, v.device) for v in vols] == [
        ("root", "/dev/disk/by-uuid/0d1e8a5e-6a4c-4c44-9d22-0e0e0e0e0e0e"),
        ("data", "/dev/sdb1")]
    table = ("luks-abc: 0 2048 crypt aes-xts-plain64 :64:logon:cryptsetup:abc-d0 0 /dev/vdb 4096\n"
             "other: 0 100 linear 8:1 0\n")
    assert [(v.name, v.device) for v in parse_dmsetup_table(table)] == [("luks-abc", "/dev/vdb")]
    (tmp_path / "crypttab").write_text(text)
    (tmp_path / "table").write_text(table)
    names = [v.name for v in list_volumes(tmp_path / "crypttab", tmp_path / "table")]
    assert names == ["root", "data", "luks-abc"]
    with pytest.raises(Exception, match="no such volume"):
        find("nope", list_volumes(tmp_path / "crypttab", tmp_path / "table"))


def _two_volumes(tmp_path: Path) -> tuple[Path, Path, Path]:
    a = make_image(tmp_path / "a.img", "luks2")
    b = make_image(tmp_path / "b.img", "luks1")
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(f"alpha {a} none luks\nbeta {b} none luks\n")
    return a, b, crypttab


def test_volume_choice(tmp_path: Path) -> None:
    a, b, crypttab = _two_volumes(tmp_path)
    common = ["--state-dir", str(tmp_path / "s"), "--crypttab", str(crypttab),
              "--dmsetup-table", os.devnull]
    feed = USER0 + b"\n" + USER1 + b"\n" + USER1 + b"\n"
    proc = cli(*common, "change", stdin=feed)
    assert proc.returncode == 1 and b"several encrypted volumes" in proc.stderr
    proc = cli(*common, "change", "beta", stdin=feed)  # by crypttab name
    assert proc.returncode == 0, proc.stderr
    assert opens(b, USER1) and not opens(b, USER0) and opens(a, USER0)
    proc = cli(*common, "change", str(a), stdin=feed)  # by path
    assert proc.returncode == 0, proc.stderr
    assert opens(a, USER1)
    proc = cli(*common, "change", "gamma", stdin=feed)
    assert proc.returncode == 1 and b"gamma: no such volume" in proc.stderr
    proc = cli(*common, "status")
    assert proc.returncode == 0 and b"alpha" in proc.stdout and b"LUKS1" in proc.stdout
    crypttab.write_text(f"alpha {a} none luks\n")
    proc = cli(*common, "change", stdin=USER1 + b"\n" + USER0 + b"\n" + USER0 + b"\n")
    assert proc.returncode == 0, proc.stderr  # the only volume is taken
    assert opens(a, USER0)


def test_exit_codes(tmp_path: Path, keys: EscrowKeys) -> None:
    image = make_image(tmp_path / "v.img", "luks2")
    add_key(image, USER0, BACKUP0, 1, tmp_path)
    common = ["--state-dir", str(tmp_path / "s"), "--certificate", str(keys.cert)]
    bad = cli(*common, "change", str(image), stdin=b"wrong\n")
    assert bad.returncode == 3 and b"no key slot opens" in bad.stderr
    mismatch = cli(*common, "change", str(image), stdin=USER0 + b"\nnew one 1\nnew one 2\n")
    assert mismatch.returncode == 4 and b"differ" in mismatch.stderr
    short = cli(*common, "change", str(image), stdin=USER0 + b"\nshort\nshort\n")
    assert short.returncode == 4
    ended = cli(*common, "change", str(image), stdin=USER0 + b"\n")
    assert ended.returncode == 1 and b"standard input ended" in ended.stderr
    missing = cli(*common, "change", str(tmp_path / "nothing.img"), stdin=USER0 + b"\n")
    assert missing.returncode == 1
    notluks = tmp_path / "plain.img"
    notluks.write_bytes(bytes(4096))
    r = cli(*common, "change", str(notluks), stdin=USER0 + b"\n" + USER1 + b"\n" + USER1 + b"\n")
    assert r.returncode == 1 and b"not a LUKS volume" in r.stderr
    assert b"Traceback" not in bad.stderr + mismatch.stderr + r.stderr
    assert active_slots(image) == [0, 1]


def test_a_scripted_recovery_must_be_confirmed(tmp_path: Path, keys: EscrowKeys) -> None:
    """The backup passphrase on standard input (a script, or the window through pkexec)
    removes every other passphrase of the disk only with --recovery; without it, exit 6
    and the disk as it was."""
    from tests.lukslib import setup_volume

    image, store = setup_volume(tmp_path / "v", "luks2", keys, extra_user=True)
    common = ["--state-dir", str(store.dir), "--certificate", str(keys.cert)]
    before = active_slots(image)
    lines = BACKUP0 + b"\n" + USER1 + b"\n" + USER1 + b"\n"
    refused = cli(*common, "change", str(image), stdin=lines)
    assert refused.returncode == 6, refused.stderr
    assert refused.stderr.decode().strip().endswith(
        "confirm it with --recovery, or run the command on a terminal")
    assert active_slots(image) == before and opens(image, USER0) and not opens(image, USER1)
    done = cli(*common, "change", "--recovery", str(image), stdin=lines)
    assert done.returncode == 0, done.stderr
    assert opens(image, USER1) and not opens(image, USER0)
    # --recovery confirms a recovery; it is no way around a wrong passphrase
    wrong = cli(*common, "change", "--recovery", str(image), stdin=b"not it\n")
    assert wrong.returncode == 3


def test_no_secret_outside_the_escrow_packet(tmp_path: Path, keys: EscrowKeys) -> None:
    """--debug output, state files, and modes: no passphrase anywhere in clear."""
    from luks_passphrase.state import StateStore
    from mandos_core import escrow_packet

    image = make_image(tmp_path / "v.img", "luks1")
    add_key(image, USER0, BACKUP0, 1, tmp_path)
    state = tmp_path / "state"
    common = ["--debug", "--state-dir", str(state), "--certificate", str(keys.cert)]
    pkt = tmp_path / "installer.pkt"
    from mandos_core.secret import Secret

    pkt.write_bytes(escrow_packet.build(keys.cert_pem, Secret(BACKUP0), escrow_packet.Metadata(
        "h", luks_uuid(image), str(image), "crypt_LUKS", 1)))
    outputs = [cli(*common, "import", str(pkt), "--volume", str(image))]
    outputs.append(cli(*common, "change", str(image),
                       stdin=USER0 + b"\n" + USER1 + b"\n" + USER1 + b"\n"))
    outputs.append(cli(*common, "change", "--recovery", str(image),
                       stdin=BACKUP0 + b"\nsecond new passphrase\nsecond new passphrase\n"))
    assert all(p.returncode == 0 for p in outputs), [p.stderr for p in outputs]
    st = StateStore(state).load(luks_uuid(image))
    assert st.queue is not None
    new_backup = escrow_packet.unwrap(escrow_packet.parse(st.queue.packet), keys.key_pem).reveal()
    secrets = [USER0, USER1, BACKUP0, b"second new passphrase", new_backup]
    text = b"".join(p.stdout + p.stderr for p in outputs)
    assert b"Header backed up to" in text
    for root, dirs, files in os.walk(state):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700
        for f in files:
            path = os.path.join(root, f)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
            data = Path(path).read_bytes()
            for s in secrets:
                assert s not in data, (path, s)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for s in secrets:
        assert s not in text


def test_resume_with_nothing_to_do(tmp_path: Path) -> None:
    image = make_image(tmp_path / "v.img", "luks2")
    proc = cli("--state-dir", str(tmp_path / "s"), "resume", str(image))
    assert proc.returncode == 0 and b"Nothing to finish" in proc.stdout


def _expect(fd: int, pattern: bytes, timeout: float = 20) -> bytes:
    import select
    import time

    buf = b""
    deadline = time.monotonic() + timeout
    while pattern not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"timed out waiting for {pattern!r}; got {buf!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            raise AssertionError(f"EOF waiting for {pattern!r}; got {buf!r}")
        buf += chunk
    return buf


def test_interactive_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal: pick a volume from the list, passphrases without echo."""
    import pty
    import sys

    from tests.lukslib import ROOT

    a, b, crypttab = _two_volumes(tmp_path)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the program on a pseudo-terminal
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "luks_passphrase", "--state-dir",
                                   str(tmp_path / "s"), "--crypttab", str(crypttab),
                                   "--dmsetup-table", os.devnull, "change"],
                  {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "TERM": "dumb"})
    try:
        screen = _expect(fd, b"Which volume?")
        assert b"1) alpha" in screen and b"2) beta" in screen
        os.write(fd, b"2\n")
        screen = _expect(fd, b"Current passphrase for beta")
        os.write(fd, USER0 + b"\n")
        _expect(fd, b"New passphrase:")
        os.write(fd, USER1 + b"\n")
        _expect(fd, b"Repeat new passphrase:")
        os.write(fd, USER1 + b"\n")
        screen = _expect(fd, b"Passphrase changed")
        assert USER0 not in screen and USER1 not in screen  # no echo
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert opens(b, USER1) and opens(a, USER0)
