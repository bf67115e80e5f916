"""``luks-passphrase`` through the real pkexec, from the attacker's side.

The polkit action lets a user run ``/usr/bin/luks-passphrase`` as root.  The
attacker here is that user (``nobody``): whatever arguments, state
directory, journal or symlinks they can arrange, all they may get is ``change
VOLUME`` on a volume the machine lists, with the passphrase they know.

Everything is real: the setuid ``pkexec`` runs as ``nobody`` and asks a real
``polkitd`` (D-Bus activated by a real system ``dbus-daemon``) about the
shipped action, granted to ``nobody`` by a polkit rule.  Each run happens in
a private mount and PID namespace: ``/etc`` is an overlay whose upper
directory the test prepares (the rule, ``crypttab``, ``/etc/luks-passphrase``),
``/run/dbus`` a private tmpfs, and ``/usr/share/polkit-1/actions`` holds only
our action, pointed at a wrapper that starts this tree's ``luks-passphrase``.
Nothing of the host's ``/etc`` changes, and every daemon dies with the
namespace.  Key slots are checked with the ``cryptsetup`` program.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lukslib import (
    BACKUP0,
    ROOT,
    USER0,
    add_key,
    cli,
    luks_uuid,
    make_image,
    opens,
)

ATTACKER = 65534  # nobody
USER1 = b"user passphrase one!"
ACTION = "org.mandos-nbde.luks-passphrase.change"
POLICY = ROOT / "luks_passphrase" / "org.mandos-nbde.luks-passphrase.policy"
STATE = "/etc/luks-passphrase"

RULE = f"""polkit.addRule(function(action, subject) {{
    if (action.id == "{ACTION}" && subject.user == "nobody")
        return polkit.Result.YES;
}});
"""

# pid 1 of the namespace runs this; pkexec refuses a parent that is pid 1, so the
# attacker's command runs from a second shell.
SETUP = """set -e
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc
mount -t tmpfs -o mode=0755 none /run/dbus
mount --bind "$3" /usr/share/polkit-1/actions
dbus-daemon --system --fork
shift 3
set +e
setpriv --reuid=65534 --regid=65534 --clear-groups -- pkexec "$@"
"""


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, setuid pkexec)")
    for tool in ("pkexec", "unshare", "setpriv", "dbus-daemon", "cryptsetup"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not Path("/usr/lib/polkit-1/polkitd").exists():
        pytest.skip("polkitd is not installed")


@dataclass
class Polkit:
    """A polkit world where ``nobody`` may run our luks-passphrase through pkexec."""

    base: Path

    def __post_init__(self) -> None:
        self.upper = self.base / "etc-upper"
        self.work = self.base / "etc-work"
        self.actions = self.base / "actions"
        self.wrapper = self.base / "bin" / "luks-passphrase"
        for d in (self.upper / "polkit-1" / "rules.d", self.work, self.actions,
                  self.wrapper.parent):
            d.mkdir(parents=True, exist_ok=True)
        (self.upper / "polkit-1" / "rules.d" / "10-test.rules").write_text(RULE)
        # the wrapper plays /usr/bin/luks-passphrase: pkexec clears the environment
        self.wrapper.write_text(f"#!/bin/sh\ncd {ROOT} && exec {sys.executable} "
                                '-m luks_passphrase "$@"\n')
        self.wrapper.chmod(0o755)
        policy = POLICY.read_text()
        assert "/usr/bin/luks-passphrase" in policy and ACTION in policy
        (self.actions / POLICY.name).write_text(
            policy.replace("/usr/bin/luks-passphrase", str(self.wrapper)))
        self.base.chmod(0o755)  # the overlay's upper directory must be reachable

    @property
    def state(self) -> Path:
        """``/etc/luks-passphrase`` as the namespace will see it."""
        return self.upper / "luks-passphrase"

    def crypttab(self, *lines: str) -> None:
        (self.upper / "crypttab").write_text("".join(f"{ln}\n" for ln in lines))

    def pkexec(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        """``pkexec luks-passphrase ARGS`` run by the attacker (uid nobody)."""
        argv = ["unshare", "--mount", "--pid", "--fork", "--mount-proc",
                "--propagation", "private", "--", "sh", "-c", 'sh -c "$0" setup "$@"; exit $?',
                SETUP, str(self.upper), str(self.work), str(self.actions),
                str(self.wrapper), *args]
        proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=120, cwd="/")
        assert proc.returncode not in (126, 127), (  # pkexec itself said no
            f"pkexec did not run the program: {proc.returncode} {proc.stderr!r}")
        return proc


@pytest.fixture()
def polkit() -> Iterator[Polkit]:
    _require()
    # pkexec checks the program's path as the calling user: not under pytest's 0700 tmp
    base = Path(tempfile.mkdtemp(prefix="pkexec-test.", dir="/tmp"))
    try:
        yield Polkit(base)
    finally:
        shutil.rmtree(base)


def _slots(image: Path) -> list[int]:
    """Active key slots as `cryptsetup luksDump` shows them."""
    out = subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(image)],
                         capture_output=True, check=True).stdout
    return sorted(int(s) for s in json.loads(out)["keyslots"])


def _victim(tmp_path: Path) -> tuple[Path, Path]:
    """A root-owned LUKS2 volume (USER0 slot 0, BACKUP0 slot 1) and a precious root file."""
    d = tmp_path / "victim"
    d.mkdir()
    image = make_image(d / "vol.img", "luks2")
    add_key(image, USER0, BACKUP0, 1, d)
    precious = d / "precious"
    precious.write_text("root's file\n")
    assert _slots(image) == [0, 1]
    return image, precious


def _crafted_journal(uuid: str, precious: Path) -> str:
    """A journal that rolls back a "change" whose target is slot 1, and unlinks *precious*."""
    return json.dumps({
        "uuid": uuid, "version": 1, "current_backup_slot": None, "current_backup_salt": None,
        "pending_backup_slot": None, "pending_backup_salt": None, "backup_needed": False,
        "queue": None,
        "journal": {"op": "change", "phase": "add", "old_slot": 0, "old_salt": "x",
                    "target": 1, "before": [], "header_backup": str(precious)}})


def _attacker_dir(path: Path, uuid: str, precious: Path) -> Path:
    path.mkdir(mode=0o700)
    (path / f"{uuid}.json").write_text(_crafted_journal(uuid, precious))
    for p in (path, path / f"{uuid}.json"):
        os.chown(p, ATTACKER, ATTACKER)
    return path


def _untouched(image: Path, precious: Path) -> None:
    assert _slots(image) == [0, 1], "a key slot was destroyed"
    assert opens(image, BACKUP0, 1) and opens(image, USER0, 0)
    assert precious.read_text() == "root's file\n", "the precious file was unlinked"


def _one_line_refusal(proc: subprocess.CompletedProcess[bytes], *words: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, (proc.stdout, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("luks-passphrase: "), err
    for w in words:
        assert w in lines[0], err
    return lines[0]


# -- the reviewer's attack: the whole CLI behind the polkit action ----------------

def test_crafted_journal_in_attacker_state_dir_is_refused(polkit: Polkit, tmp_path: Path) -> None:
    """`pkexec luks-passphrase --state-dir X resume IMG`, no passphrase: nothing happens."""
    image, precious = _victim(tmp_path)
    uuid = luks_uuid(image)
    x = _attacker_dir(tmp_path / "attacker", uuid, precious)
    before = (x / f"{uuid}.json").read_bytes()
    proc = polkit.pkexec("--state-dir", str(x), "resume", str(image))
    _one_line_refusal(proc, "pkexec", "--state-dir")
    assert proc.returncode == 2
    _untouched(image, precious)
    assert (x / f"{uuid}.json").read_bytes() == before


@pytest.mark.parametrize("args", [
    ["resume", "{image}"],
    ["status"],
    ["sync", "--server", "127.0.0.1:9"],
    ["import", "{precious}"],
    ["gui", "{image}"],
    ["--state", "{x}", "change", "{image}"],  # argparse would take the abbreviation
    ["--state-dir={x}", "change", "{image}"],
    ["--crypttab", "{x}/crypttab", "change", "vol"],
    ["--certificate", "{x}/cert.pem", "change", "{image}"],
    ["--keep-header-backups", "change", "{image}"],
    ["change", "{image}", "--state-dir", "{x}"],
    ["change", "{image}", "{image}"],
    ["change", "{image}", "--recovery"],  # only right after "change"
    ["change", "--recovery", "--recovery", "{image}"],
    ["change", "--recovery"],
    ["change"],
    ["--help"],
], ids=lambda a: " ".join(a))
def test_everything_but_change_volume_is_refused(polkit: Polkit, tmp_path: Path,
                                                 args: list[str]) -> None:
    image, precious = _victim(tmp_path)
    uuid = luks_uuid(image)
    x = _attacker_dir(tmp_path / "attacker", uuid, precious)
    polkit.crypttab(f"vol {image} none luks")
    argv = [a.format(image=image, precious=precious, x=x) for a in args]
    proc = polkit.pkexec(*argv, stdin=USER0 + b"\n" + USER1 + b"\n" + USER1 + b"\n")
    _one_line_refusal(proc, "pkexec")
    assert proc.returncode == 2
    assert proc.stdout == b""
    _untouched(image, precious)
    assert not polkit.state.exists() or not any(polkit.state.iterdir())


def test_volume_not_listed_by_the_machine_is_refused(polkit: Polkit, tmp_path: Path) -> None:
    """The attacker's own image (any header, any UUID) is not a volume of this machine."""
    image, precious = _victim(tmp_path)
    mine = make_image(tmp_path / "mine.img", "luks2")
    os.chown(mine, ATTACKER, ATTACKER)
    polkit.crypttab(f"vol {image} none luks")
    proc = polkit.pkexec("change", str(mine), stdin=USER0 + b"\n" + USER1 + b"\n" + USER1 + b"\n")
    _one_line_refusal(proc, str(mine), "crypttab")
    assert opens(mine, USER0) and not opens(mine, USER1)


