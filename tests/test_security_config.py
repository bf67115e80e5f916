"""Config and state, from the attacker's (and the unlucky admin's) side.

Real mandosd, real mandos-ctl, real mandos-keygen and gpg.  Each test plays the
scenario of issue 11 that once handed a secret to a machine that should not get it:
``enabled = False`` ignored, a moved-aside or mistyped clients.conf that re-enabled a
disabled machine, a client-made section that named the server's files or commands,
secret files readable by everyone, a changed secfile never noticed.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import sqlite3
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mandosd import added, merge
from mandosd.audit import Kind
from mandosd.config import Client
from mandosd.state import ClientState, SQLiteStore
from tests.helpers import PASSWORD, Mandosd, ctl, enroll, fetch, make_keys


def rows(srv: Mandosd) -> list[tuple[object, ...]]:
    """Every stored row, as it is on disk (read-only, no mandosd code involved)."""
    db = sqlite3.connect(f"file:{srv.statedir / 'clients.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT * FROM clients ORDER BY name").fetchall()
    finally:
        db.close()


def secret_of(section: str) -> bytes:
    """The binary OpenPGP message of a section printed by mandos-keygen."""
    m = re.search(r"^secret =\n((?:[ \t]+\S+\n)+)", section, re.M)
    assert m, section
    return base64.b64decode("".join(m.group(1).split()))


def without_secret(section: str) -> str:
    return re.sub(r"^secret =\n(?:[ \t]+\S+\n)+", "", section, flags=re.M)


@pytest.fixture()
def server(tmp_path: Path, client_section: str) -> Iterator[Mandosd]:
    with Mandosd(tmp_path / "srv", sections=[client_section]) as srv:
        yield srv


# -- item 3: a value changed in clients.conf wins over stored state ---------------

def test_enabled_false_written_to_clients_conf_disables_a_running_client(
        server: Mandosd, client_keys: Path, client_section: str) -> None:
    assert fetch(client_keys, server.address).stdout == PASSWORD
    server.sections = [client_section + "enabled = False\n"]
    server.write_config()
    assert fetch(client_keys, server.address).stdout == b""
    log = server.log()
    assert "MANDOS_OUTCOME=config-changed" in log and "MANDOS_CHANGE=enabled" in log
    assert "client1 disabled: enabled = False in clients.conf" in log
    assert "MANDOS_OUTCOME=refused-disabled" in log
    assert ctl(server, "-V", "client1").returncode == 1


def test_changed_value_wins_unchanged_value_leaves_state_alone(
        server: Mandosd, client_keys: Path, client_section: str) -> None:
    # the admin disables by mandos-ctl, then edits something else in clients.conf
    assert ctl(server, "--disable", "client1").returncode == 0
    assert ctl(server, "--timeout", "PT10M", "client1").returncode == 0
    server.sections = [client_section + "interval = PT1M\n"]
    server.write_config()
    assert fetch(client_keys, server.address).stdout == b""   # enabled: unchanged, stays off
    p = ctl(server, "-j", "client1")
    assert '"Timeout": 600000' in p.stdout and '"Interval": 60000' in p.stdout
    # a timeout written to clients.conf replaces the one set with mandos-ctl
    server.sections = [client_section + "interval = PT1M\ntimeout = PT20M\n"]
    server.write_config()
    enable = ctl(server, "-e", "client1")   # mandos-ctl merges the file before its change
    assert enable.returncode == 0
    assert fetch(client_keys, server.address).stdout == PASSWORD
    assert '"Timeout": 1200000' in ctl(server, "-j", "client1").stdout
    assert "client1: timeout changed in clients.conf" in enable.stderr + server.log()
    assert "replaces the value set with mandos-ctl" in enable.stderr + server.log()


def test_enabled_false_written_while_the_server_is_stopped(
        server: Mandosd, client_keys: Path, client_section: str) -> None:
    server.stop()
    server.sections = [client_section + "enabled = no\n"]
    server.write_config()
    server.logfile.unlink()
    server.start()
    assert fetch(client_keys, server.address).stdout == b""
    assert "MANDOS_OUTCOME=refused-disabled" in server.log()


# -- item 15: a missing or mistyped clients.conf never re-enables a machine ----------

def test_clients_conf_moved_aside_keeps_a_disabled_client_disabled(
        server: Mandosd, client_keys: Path) -> None:
    assert ctl(server, "--disable", "client1").returncode == 0
    conf = server.configdir / "clients.conf"
    aside = server.configdir / "clients.conf.away"
    before = rows(server)
    conf.rename(aside)
    assert fetch(client_keys, server.address).stdout == b""
    assert "cannot be loaded, keeping the old one" in server.log()
    listing = ctl(server)
    assert listing.returncode == 1 and listing.stderr.count("\n") == 1
    assert "clients.conf" in listing.stderr and "Traceback" not in listing.stderr
    assert rows(server) == before           # nothing pruned, nothing rewritten
    aside.rename(conf)
    assert fetch(client_keys, server.address).stdout == b""   # still disabled
    assert ctl(server, "-V", "client1").returncode == 1
    assert "reloaded 0 clients" not in server.log()


def test_section_removed_then_restored_comes_back_disabled(
        server: Mandosd, client_keys: Path, client_section: str, tmp_path: Path) -> None:
    other = enroll(make_keys(tmp_path / "k2", "other"), b"x", "other", host="127.0.0.1")
    assert ctl(server, "--disable", "client1").returncode == 0
    server.sections = [other]
    server.write_config()
    assert fetch(client_keys, server.address).stdout == b""
    assert "MANDOS_OUTCOME=client-gone" in server.log()
    server.sections = [other, client_section]
    server.write_config()
    assert fetch(client_keys, server.address).stdout == b""
    assert "MANDOS_OUTCOME=client-returned" in server.log()
    assert ctl(server, "-V", "client1").returncode == 1


def test_renamed_section_keeps_the_machines_state(
        server: Mandosd, client_keys: Path, client_section: str) -> None:
    """The state follows the key: a disabled machine under a new name stays disabled."""
    assert ctl(server, "--disable", "client1").returncode == 0
    server.sections = [client_section.replace("[client1]", "[client1-new]")]
    server.write_config()
    assert fetch(client_keys, server.address).stdout == b""
    assert ctl(server, "-V", "client1-new").returncode == 1


def test_ctl_with_a_mistyped_configdir_touches_nothing(
        server: Mandosd, client_keys: Path, tmp_path: Path) -> None:
    assert ctl(server, "--disable", "client1").returncode == 0
    before = rows(server)
    for args in ([], ["-e", "client1"], ["-j"]):
        p = ctl(server, *args, configdir=tmp_path / "etc-mandso")
        assert p.returncode == 1, p
        assert p.stderr.count("\n") == 1 and "clients.conf" in p.stderr, p.stderr
    assert rows(server) == before
    assert fetch(client_keys, server.address).stdout == b""


def test_listing_does_not_write(server: Mandosd, client_section: str, tmp_path: Path) -> None:
    other = enroll(make_keys(tmp_path / "k2", "other"), b"x", "other", host="127.0.0.1")
    server.stop()
    before = rows(server)
    server.sections = [client_section, other]   # a new client the server has not seen
    server.write_config()
    p = ctl(server)
    assert p.returncode == 0 and "other" in p.stdout
    assert ctl(server, "-j").returncode == 0 and ctl(server, "-v").returncode == 0
    assert rows(server) == before


@pytest.mark.parametrize("how", ["--check-config", "serve"])
def test_missing_clients_conf_is_an_error(tmp_path: Path, how: str) -> None:
    srv = Mandosd(tmp_path / "srv")
    (srv.configdir / "clients.conf").unlink()
    argv = srv.argv() + (["--check-config"] if how == "--check-config" else [])
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1, p
    assert p.stderr.strip().count("\n") == 0 and "clients.conf" in p.stderr
    assert not (srv.statedir / "clients.sqlite").exists()


# -- item 6: mandos-ctl --add takes only what a client may say -----------------------

@pytest.fixture()
def section2(tmp_path: Path) -> tuple[Path, str]:
    keys = make_keys(tmp_path / "keys2", "client2")
    return keys, enroll(keys, b"second", "client2", host="127.0.0.1")


@pytest.mark.parametrize("extra,key", [
    ("secfile = /etc/shadow\n", "secfile"),
    ("checker = /bin/sh -c 'touch /tmp/pwned'\n", "checker"),
    ("timeout = P365D\n", "timeout"),
    ("approved_by_default = yes\n", "approved_by_default"),
    ("enabled = True\n", "enabled"),
])
def test_add_refuses_a_key_the_client_may_not_set(
        server: Mandosd, section2: tuple[Path, str], extra: str, key: str) -> None:
    _, section = section2
    text = without_secret(section).replace("checker = fping -q -- %%(host)s\n", "")
    text += extra + "secret =\n    " + base64.b64encode(secret_of(section)).decode() + "\n"
    before = rows(server)
    p = ctl(server, "--add", "-", input=text.encode())
    assert p.returncode == 1, p
    assert f"'{key}'" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert rows(server) == before


def test_add_refuses_a_default_section(server: Mandosd, section2: tuple[Path, str]) -> None:
    _, section = section2
    p = ctl(server, "--add", "-", input=("[DEFAULT]\nsecfile = /etc/shadow\n" + section).encode())
    assert p.returncode == 1 and "DEFAULT" in p.stderr, p.stderr
    assert "client2" not in ctl(server).stdout


def test_add_refuses_an_unencrypted_literal_packet(
        server: Mandosd, section2: tuple[Path, str], tmp_path: Path) -> None:
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    literal = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--store"],
                             input=b"attacker's passphrase", capture_output=True,
                             check=True).stdout
    _, section = section2
    text = (without_secret(section) + "secret =\n    "
            + base64.b64encode(literal).decode() + "\n")
    p = ctl(server, "--add", "-", input=text.encode())
    assert p.returncode == 1 and "literal data" in p.stderr, p.stderr
    p = ctl(server, "--add", "-", input=(without_secret(section) + "secret = aGVsbG8=\n").encode())
    assert p.returncode == 1 and "not an OpenPGP message" in p.stderr, p.stderr
    blob = tmp_path / "literal.pgp"
    blob.write_bytes(literal)
    p = ctl(server, "--secret", str(blob), "client1")    # nor as a replacement secret
    assert p.returncode == 1 and "literal data" in p.stderr, p.stderr


def test_added_client_gets_the_admins_defaults_and_no_temp_file(
        tmp_path: Path, client_section: str, section2: tuple[Path, str]) -> None:
    keys, section = section2
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    defaults = "[DEFAULT]\ntimeout = PT7M\nchecker = true\n"
    with Mandosd(tmp_path / "srv", sections=[defaults, client_section],
                 env={"TMPDIR": str(tmp)}) as srv:
        p = ctl(srv, "--add", "-", input=section.encode())   # keygen's own default checker
        assert p.returncode == 0, p.stderr
        j = ctl(srv, "-j", "client2").stdout
        assert '"Timeout": 420000' in j and '"Checker": "true"' in j
        stamp = tmp.stat().st_mtime_ns
        for _ in range(3):
            assert fetch(keys, srv.address).stdout == b"second"
        assert tmp.stat().st_mtime_ns == stamp and not list(tmp.iterdir())


# -- item 8: files holding secrets must be root's and private ------------------------

def test_world_readable_clients_conf_is_refused(tmp_path: Path, client_section: str) -> None:
    srv = Mandosd(tmp_path / "srv", sections=[client_section])
    conf = srv.configdir / "clients.conf"
    os.chmod(conf, 0o644)
    p = subprocess.run(srv.argv(), capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert p.stderr.strip() == (f"mandosd: {conf}: readable by group or others (mode 0644); "
                                f"it holds secrets: chmod 600 {conf}")
    p = subprocess.run([*srv.argv(), "--check-config"], capture_output=True, text=True)
    assert p.returncode == 1 and f"chmod 600 {conf}" in p.stderr
    assert ctl(srv).returncode == 1


def test_clients_conf_of_another_owner_is_refused(tmp_path: Path, client_section: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    srv = Mandosd(tmp_path / "srv", sections=[client_section])
    conf = srv.configdir / "clients.conf"
    os.chown(conf, 65534, 65534)
    p = subprocess.run([*srv.argv(), "--check-config"], capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.strip() == f"mandosd: {conf}: owned by uid 65534, not root: chown root: {conf}"


def test_readable_secfile_is_refused_and_a_changed_one_is_served(
        tmp_path: Path, client_keys: Path, client_section: str) -> None:
    secfile = tmp_path / "srv" / "conf" / "client1.pgp"
    secfile.parent.mkdir(parents=True)
    secfile.write_bytes(secret_of(client_section))
    os.chmod(secfile, 0o600)
    section = without_secret(client_section) + "secfile = client1.pgp\n"
    with Mandosd(tmp_path / "srv", sections=[section]) as srv:
        assert fetch(client_keys, srv.address).stdout == PASSWORD
        new = secret_of(enroll(client_keys, b"rotated passphrase", "client1"))
        tmp = secfile.with_suffix(".new")
        tmp.write_bytes(new)
        os.chmod(tmp, 0o600)
        tmp.replace(secfile)
        assert fetch(client_keys, srv.address).stdout == b"rotated passphrase"
        os.chmod(secfile, 0o640)
        assert fetch(client_keys, srv.address).stdout == b"rotated passphrase"  # old kept
        assert f"chmod 600 {secfile}" in srv.log()
        srv.stop()
        p = subprocess.run([*srv.argv(), "--check-config"], capture_output=True, text=True)
        assert p.returncode == 1 and f"chmod 600 {secfile}" in p.stderr


def test_mandos_conf_may_stay_readable(tmp_path: Path, client_section: str) -> None:
    srv = Mandosd(tmp_path / "srv", sections=[client_section])
    (srv.configdir / "mandos.conf").write_text("[DEFAULT]\nservicename = Mandos\n")
    os.chmod(srv.configdir / "mandos.conf", 0o644)
    p = subprocess.run([*srv.argv(), "--check-config"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


# -- issue 13: a section without key_id ----------------------------------------------

def test_section_without_key_id_is_an_error(tmp_path: Path, client_section: str) -> None:
    section = re.sub(r"^key_id = .*\n", "", client_section, flags=re.M)
    srv = Mandosd(tmp_path / "srv", sections=[section])
    p = subprocess.run([*srv.argv(), "--check-config"], capture_output=True, text=True)
    assert p.returncode == 1
    conf = srv.configdir / "clients.conf"
    assert p.stderr.strip().startswith(f"mandosd: {conf}: [client1]: no key_id"), p.stderr
    assert "configuration is valid" not in p.stdout


def test_python_m_mandosd_check_config_counts(tmp_path: Path, client_section: str) -> None:
    srv = Mandosd(tmp_path / "srv", sections=[client_section])
    p = subprocess.run([sys.executable, "-m", "mandosd", "--configdir", str(srv.configdir),
                        "--check-config"], capture_output=True, text=True)
    assert p.returncode == 0 and "(1 clients)" in p.stdout, p.stderr


def test_a_section_added_before_the_fix_cannot_name_a_secfile(
        server: Mandosd, section2: tuple[Path, str], tmp_path: Path) -> None:
    """A state store from before: a client-made section that names the server's file."""
    keys, section = section2
    loot = tmp_path / "root-only"
    loot.write_bytes(secret_of(section))
    os.chmod(loot, 0o600)
    store = SQLiteStore(server.statedir)
    kid = re.search(r"^key_id = (\S+)", section, re.M)
    assert kid
    store.add_client("client2", kid.group(1), without_secret(section)
                     + f"secfile = {loot}\n", time.time(), 300.0)
    store.close()
    assert fetch(keys, server.address).stdout == b""
    assert "key 'secfile' is not accepted" in server.log()


