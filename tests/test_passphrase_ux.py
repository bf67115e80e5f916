"""``luks-passphrase`` as a person meets it: the real command on a pseudo-terminal,
checked line by line with its exit code; its log lines caught on a journal socket the
test owns (``MANDOS_JOURNAL_SOCKET``); its help, version and option spellings."""

from __future__ import annotations

import os
import pty
import re
import select
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from luks_passphrase.messages import CHANGED, RECOVERED, RECOVERY_WARNING
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
    luks_uuid,
    make_escrow_keys,
    make_image,
    opens,
)
from tests.uxlib import Journal

NEW = b"correct horse battery staple"
WEAK = b"aaaaaaaa"


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sock")
    yield j
    j.sock.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> EscrowKeys:
    return make_escrow_keys(tmp_path_factory.mktemp("escrow"))


class Terminal:
    """The real command on a pseudo-terminal: wait for a prompt, type, read the screen."""

    def __init__(self, args: list[str], journal: Journal | None = None) -> None:
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "TERM": "dumb",
               "LC_ALL": "C.UTF-8"}
        if journal is not None:
            env["MANDOS_JOURNAL_SOCKET"] = str(journal.path)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the program, its terminal the pty
            try:
                os.chdir(ROOT)
                os.execve(sys.executable, [sys.executable, "-m", "luks_passphrase", *args], env)
            finally:
                os._exit(127)
        self.screen = b""
        self.seen = 0

    def _read(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.fd], [], [], left)[0]:
            return False
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            raise EOFError
        self.screen += chunk
        return True

    def expect(self, text: str, timeout: float = 30) -> None:
        """Wait until *text* is on the screen (after what was already expected)."""
        want = text.encode()
        deadline = time.monotonic() + timeout
        while want not in self.screen[self.seen:]:
            try:
                if not self._read(deadline):
                    raise AssertionError(f"timed out waiting for {text!r}; screen: {self.text()!r}")
            except EOFError:
                raise AssertionError(f"ended before {text!r}; screen: {self.text()!r}") from None
        self.seen = self.screen.index(want, self.seen) + len(want)

    def type(self, text: bytes) -> None:
        os.write(self.fd, text + b"\n")

    def interrupt(self) -> None:
        os.write(self.fd, b"\x03")  # the line discipline sends SIGINT, as Ctrl-C does

    def finish(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        try:
            while self._read(deadline):
                pass
        except EOFError:
            pass
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def text(self) -> str:
        return self.screen.decode(errors="replace").replace("\r\n", "\n")

    def lines(self) -> list[str]:
        return self.text().splitlines()


def _common(tmp_path: Path, *extra: str) -> list[str]:
    return ["--state-dir", str(tmp_path / "state"), *extra]


def _header_line(line: str, state: Path) -> bool:
    return re.fullmatch(re.escape(f"Header backed up to {state}/header-backups/") + r"\S+\.img"
                        r" \(removed once this step is complete\)", line) is not None


# -- the current passphrase ------------------------------------------------------------

def test_three_tries_for_the_current_passphrase(tmp_path: Path, journal: Journal) -> None:
    image = make_image(tmp_path / "v.img", "luks2")
    t = Terminal([*_common(tmp_path), "change", str(image)], journal)
    prompt = f"Current passphrase for {image}: "
    for _ in range(3):
        t.expect(prompt)
        t.type(b"not the passphrase")
    assert t.finish() == 3
    assert t.lines() == [
        prompt,
        f"That passphrase does not open {image}. Try again (2 tries left).",
        prompt,
        f"That passphrase does not open {image}. Try again (1 try left).",
        prompt,
        f"luks-passphrase: that passphrase does not open {image} either (3 tries); "
        "nothing was changed",
    ]
    assert journal.messages() == [f"{image}: wrong passphrase typed"] * 3
    assert active_slots(image) == [0] and opens(image, USER0)


def test_a_wrong_try_then_the_right_one(tmp_path: Path, journal: Journal) -> None:
    image = make_image(tmp_path / "v.img", "luks1")
    t = Terminal([*_common(tmp_path), "change", str(image)], journal)
    t.expect("Current passphrase")
    t.type(b"typo")
    t.expect("Current passphrase")
    t.type(USER0)
    t.expect("New passphrase: ")
    t.type(NEW)
    t.expect("Repeat new passphrase: ")
    t.type(NEW)
    assert t.finish() == 0
    lines = t.lines()
    assert lines[:5] == [
        f"Current passphrase for {image}: ",
        f"That passphrase does not open {image}. Try again (2 tries left).",
        f"Current passphrase for {image}: ",
        "New passphrase: ",
        "Strength: strong.",
    ]
    assert lines[5] == "Repeat new passphrase: "
    assert _header_line(lines[6], tmp_path / "state") and lines[7:] == [CHANGED]
    assert opens(image, NEW) and not opens(image, USER0)


# -- the new passphrase ------------------------------------------------------------------

def test_length_and_strength_are_checked_before_the_repeat(tmp_path: Path,
                                                          journal: Journal) -> None:
    image = make_image(tmp_path / "v.img", "luks2")
    t = Terminal([*_common(tmp_path), "change", str(image)], journal)
    t.expect("Current passphrase")
    t.type(USER0)
    t.expect("New passphrase: ")
    t.type(b"short")
    t.expect("New passphrase: ")
    t.type(WEAK)
    t.expect("Use it anyway? [y/N]: ")
    t.type(b"n")
    t.expect("New passphrase: ")
    t.type(NEW)
    t.expect("Repeat new passphrase: ")
    t.type(NEW)
    assert t.finish() == 0
    lines = t.lines()
    assert lines[:10] == [
        f"Current passphrase for {image}: ",
        "New passphrase: ",
        "Too short: at least 8 characters. Try again (2 tries left).",
        "New passphrase: ",
        "Strength: weak. It would be easy to guess; a few unrelated words are better.",
        "Use it anyway? [y/N]: n",
        "Choose another one. Try again (1 try left).",
        "New passphrase: ",
        "Strength: strong.",
        "Repeat new passphrase: ",
    ]
    assert _header_line(lines[10], tmp_path / "state") and lines[11:] == [CHANGED]
    # the log lines went to the journal, none to the terminal
    logged = journal.messages()
    assert any(m.startswith("passphrase changed: key slot 0 -> ") for m in logged), logged
    assert any(m.startswith("destroyed key slot 0") for m in logged), logged
    assert not [ln for ln in lines if ln.startswith(("luks_passphrase", "mandos_core"))]
    assert opens(image, NEW) and not opens(image, USER0)


def test_three_differing_repeats_change_nothing(tmp_path: Path) -> None:
    image = make_image(tmp_path / "v.img", "luks2")
    t = Terminal([*_common(tmp_path), "change", str(image)])
    t.expect("Current passphrase")
    t.type(USER0)
    for _ in range(3):
        t.expect("New passphrase: ")
        t.type(NEW)
        t.expect("Repeat new passphrase: ")
        t.type(NEW + b"?")
    assert t.finish() == 4
    assert t.lines()[-6:] == [
        "The two passphrases differ. Try again (1 try left).",
        "New passphrase: ",
        "Strength: strong.",
        "Repeat new passphrase: ",
        "The two passphrases differ.",
        "luks-passphrase: no new passphrase was accepted; nothing was changed",
    ]
    assert active_slots(image) == [0] and opens(image, USER0)


# -- recovery ----------------------------------------------------------------------------

def _with_backup(tmp_path: Path, keys: EscrowKeys) -> Path:
    image = make_image(tmp_path / "v.img", "luks2")
    add_key(image, USER0, BACKUP0, 1, tmp_path)
    pkt = tmp_path / "installer.pkt"
    pkt.write_bytes(escrow_packet.build(keys.cert_pem, Secret(BACKUP0), escrow_packet.Metadata(
        "h", luks_uuid(image), str(image), "crypt_LUKS", 1)))
    proc = cli(*_common(tmp_path, "--certificate", str(keys.cert)), "import", str(pkt),
               "--volume", str(image))
    assert proc.returncode == 0, proc.stderr
    return image


def test_the_backup_passphrase_says_recovery_and_asks(tmp_path: Path, keys: EscrowKeys) -> None:
    image = _with_backup(tmp_path, keys)
    args = [*_common(tmp_path, "--certificate", str(keys.cert)), "change", str(image)]
    t = Terminal(args)
    t.expect("Current passphrase")
    t.type(BACKUP0)
    t.expect("Go on with the recovery? [y/N]: ")
    t.type(b"")
    assert t.finish() == 4
    assert t.lines() == [
        f"Current passphrase for {image}: ",
        RECOVERY_WARNING,
        "Go on with the recovery? [y/N]: ",
        "luks-passphrase: recovery cancelled; nothing was changed",
    ]
    assert active_slots(image) == [0, 1] and opens(image, USER0)

    t = Terminal(args)
    t.expect("Current passphrase")
    t.type(BACKUP0)
    t.expect("Go on with the recovery? [y/N]: ")
    t.type(b"y")
    t.expect("New passphrase: ")
    t.type(NEW)
    t.expect("Repeat new passphrase: ")
    t.type(NEW)
    assert t.finish() == 0, t.text()
    lines = t.lines()
    assert lines[:6] == [
        f"Current passphrase for {image}: ",
        RECOVERY_WARNING,
        "Go on with the recovery? [y/N]: y",
        "New passphrase: ",
        "Strength: strong.",
        "Repeat new passphrase: ",
    ]
    assert lines[-1] == RECOVERED and "slot" not in lines[-1]
    assert opens(image, NEW) and not opens(image, USER0)
    assert opens(image, BACKUP0)  # until the escrow server has the new one


# -- Ctrl-C --------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["Current passphrase for", "New passphrase: ",
                                   "Repeat new passphrase: "])
