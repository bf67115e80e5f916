"""Reading Mandos's shell checker lines without a shell (pure parsing), and the load notice.

The forms Mandos's ``mandos-keygen`` has written (with ``-t TYPE`` for each key
type it tries, without ``-t``, with ``-q``), grep's option spellings, and shell
syntax that is never run but reported once, with the rewrite to use.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mandosd.checker import run_pass
from mandosd.checker_shell import Command, KeyScan, Unsupported, matches, plan
from mandosd.config import load_clients
from mandosd.state import SQLiteStore
from tests.helpers import ROOT

FP = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBMfX="
GREP = "grep --fixed-strings --line-regexp --quiet"


@pytest.mark.parametrize("scan", [
    "ssh-keyscan -t ecdsa-sha2-nistp256 %(host)s",
    "ssh-keyscan -t ed25519 %(host)s",
    "ssh-keyscan -t rsa %(host)s",
    "ssh-keyscan %(host)s",
    "ssh-keyscan -q -t ecdsa-sha2-nistp256 %(host)s",
    "/usr/bin/ssh-keyscan -t rsa %(host)s",
])
def test_mandos_keygen_forms_are_keyscans(scan: str) -> None:
    # as clients.conf interpolation leaves mandos-keygen's line
    line = f'{scan} 2>/dev/null | {GREP} --regexp=%(host)s" {FP}"'
    p = plan(line)
    assert isinstance(p, KeyScan), p
    assert list(p.scan) == scan.split()
    assert p.patterns == (f"%(host)s {FP}",) and p.whole_line


@pytest.mark.parametrize("grep, whole", [
    (f"grep -Fxq -e '%(host)s {FP}'", True),
    (f"grep -F -x -q '%(host)s {FP}'", True),
    (f"grep -qF --regexp '%(host)s {FP}'", False),
    (f"grep --fixed-strings --silent -- '%(host)s {FP}'", False),
])
def test_grep_spellings(grep: str, whole: bool) -> None:
    p = plan(f"ssh-keyscan %(host)s 2>/dev/null | {grep}")
    assert isinstance(p, KeyScan), p
    assert p.patterns == (f"%(host)s {FP}",) and p.whole_line == whole


@pytest.mark.parametrize("line", [
    "ping -c1 %(host)s && true",
    "ssh-keyscan %(host)s | grep -v %(host)s",  # inverted: not what keygen writes
    "ssh-keyscan %(host)s | grep -x '%(host)s .*'",  # a regular expression
    "ssh-keyscan %(host)s | grep -Fx pattern /etc/passwd",  # reads a file
    "check $(hostname)",
    "check `hostname`",
    'check "$HOST"',
    "check > /tmp/out",
    "a | b | c",
    "check 'unbalanced",
])
def test_shell_syntax_is_not_run(line: str) -> None:
    p = plan(line)
    assert isinstance(p, Unsupported), p
    assert "checker = " in p.rewrite


def test_plain_commands_and_null_redirections() -> None:
    assert plan("fping -q -- %(host)s") == Command(("fping", "-q", "--", "%(host)s"))
    assert plan("check %(host)s >/dev/null 2>&1") == Command(("check", "%(host)s"))
    assert plan("check '|' \"a;b\" 'x $y'") == Command(("check", "|", "a;b", "x $y"))
    assert plan("check --to=%(name)s@%(host)s 100%%") == Command(
        ("check", "--to=%(name)s@%(host)s", "100%%"))


def test_matches_is_grep_fixed_strings() -> None:
    out = b"# 10.0.0.2:22 SSH-2.0-OpenSSH_9.2\nweb1 ssh-ed25519 AAAA\nweb1 ecdsa-sha2 BBBB\n"
    assert matches(out, ("web1 ecdsa-sha2 BBBB",), True)
    assert not matches(out, ("web1 ecdsa-sha2 BBB",), True)
    assert matches(out, ("web1 ecdsa-sha2 BBB",), False)
    assert not matches(out, ("web2 ecdsa-sha2 BBBB",), True)


def test_unsupported_checker_is_reported_once_with_its_rewrite(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "clients.conf").write_text(
        f"[web1]\nkey_id = {1:064X}\nsecret = cGdw\n"
        "checker = ping -c1 %%(host)s && echo up\ninterval = 1s\n")
    (conf / "clients.conf").chmod(0o600)
    clients = load_clients(conf / "clients.conf", conf)
    store = SQLiteStore(tmp_path / "state", durable=False)
    store.sync_clients(clients.values(), time.time())
    caplog.set_level(logging.WARNING, logger="mandosd.checker")
    now = [time.time()]
    for _ in range(3):  # three passes, as three timer runs
        r = run_pass(store, clients, conf, clock=lambda: now[0])
        assert r.failed == 1
        now[0] += 2
    notices = [r.getMessage() for r in caplog.records if "Rewrite:" in r.getMessage()]
    assert len(notices) == 1, notices
    assert "[web1]" in notices[0] and "checker = " in notices[0]
    st = store.get("web1")
    assert st is not None and st.last_checker_status == 127
    store.close()


def test_check_config_names_checkers_that_would_not_run(tmp_path: Path) -> None:
    (tmp_path / "clients.conf").write_text(
        f"[web1]\nkey_id = {1:064X}\nsecret = cGdw\nchecker = ping -c1 %%(host)s; true\n"
        f"[web2]\nkey_id = {2:064X}\nsecret = cGdw\n")
    (tmp_path / "clients.conf").chmod(0o600)
    p = subprocess.run([sys.executable, "-m", "mandosd", "--check-config", "--configdir",
                        str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "[web1]" in p.stderr and "Rewrite:" in p.stderr and "[web2]" not in p.stderr
