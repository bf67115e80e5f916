"""mandos.conf / clients.conf: Mandos's own files load; bad input gives one clear line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mandosd.config import ConfigError, load

DEBIAN = Path("/etc/mandos")
GOOD_KEY = "F33FCBED11ED5E03073F6A55B86FFE92AF0E24C045FB6E3B40547B3DC0C030ED"


def write(d: Path, clients: str, server: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "clients.conf").write_text(clients)
    os.chmod(d / "clients.conf", 0o600)  # it holds secrets: refused if others can read it
    if server is not None:
        (d / "mandos.conf").write_text(server)
    return d


def test_debian_mandos_files_load_unchanged() -> None:
    if not (DEBIAN / "clients.conf").exists():
        pytest.skip("Debian's mandos package is not installed")
    cfg = load(DEBIAN)
    assert cfg.server.servicename == "Mandos"


def test_debian_example_client_uncommented(tmp_path: Path) -> None:
    """The example [foo] of Debian's clients.conf, uncommented, parses with Mandos's defaults."""
    if not (DEBIAN / "clients.conf").exists():
        pytest.skip("Debian's mandos package is not installed")
    text = (DEBIAN / "clients.conf").read_text()
    lines, keep = [], False
    for line in text.splitlines():
        if line.startswith(";[foo]"):
            keep = True
        elif line.startswith(";[bar]"):
            keep = False
        if keep and line.startswith(";") and not line.startswith(";#"):
            lines.append(line[1:])
    cfg = load(write(tmp_path, "\n".join(lines)))
    foo = cfg.clients["foo"]
    assert foo.key_id == GOOD_KEY
    assert foo.host == "foo.example.org"
    assert foo.timeout == 300 and foo.interval == 120 and foo.extended_timeout == 900
    assert foo.checker == "fping -q -- %(host)s"
    assert foo.approved_by_default and foo.approval_delay == 0 and foo.approval_duration == 1
    assert foo.secret.startswith(b"\x85")  # a binary OpenPGP packet


SECRET = "secret = aGVsbG8=\n"


@pytest.mark.parametrize("clients,expected", [
    (f"[a]\nkey_id = 12\n{SECRET}", "clients.conf: [a] key_id=12: key_id must be 64"),
    (f"[a]\nkey_id = {GOOD_KEY}\n{SECRET}timeout = soon\n",
     "clients.conf: [a] timeout=soon: not a duration"),
    (f"[a]\nkey_id = {GOOD_KEY}\n{SECRET}approved_by_default = maybe\n",
     "clients.conf: [a] approved_by_default=maybe: not a boolean"),
    (f"[a]\nkey_id = {GOOD_KEY}\nsecret = ***\n", "clients.conf: [a] secret=…: not valid base64"),
    (f"[a]\nkey_id = {GOOD_KEY}\n", "clients.conf: [a]: missing secret"),
    (f"[a]\nkey_id = {GOOD_KEY}\nsecfile = nothere.bin\n", "secfile="),
    (f"[a]\nkey_id = {GOOD_KEY}\n{SECRET}[b]\nkey_id = {GOOD_KEY.lower()}\n{SECRET}",
     "[b] key_id=" + GOOD_KEY + ": same key_id as [a]"),
    (f"[a]\nkey_id = {'E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855'}\n"
     f"{SECRET}", "never valid"),
    (f"[a]\nkey_id = {GOOD_KEY}\n{SECRET}checker = ping %(nohost)s\n", "bad %-interpolation"),
    ("[a\nkey_id = x\n", "clients.conf:"),
    ("key_id = x\n", "clients.conf:1: 'key_id = x' comes before any [section]"),
    (f"[a]\n{SECRET}", "clients.conf: [a]: no key_id"),
])
def test_config_errors(tmp_path: Path, clients: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, clients))
    assert expected in str(e.value)
    assert "\n" not in str(e.value)
    assert "aGVsbG8" not in str(e.value)  # never echo a secret


def test_server_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mandos.conf: \[DEFAULT\] port=http: "):
        load(write(tmp_path, "", "[DEFAULT]\nport = http\n"))


def test_unknown_keys_warn_with_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    load(write(tmp_path, f"[a]\nkey_id = {GOOD_KEY}\n{SECRET}colour = blue\n"))
    assert "clients.conf:4: [a] unknown key 'colour' ignored" in caplog.text


def test_mandosd_exits_with_one_line_on_bad_config(tmp_path: Path) -> None:
    conf = write(tmp_path / "c", f"[a]\nkey_id = {GOOD_KEY}\n{SECRET}interval = often\n")
    p = subprocess.run([sys.executable, "-m", "mandosd", "--configdir", str(conf),
                        "--statedir", str(tmp_path / "s"), "--listen", "127.0.0.1:0"],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0
    assert "[a] interval=often: not a duration" in p.stderr
    assert "Traceback" not in p.stderr


def test_check_config(tmp_path: Path) -> None:
    conf = write(tmp_path / "c", f"[a]\nkey_id = {GOOD_KEY}\n{SECRET}")
    p = subprocess.run([sys.executable, "-m", "mandosd", "--configdir", str(conf),
                        "--check-config"], capture_output=True, text=True)
    assert p.returncode == 0 and "1 clients" in p.stdout