def test_ctrl_c_at_a_prompt_says_so_on_a_new_line(tmp_path: Path, where: str) -> None:
    image = make_image(tmp_path / "v.img", "luks2")
    t = Terminal([*_common(tmp_path), "change", str(image)])
    answers = {"Current passphrase for": USER0, "New passphrase: ": NEW}
    for prompt in ("Current passphrase for", "New passphrase: ", "Repeat new passphrase: "):
        t.expect(prompt)
        if prompt == where:
            t.interrupt()
            break
        t.type(answers[prompt])
    assert t.finish() == 130
    lines = t.lines()
    assert lines[-1] == "luks-passphrase: interrupted; nothing was changed"
    assert lines[-2].endswith(": ")  # the prompt's line was ended, not written over
    assert "Traceback" not in t.text()
    assert active_slots(image) == [0] and opens(image, USER0)


# -- log lines ---------------------------------------------------------------------------

def test_debug_shows_the_log_lines_on_the_terminal(tmp_path: Path, journal: Journal) -> None:
    image = make_image(tmp_path / "v.img", "luks2")
    t = Terminal([*_common(tmp_path), "change", "--debug", str(image)], journal)
    t.expect("Current passphrase")
    t.type(USER0)
    t.expect("New passphrase: ")
    t.type(NEW)
    t.expect("Repeat new passphrase: ")
    t.type(NEW)
    assert t.finish() == 0
    assert re.search(r"^luks_passphrase: passphrase changed: key slot 0 -> \d+ ", t.text(), re.M)
    assert any(m.startswith("passphrase changed") for m in journal.messages())
    assert NEW.decode() not in t.text() and USER0.decode() not in t.text()