# -- the merge itself, as a pure function -------------------------------------------

def _client(**kw: object) -> Client:
    values: dict[str, object] = dict(
        name="web1", key_id="A" * 64, fingerprint="", secret=b"\x85pgp", host="web1",
        checker="true", timeout=300.0, interval=120.0, extended_timeout=900.0,
        approval_delay=0.0, approval_duration=1.0, approved_by_default=True, enabled=True)
    values.update(kw)
    return Client(**values)  # type: ignore[arg-type]


def _stored(c: Client, now: float) -> ClientState:
    return merge.plan([c], [], now).apply([])[0]


def test_merge_shortened_timeout_that_has_passed_disables() -> None:
    st = _stored(_client(timeout=3600.0), 0.0)            # deadline 3600
    p = merge.plan([_client(timeout=60.0)], [st], 100.0)  # deadline 3600 - 3540 = 60 < 100
    (after,) = p.apply([st])
    assert not after.enabled
    assert [e.kind for e in p.events] == [Kind.CONFIG_CHANGED, Kind.CLIENT_TIMED_OUT]


def test_merge_unchanged_writes_nothing_and_old_stores_learn_only_a_disable() -> None:
    c = _client()
    st = _stored(c, 0.0)
    p = merge.plan([c], [st], 10.0)
    assert not p.updates and not p.inserts and not p.events
    legacy = dataclasses.replace(st, config=None, overrides={"timeout": 60.0})
    p = merge.plan([_client(timeout=600.0)], [legacy], 10.0)
    (after,) = p.apply([legacy])
    assert after.enabled and after.overrides == {"timeout": 60.0} and not p.events
    p = merge.plan([_client(enabled=False)], [legacy], 10.0)
    assert not p.apply([legacy])[0].enabled and p.events[0].kind is Kind.CONFIG_CHANGED