# -- the state directory -------------------------------------------------------------

def _state_dir(polkit: Polkit, mode: int, owner: int = 0) -> Path:
    polkit.state.mkdir(mode=mode)
    polkit.state.chmod(mode)
    os.chown(polkit.state, owner, owner)
    return polkit.state


def _change(polkit: Polkit, image: Path) -> subprocess.CompletedProcess[bytes]:
    return polkit.pkexec("change", str(image), stdin=USER0 + b"\n" + USER1 + b"\n" + USER1 + b"\n")


def test_state_dir_readable_by_others_is_refused(polkit: Polkit, tmp_path: Path) -> None:
    image, precious = _victim(tmp_path)
    polkit.crypttab(f"vol {image} none luks")
    _state_dir(polkit, 0o755)
    line = _one_line_refusal(_change(polkit, image), STATE, f"chmod 0700 {STATE}")
    assert "0755" in line
    _untouched(image, precious)
    assert not opens(image, USER1)
    assert polkit.state.stat().st_mode & 0o777 == 0o755  # refused, not silently "fixed"


def test_state_dir_owned_by_the_attacker_is_refused(polkit: Polkit, tmp_path: Path) -> None:
    image, precious = _victim(tmp_path)
    uuid = luks_uuid(image)
    polkit.crypttab(f"vol {image} none luks")
    state = _state_dir(polkit, 0o700, ATTACKER)
    (state / f"{uuid}.json").write_text(_crafted_journal(uuid, precious))
    os.chown(state / f"{uuid}.json", ATTACKER, ATTACKER)
    _one_line_refusal(_change(polkit, image), STATE, f"chown root:root {STATE}")
    _untouched(image, precious)
    assert not opens(image, USER1)