# -- status ------------------------------------------------------------------------------

def test_status_with_no_volumes_says_what_to_do(tmp_path: Path) -> None:
    proc = cli(*_common(tmp_path), "--crypttab", os.devnull, "--dmsetup-table", os.devnull,
               "status")
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert proc.stderr.decode().splitlines() == [
        f"luks-passphrase: no encrypted volumes in {os.devnull} or among the active dm-crypt "
        "mappings; name the encrypted partition: luks-passphrase status /dev/DEVICE"]


def test_status_on_a_file_that_is_not_luks(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(1 << 20))
    proc = cli(*_common(tmp_path), "--dmsetup-table", os.devnull, "status", str(plain))
    assert proc.returncode == 1
    assert proc.stderr.decode().splitlines() == [
        f"luks-passphrase: {plain}: not a LUKS volume; name the encrypted partition itself "
        "(the one 'cryptsetup isLuks' accepts), not the opened /dev/mapper device"]
    image = make_image(tmp_path / "v.img", "luks2")
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(f"good {image} none luks\nbad {plain} none luks\n")
    proc = cli(*_common(tmp_path), "--crypttab", str(crypttab), "--dmsetup-table", os.devnull,
               "status")
    assert proc.returncode == 1  # the readable one is shown, the other said, exit 1
    assert proc.stdout.decode().startswith(f"good ({image}): LUKS2 UUID=")
    assert proc.stderr.decode().splitlines()[0].startswith(f"luks-passphrase: bad ({plain}): "
                                                           "not a LUKS volume")


