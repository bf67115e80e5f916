"""What a person sees (issue 13): each command run as a person runs it, with bad input on
purpose, checked for the exact line and the exit status.

Permission problems run the command as user nobody (``setpriv``), the way an admin
who forgot ``sudo`` meets them; ``mandos-ctl -v`` runs on a pseudo-terminal.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import pty
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mandos_core import __version__
from mandosd.state import SQLiteStore
from tests.helpers import ROOT, tool

KEY_ID = "AB" * 32
SECTION = f"[client1]\nkey_id = {KEY_ID}\nhost = 192.0.2.1\nsecret = " \
          f"{base64.b64encode(b'not really encrypted').decode()}\n"


def env(**extra: str) -> dict[str, str]:
    """The environment of an admin's shell: no journal, UTC, this worktree's code."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("MANDOS_JOURNAL_SOCKET", "JOURNAL_STREAM", "NOTIFY_SOCKET",
                      "SUDO_USER", "SYSTEMD_LOG_LEVEL") and not k.startswith("MANDOS_AGENT_")}
    e.update(TZ="UTC", PYTHONPATH=str(ROOT), **extra)
    return e


def run(*argv: str, nobody: bool = False, input: bytes | None = None,
        **extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [tool(argv[0]), *argv[1:]]
    if nobody:
        if not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is needed to run as another user")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *cmd]
    p = subprocess.run(cmd, capture_output=True, input=input, timeout=120, env=env(**extra),
                       stdin=None if input is not None else subprocess.DEVNULL)
    return subprocess.CompletedProcess(cmd, p.returncode, p.stdout.decode(errors="replace"),
                                       p.stderr.decode(errors="replace"))


def one_line(p: subprocess.CompletedProcess[str]) -> str:
    """The one line a failing command printed (and no traceback)."""
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.fixture()
def base() -> Iterator[Path]:
    """A directory that user nobody can reach (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="mandos-messages-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def configdir(base: Path, clients: str = "[DEFAULT]\n", mandos: str | None = None,
              owner: int = 0) -> Path:
    conf = base / "conf"
    conf.mkdir(mode=0o755, exist_ok=True)
    (conf / "clients.conf").write_text(clients)
    (conf / "clients.conf").chmod(0o600)
    os.chown(conf / "clients.conf", owner, owner)
    if mandos is not None:
        (conf / "mandos.conf").write_text(mandos)
    return conf


def root_only(path: Path) -> Path:
    path.mkdir(mode=0o700)
    for name in ("tls-privkey.pem", "tls-pubkey.pem", "seckey.txt", "pubkey.txt"):
        (path / name).write_text("x")
        (path / name).chmod(0o600)
    return path


# -- as an ordinary user: one line, "(run as root)", the documented status -----------------

def test_mandosd_check_config_as_ordinary_user(base: Path) -> None:
    conf = configdir(base)
    p = run("mandosd", "--configdir", str(conf), "--check-config", nobody=True)
    assert (p.returncode, one_line(p)) == (
        1, f"mandosd: {conf}/clients.conf: Permission denied (run as root)")


def test_mandosd_state_as_ordinary_user(base: Path) -> None:
    conf = configdir(base, owner=65534)
    (base / "state").mkdir(mode=0o700)
    p = run("mandosd", "--configdir", str(conf), "--statedir", str(base / "state"),
            "--run-checkers", nobody=True)
    assert (p.returncode, one_line(p)) == (
        1, f"mandosd: {base}/state/clients.sqlite: Permission denied (run as root)")
    p = run("mandosd", "--configdir", str(conf), "--state-dir", str(base / "new" / "state"),
            "--run-checkers", nobody=True)
    assert (p.returncode, one_line(p)) == (
        1, f"mandosd: {base}/new/state/clients.sqlite: cannot be made here: {base} is not "
        "writable (run as root)")
    assert not (base / "new").exists()


def test_mandos_ctl_as_ordinary_user(base: Path) -> None:
    p = run("mandos-ctl", "--configdir", str(configdir(base)), nobody=True)
    assert (p.returncode, one_line(p)) == (
        1, f"mandos-ctl: {base}/conf/clients.conf: Permission denied (run as root)")
    conf = configdir(base, owner=65534)
    (base / "state").mkdir(mode=0o700)
    for args in ([], ["--disable", "--all"]):
        p = run("mandos-ctl", "--configdir", str(conf), "--statedir", str(base / "state"),
                *args, nobody=True)
        assert (p.returncode, one_line(p)) == (
            1, f"mandos-ctl: {base}/state/clients.sqlite: Permission denied (run as root)")


def test_mandos_keygen_as_ordinary_user(base: Path) -> None:
    keys = root_only(base / "keys")
    p = run("mandos-keygen", "--dir", str(keys), nobody=True)
    assert (p.returncode, one_line(p)) == (
        1, f"mandos-keygen: {keys}/tls-privkey.pem: Permission denied (run as root)")


def test_mandos_client_as_ordinary_user(base: Path) -> None:
    keys = root_only(base / "keys")
    p = run("mandos-client", "--keydir", str(keys), "--connect", "127.0.0.1:9", nobody=True)
    assert (p.returncode, one_line(p)) == (
        3, f"mandos-client: {keys}/tls-cert.pem: Permission denied (run as root)")


def test_agent_as_ordinary_user_exits_3(base: Path) -> None:
    """docs/agent.md: exit status 3 when the key files cannot be used."""
    keys = root_only(base / "keys")
    ask = base / "ask"
    ask.mkdir(mode=0o755)
    p = run("mandos-password-agent", "--keydir", str(keys), "--ask-dir", str(ask),
            "--connect", "127.0.0.1:9", "--no-zeroconf", "--config", "/dev/null", nobody=True)
    assert (p.returncode, one_line(p)) == (
        3, f"mandos-password-agent: {keys}/tls-cert.pem: Permission denied (run as root)")


# -- library words become sentences -------------------------------------------------------

def test_agent_timeout_takes_durations(base: Path) -> None:
    keys = base / "nokeys"
    common = ["--keydir", str(keys), "--ask-dir", str(base), "--connect", "127.0.0.1:9",
              "--no-zeroconf", "--config", "/dev/null"]
    # 10s is understood: the agent gets as far as the (missing) keys
    p = run("mandos-password-agent", *common, MANDOS_AGENT_TIMEOUT="10s")
    assert p.returncode == 3 and one_line(p).startswith(
        f"mandos-password-agent: {keys}: directory not found"), p.stderr
    p = run("mandos-password-agent", *common, MANDOS_AGENT_TIMEOUT="ten")
    assert (p.returncode, one_line(p)) == (
        2, "mandos-password-agent: environment: MANDOS_AGENT_TIMEOUT=ten: not a duration: "
        "'ten' (use seconds, or e.g. 10s, PT10S, 1m)")
    p = run("mandos-password-agent", *common, "--timeout", "PT0S")
    assert (p.returncode, one_line(p)) == (
        2, "mandos-password-agent: --timeout=PT0S: must be more than 0 and at most 3600 "
        "seconds (1h)")


def test_port_not_a_number(base: Path) -> None:
    conf = configdir(base, mandos="[DEFAULT]\nport = nine\n")
    p = run("mandosd", "--configdir", str(conf), "--check-config")
    assert (p.returncode, one_line(p)) == (
        1, f"mandosd: {conf}/mandos.conf: [DEFAULT] port=nine: not a port number (use 1 to "
        "65535, or 0 for any free port)")


@pytest.mark.parametrize(("text", "expected"), [
    ("[DEFAULT]\ntimeout = PT5M\ngarbage line\n",
     "clients.conf:3: not understood: 'garbage line'; a line must be '[section]', "
     "'key = value', or a comment starting with # or ;"),
    ("timeout = PT5M\n",
     "clients.conf:1: 'timeout = PT5M' comes before any [section] (start the file with "
     "[DEFAULT] or a client's [name])"),
    (f"{SECTION}{SECTION}",
     "clients.conf:5: section [client1] appears twice (merge the two, or rename one)"),
    ("[web1]\nhost = a\nhost = b\n",
     "clients.conf:3: [web1] host is set twice in the same section (keep one)"),
])
def test_syntax_errors_name_file_line_and_form(base: Path, text: str, expected: str) -> None:
    conf = configdir(base, text)
    p = run("mandosd", "--configdir", str(conf), "--check-config")
    assert (p.returncode, one_line(p)) == (1, f"mandosd: {conf}/{expected}")
    with pytest.raises(configparser.Error):  # configparser's own text, for contrast
        configparser.ConfigParser(strict=True).read_string(text)


def test_mandos_client_timeout_zero() -> None:
    p = run("mandos-client", "--connect", "127.0.0.1:9", "--timeout", "0")
    assert p.returncode == 2
    assert p.stderr.splitlines()[-1] == ("mandos-client: error: argument --timeout: '0': "
                                         "must be more than 0 and at most 3600 seconds (1h)")


def test_keygen_passfile_empty_and_final_newline(base: Path, client_keys: Path) -> None:
    empty = base / "empty"
    empty.write_bytes(b"")
    p = run("mandos-keygen", "--dir", str(client_keys), "--passfile", str(empty))
    assert (p.returncode, one_line(p)) == (
        1, f"mandos-keygen: {empty}: empty; the passphrase must be in it")
    assert p.stdout == ""
    newline = base / "newline"
    newline.write_bytes(b"secret\n")
    p = run("mandos-keygen", "--dir", str(client_keys), "--passfile", str(newline))
    assert (p.returncode, one_line(p)) == (
        0, f"mandos-keygen: warning: the passphrase in {newline} ends in a newline, which is "
        "part of it; to leave it out: printf %s 'PASSPHRASE' > FILE")
    assert p.stdout.startswith("[")  # the section is still printed: byte for byte is right


# -- mandos-ctl: confirmations, subcommands, listings ----------------------------------------

@pytest.fixture()
def server(base: Path) -> tuple[Path, Path]:
    """clients.conf with client1 (approval_delay, so a request can wait) and its state."""
    conf = configdir(base, "[DEFAULT]\napproval_delay = PT1M\n" + SECTION)
    state = base / "state"
    p = run("mandos-ctl", "--configdir", str(conf), "--statedir", str(state), "-e", "client1")
    assert p.returncode == 0, p.stderr
    return conf, state


def test_ctl_change_prints_a_short_confirmation(server: tuple[Path, Path]) -> None:
    conf, state = server
    p = run("mandos-ctl", "--configdir", str(conf), "--statedir", str(state), "--disable",
            "client1", SUDO_USER="alice")
    assert (p.returncode, p.stderr) == (0, "mandos-ctl: client1 disabled by alice\n")
    p = run("mandos-ctl", "--configdir", str(conf), "--statedir", str(state), "-t", "PT10M",
            "client1", SUDO_USER="alice")
    assert (p.returncode, p.stderr) == (0, "mandos-ctl: client1: timeout set by alice\n")


def test_escrow_global_options_before_or_after(server: tuple[Path, Path], base: Path) -> None:
    conf, state = server
    for argv in (["--statedir", str(state), "escrow", "list"],
                 ["escrow", "--state-dir", str(state), "list"],
                 ["escrow", "list", "--statedir", str(state)]):
        p = run("mandos-ctl", "--configdir", str(conf), *argv)
        assert (p.returncode, p.stdout.split()) == (
            0, ["SEQ", "CLIENT", "VOLUME", "UUID", "SLOT", "RECEIVED", "HOST"]), p.stderr
        assert p.stderr == "mandos-ctl escrow: no packet stored yet\n"
    assert not (state / "escrow.sqlite").exists()  # listing creates nothing
    wrong = base / "wrong"
    p = run("mandos-ctl", "--configdir", str(conf), "--statedir", str(wrong), "escrow", "list")
    assert (p.returncode, one_line(p)) == (
        1, f"mandos-ctl escrow: {wrong}: no key server state here (wrong --statedir?)")
    assert not wrong.exists()
    p = run("mandos-ctl", "--debug", "--configdir", str(conf), "--statedir", str(state),
            "identity")
    assert (p.returncode, one_line(p)) == (
        1, f"mandos-ctl: {state}/server-tls-privkey.pem: no server identity yet (mandosd makes "
        "it on first start)")


LISTING = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \((just now|\d+ s ago)\)")


def test_listing_never_zone_age_and_pending_approval(server: tuple[Path, Path]) -> None:
    conf, state = server
    ctl = ("mandos-ctl", "--configdir", str(conf), "--statedir", str(state))
    p = run(*ctl)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "Name    Enabled Timeout  Last Successful Check",
        "client1 Yes     00:05:00 never"]
    assert run(*ctl, "--bump-timeout", "client1").returncode == 0
    row = run(*ctl).stdout.splitlines()[1]
    assert row.startswith("client1 Yes     00:05:00 ") and LISTING.fullmatch(row[25:]), row
    # a request that waits for --approve/--deny shows in the default listing
    store = SQLiteStore(state)
    store.update("client1", approval_pending_until=time.time() + 600)
    store.close()
    lines = run(*ctl).stdout.splitlines()
    assert re.fullmatch(r"Name    Enabled Timeout  Last Successful Check +Approval Is Pending",
                        lines[0]), lines[0]
    assert lines[1][lines[0].index("Approval Is Pending"):] == "Yes"
    assert all(line == line.rstrip() for line in lines)
    # scripts: -j keeps Mandos's D-Bus properties (UTC ISO 8601, "" for never)
    data = json.loads(run(*ctl, "-j").stdout)["client1"]
    assert data["ApprovalPending"] is True and data["LastApprovalRequest"] == ""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", data["LastCheckedOK"])


def on_pty(argv: list[str]) -> str:
    """Run *argv* with its output on a pseudo-terminal, as in an admin's shell."""
    leader, follower = pty.openpty()
    try:
        p = subprocess.Popen(argv, stdout=follower, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, env=env())
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the program closed its end
                break
            if not chunk:
                break
            out += chunk
        assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
    finally:
        os.close(leader)
    return out.decode().replace("\r\n", "\n")


def test_verbose_one_field_per_line_on_a_terminal(server: tuple[Path, Path]) -> None:
    conf, state = server
    argv = [tool("mandos-ctl"), "--configdir", str(conf), "--statedir", str(state), "-v"]
    lines = on_pty(argv).splitlines()
    assert lines[0] == "Name:                  client1"
    assert "Enabled:               Yes" in lines
    assert "Last Successful Check: never" in lines
    assert "Key ID:                " + KEY_ID in lines
    assert "Last Checker Status:   never run" in lines
    assert len(lines) == 20 and all(line == line.rstrip() for line in lines)
    piped = run(*argv[:1], *argv[1:])  # not a terminal: Mandos's table, one row per client
    assert len(piped.stdout.splitlines()) == 2
    assert any(re.fullmatch(r"Expires:               \S+ \S+ UTC \(in [45] min\)", line)
               for line in lines), lines
    assert run("mandos-ctl", *argv[1:-1], "-d", "client1").returncode == 0
    assert "Expires:               -" in on_pty(argv).splitlines()  # disabled: nothing expires


# -- help and versions ----------------------------------------------------------------------

COMMANDS = ("mandosd", "mandos-ctl", "mandos-keygen", "mandos-client", "mandos-password-agent")


@pytest.mark.parametrize("command", COMMANDS)
def test_version_is_this_projects(command: str) -> None:
    p = run(command, "--version")
    assert (p.returncode, p.stdout) == (
        0, f"{command} (mandos-nbde) {__version__}, compatible with Mandos 1.8.16\n")
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: mandos_core.__version__"  # one place


@pytest.mark.parametrize("argv", [
    *[[c] for c in COMMANDS], ["mandos-ctl", "escrow"], ["mandos-ctl", "identity"],
    ["mandos-ctl", "escrow", "list"], ["mandos-ctl", "escrow", "export"],
    ["mandos-ctl", "escrow", "secrets"]])
def test_help_is_plain_text_and_names_every_argument(argv: list[str]) -> None:
    p = run(*argv, "--help")
    assert p.returncode == 0, p.stderr
    assert not re.search(r"``|`[^`]+`|:(mod|func|class|data):|\*\*", p.stdout), p.stdout
    assert all(line == line.rstrip() for line in p.stdout.splitlines())
    if "positional arguments:" in p.stdout:
        block = p.stdout.split("positional arguments:")[1].split("\n\n")[0]
        for line in block.splitlines()[1:]:
            if line.startswith("  ") and not line.startswith("   "):
                assert len(line.split(None, 1)) == 2 or line.strip().endswith("..."), line


def test_other_spellings_are_accepted(base: Path) -> None:
    keys = base / "keys"
    p = run("mandos-keygen", "--keydir", str(keys), "--name", "client9")
    assert p.returncode == 0 and (keys / "tls-pubkey.pem").exists(), p.stderr
    conf = configdir(base)
    p = run("mandos-ctl", "--config-dir", str(conf), "--state-dir", str(base / "nostate"))
    assert (p.returncode, one_line(p)) == (
        1, f"mandos-ctl: {base}/nostate/clients.sqlite: no state store here (mandosd creates "
        "it when it first starts; wrong --statedir?)")