def test_symlinked_state_dir_is_refused(polkit: Polkit, tmp_path: Path) -> None:
    image, precious = _victim(tmp_path)
    polkit.crypttab(f"vol {image} none luks")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    polkit.state.symlink_to(elsewhere)
    _one_line_refusal(_change(polkit, image), STATE, "symbolic link")
    _untouched(image, precious)
    assert not any(elsewhere.iterdir())


def test_symlinked_lock_file_is_not_followed(polkit: Polkit, tmp_path: Path) -> None:
    """UUID.lock -> a path that does not exist: root must not create it (think /etc/nologin)."""
    image, precious = _victim(tmp_path)
    uuid = luks_uuid(image)
    polkit.crypttab(f"vol {image} none luks")
    state = _state_dir(polkit, 0o700)
    target = tmp_path / "victim" / "nologin"
    (state / f"{uuid}.lock").symlink_to(target)
    _one_line_refusal(_change(polkit, image), f"{uuid}.lock")
    assert not target.exists() and not target.is_symlink(), "root followed the lock symlink"
    _untouched(image, precious)
    assert not opens(image, USER1)


def test_symlinked_state_file_is_not_followed(polkit: Polkit, tmp_path: Path) -> None:
    """UUID.json -> the attacker's crafted journal: never read, so never acted on."""
    image, precious = _victim(tmp_path)
    uuid = luks_uuid(image)
    polkit.crypttab(f"vol {image} none luks")
    state = _state_dir(polkit, 0o700)
    crafted = tmp_path / "crafted.json"
    crafted.write_text(_crafted_journal(uuid, precious))
    (state / f"{uuid}.json").symlink_to(crafted)
    _one_line_refusal(_change(polkit, image), f"{uuid}.json")
    _untouched(image, precious)
    assert not opens(image, USER1)