# -- help and option spellings -----------------------------------------------------------

COMMANDS = ["change", "resume", "status", "import", "sync", "gui"]


def _help(*args: str) -> str:
    proc = cli(*args, "--help")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode()


def test_help_has_no_markup_and_every_argument_is_explained() -> None:
    for args in [[], *[[c] for c in COMMANDS]]:
        text = _help(*args)
        assert "`" not in text and ":mod:" not in text and ":ref:" not in text, (args, text)
        section = text.split("positional arguments:\n", 1)
        if len(section) == 1:
            continue
        lines = section[1].split("\n\n", 1)[0].splitlines()
        for i, line in enumerate(lines):  # "  NAME  help" or "  NAME" then indented help
            if re.match(r"^  \S", line):
                described = re.match(r"^  \S+\s{2,}\S", line) or (
                    i + 1 < len(lines) and lines[i + 1].startswith("    "))
                assert described, (args, line)


def test_version_is_this_projects() -> None:
    from importlib import metadata

    import mandos_core

    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.decode() == f"luks-passphrase (mandos-nbde) {mandos_core.__version__}\n"
    assert metadata.version("mandos-nbde") == mandos_core.__version__  # what pip installed


def test_statedir_and_global_options_after_the_command(tmp_path: Path, keys: EscrowKeys) -> None:
    image = _with_backup(tmp_path, keys)  # the state in tmp_path/state knows backup slot 1
    state = str(tmp_path / "state")
    for args in (["--statedir", state, "status", str(image)],
                 ["status", "--statedir", state, str(image)],
                 ["status", str(image), "--state-dir", state]):
        proc = cli(*args, "--dmsetup-table", os.devnull)
        assert proc.returncode == 0, (args, proc.stderr)
        assert b"current backup slot: 1" in proc.stdout, args
    plain = cli("status", "--statedir", state, str(image))
    debug = cli("status", "--statedir", state, str(image), "--debug")
    assert b"+ dmsetup" not in plain.stderr and b"+ dmsetup" in debug.stderr
    # given before the command, a global option is not undone by the command's default
    proc = cli("--statedir", state, "status", "--debug", str(image))
    assert b"current backup slot: 1" in proc.stdout


def test_pkexec_still_accepts_only_change_volume(tmp_path: Path) -> None:
    """The new spellings do not widen what pkexec's caller may run (checked on raw argv)."""
    image = make_image(tmp_path / "v.img", "luks2")
    for args in (["change", str(image), "--statedir", str(tmp_path)],
                 ["change", "--debug", str(image)], ["--version"], ["status", "--statedir", "x"]):
        proc = cli(*args, env={"PKEXEC_UID": "65534"})
        assert proc.returncode == 2, args
        assert proc.stderr.decode().count("\n") == 1 and b"only `change [--recovery] VOLUME`" in proc.stderr