def test_merge_secret_change_is_audited_without_the_secret() -> None:
    st = dataclasses.replace(_stored(_client(), 0.0), overrides={"secret": "eA=="})
    p = merge.plan([_client(secret=b"\x85new")], [st], 10.0)
    (after,) = p.apply([st])
    assert "secret" not in after.overrides
    assert [e.fields for e in p.events] == [{"change": "secret"}]
    assert "new" not in p.events[0].message


def _compressed(inner: bytes) -> bytes:
    body = b"\x02" + zlib.compress(inner)   # algorithm 2: ZLIB
    return bytes([0xC8, len(body)]) + body


@pytest.mark.parametrize("data,ok", [
    (b"\x85\x01\x0c" + b"\x00" * 20, True),          # old-format PKESK (Debian's keygen)
    (b"\xc1\x0c" + b"\x00" * 12, True),              # new-format PKESK
    (b"\xd2\x05\x01abcd", True),                     # SEIPD
    (b"\xac\x05b\x00\x00\x00\x00", False),           # literal data
    (_compressed(b"\xac\x05b\x00\x00\x00\x00"), False),  # literal data, compressed
    (_compressed(b"\x85\x01\x0c" + b"\x00" * 20), True),   # PKESK, compressed
    (b"hello", False),
    (b"", False),
])
def test_secret_must_be_an_encrypted_openpgp_message(data: bytes, ok: bool) -> None:
    if ok:
        added.check_encrypted(data)
    else:
        with pytest.raises(added.AddError):
            added.check_encrypted(data)