# -- what the GUI does still works ---------------------------------------------------

def test_change_volume_through_pkexec_works(polkit: Polkit, tmp_path: Path) -> None:
    """The GUI's call, `pkexec luks-passphrase change DEVICE`, passphrases on stdin."""
    image, _ = _victim(tmp_path)
    polkit.crypttab(f"data {image} none luks")
    proc = _change(polkit, image)
    assert proc.returncode == 0, proc.stderr
    assert b"Passphrase changed" in proc.stdout
    assert opens(image, USER1) and not opens(image, USER0) and opens(image, BACKUP0, 1)
    st = polkit.state.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
    proc = polkit.pkexec("change", "data", stdin=USER1 + b"\n" + USER0 + b"\n" + USER0 + b"\n")
    assert proc.returncode == 0, proc.stderr  # by crypttab name too
    assert opens(image, USER0) and not opens(image, USER1)


def test_a_crafted_journal_in_the_real_state_dir_is_validated(tmp_path: Path) -> None:
    """Even in a root-only directory, a journal naming a file outside it unlinks nothing."""
    image, precious = _victim(tmp_path)
    uuid = luks_uuid(image)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / f"{uuid}.json").write_text(_crafted_journal(uuid, precious))
    proc = cli("--state-dir", str(state), "resume", str(image))
    assert proc.returncode != 0
    assert b"journal" in proc.stderr
    assert precious.exists(), "a journal made root unlink a file outside the state directory"
    assert _slots(image) == [0, 1], "a journal that names no salt destroyed a key slot"


# -- no test switch in the environment -----------------------------------------------

def test_no_test_switch_in_the_environment(tmp_path: Path) -> None:
    """LUKS_PASSPHRASE_TEST_KILL_AT once made the root tool SIGKILL itself mid-change."""
    image, precious = _victim(tmp_path)
    proc = cli("--state-dir", str(tmp_path / "state"), "change", str(image),
               stdin=USER0 + b"\n" + USER1 + b"\n" + USER1 + b"\n",
               env={"LUKS_PASSPHRASE_TEST_KILL_AT": "change:added"})
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert opens(image, USER1) and not opens(image, USER0)
    assert _slots(image) == [1, 2]
    source = "".join(p.read_text() for p in (ROOT / "luks_passphrase").glob("*.py"))
    assert "KILL" not in source and "SIGKILL" not in source
