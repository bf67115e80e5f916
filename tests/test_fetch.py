"""Protocol 1 end to end: real mandos-keygen, real mandosd, real TLS, real gpg."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mandos_core.keyfiles import KeyFiles
from mandosd.state import SQLiteStore
from password_agent.client import parse_server
from tests.helpers import (
    PASSWORD,
    Mandosd,
    enroll,
    fetch,
    free_port,
    have,
    listening,
    make_keys,
    raw_fetch,
    secret_forms,
    wait_for,
)
from tests.tlspeers import exchange


def assert_no_secret(text: str, section: str) -> None:
    for form in secret_forms(section):
        assert form.decode(errors="replace") not in text


def test_round_trip_ipv4(mandosd: Mandosd, client_keys: Path, client_section: str) -> None:
    p = fetch(client_keys, mandosd.address)
    assert p.returncode == 0, p.stderr
    assert p.stdout == PASSWORD
    assert "sent secret to client1" in mandosd.log()
    assert "MANDOS_OUTCOME=secret-sent" in mandosd.log()
    assert_no_secret(mandosd.log() + p.stderr.decode(), client_section)


def test_round_trip_ipv6_and_state_recorded(tmp_path: Path, client_keys: Path,
                                            client_section: str) -> None:
    port = free_port(socket.AF_INET6)
    with Mandosd(tmp_path, sections=[client_section], listen=[f"[::1]:{port}"]) as srv:
        t0 = time.time()
        p = fetch(client_keys, f"[::1]:{port}")
        assert p.returncode == 0 and p.stdout == PASSWORD, p.stderr
    store = SQLiteStore(srv.statedir)
    st = store.get("client1")
    assert st is not None and st.last_secret_sent is not None and st.last_secret_sent >= t0
    # a secret handed out extends the deadline to now + extended_timeout (15 min)
    assert st.deadline is not None and st.deadline >= t0 + 14 * 60
    assert oct(srv.statedir.stat().st_mode & 0o777) == "0o700"
    assert oct((srv.statedir / "clients.sqlite").stat().st_mode & 0o777) == "0o600"


def test_socket_activation_ipv4_and_ipv6(tmp_path: Path, client_keys: Path,
                                         client_section: str) -> None:
    if not have("systemd-socket-activate"):
        pytest.skip("systemd-socket-activate not installed")
    p4, p6 = free_port(), free_port(socket.AF_INET6)
    srv = Mandosd(tmp_path, sections=[client_section], listen=[])
    argv = ["systemd-socket-activate", "-l", f"127.0.0.1:{p4}", "-l", f"[::1]:{p6}",
            sys.executable, "-m", "mandosd", "--configdir", str(srv.configdir),
            "--statedir", str(srv.statedir), "--debug"]
    log = srv.logfile.open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        # systemd-socket-activate binds, then execs on the first connection
        wait_for(lambda: listening(p4) and listening(p6), 10, "the activation sockets")
        for addr in (f"127.0.0.1:{p4}", f"[::1]:{p6}"):
            r = fetch(client_keys, addr)
            assert r.returncode == 0 and r.stdout == PASSWORD, (r.stderr, srv.log())
        assert f"127.0.0.1:{p4}, [::1]:{p6}" in srv.log()
    finally:
        proc.terminate()
        proc.wait(10)


def test_debian_mandos_keygen_keys_work(tmp_path: Path) -> None:
    """Keys and the clients.conf section from Debian's real mandos-keygen."""
    keygen = "/usr/sbin/mandos-keygen"
    if not Path(keygen).exists():
        pytest.skip("Debian's mandos-keygen (package mandos) not installed")
    keydir = tmp_path / "keys"
    keydir.mkdir(mode=0o700)
    subprocess.run([keygen, "--dir", str(keydir), "--length", "2048", "--sublength", "2048",
                    "--name", "deb1"], check=True, capture_output=True)
    assert not (keydir / "tls-cert.pem").exists()
    pwfile = tmp_path / "pw"
    pwfile.write_bytes(b"debian-made")
    section = subprocess.run([keygen, "--dir", str(keydir), "--name", "deb1", "--passfile",
                              str(pwfile), "--no-ssh"], check=True, capture_output=True,
                             text=True).stdout
    with Mandosd(tmp_path / "srv", sections=[section]) as srv:
        p = fetch(keydir, srv.address)
        assert p.returncode == 0, p.stderr
        assert p.stdout == b"debian-made"


def test_our_keys_work_with_debian_keygen_enrollment(tmp_path: Path, client_keys: Path) -> None:
    keygen = "/usr/sbin/mandos-keygen"
    if not Path(keygen).exists():
        pytest.skip("Debian's mandos-keygen (package mandos) not installed")
    keydir = tmp_path / "keys"
    shutil.copytree(client_keys, keydir)
    pwfile = tmp_path / "pw"
    pwfile.write_bytes(b"made by debian for our keys")
    section = subprocess.run([keygen, "--dir", str(keydir), "--name", "ours", "--passfile",
                              str(pwfile), "--no-ssh"], check=True, capture_output=True,
                             text=True).stdout
    with Mandosd(tmp_path / "srv", sections=[section]) as srv:
        p = fetch(keydir, srv.address)
        assert p.returncode == 0 and p.stdout == b"made by debian for our keys", p.stderr


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    keydir = make_keys(tmp_path / "k", "x")
    before = (keydir / "tls-privkey.pem").read_bytes()
    p = subprocess.run([sys.executable, "-m", "mandos_keygen", "--dir", str(keydir)],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "--force" in p.stderr
    assert (keydir / "tls-privkey.pem").read_bytes() == before
    assert oct(keydir.stat().st_mode & 0o777) == "0o700"
    for f in keydir.iterdir():
        assert oct(f.stat().st_mode & 0o777) == "0o600", f


# -- refusals: zero bytes on the wire, the reason in the audit log --------------------------

def test_refused_unknown_key(mandosd: Mandosd, tmp_path: Path, client_section: str) -> None:
    other = make_keys(tmp_path / "other", "stranger")
    assert raw_fetch(other, mandosd.address) == b""
    p = fetch(other, mandosd.address)
    assert p.returncode == 1 and b"refused" in p.stderr
    assert "MANDOS_OUTCOME=refused-unknown" in mandosd.log()
    assert KeyFiles.from_dir(other).key_id() in mandosd.log()
    assert_no_secret(mandosd.log(), client_section)


@pytest.mark.parametrize("change,outcome", [
    ({"enabled": False}, "refused-disabled"),
    ({"deadline": 1.0}, "refused-timed-out"),
])
def test_refused_disabled_and_expired(tmp_path: Path, client_keys: Path, client_section: str,
                                      change: dict, outcome: str) -> None:
    with Mandosd(tmp_path, sections=[client_section]) as srv:
        assert fetch(client_keys, srv.address).returncode == 0
        store = SQLiteStore(srv.statedir)
        store.update("client1", **change)  # as mandos-ctl would, while the server runs
        assert raw_fetch(client_keys, srv.address) == b""
        p = fetch(client_keys, srv.address)
        assert p.returncode == 1 and p.stdout == b""
        # a passed deadline: the request or the standalone checker pass disables it first
        alike = {"refused-timed-out": ("refused-timed-out", "refused-disabled")}
        wait_for(lambda: any(f"MANDOS_OUTCOME={o}" in srv.log()
                             for o in alike.get(outcome, (outcome,))), 10, outcome)
        assert_no_secret(srv.log(), client_section)
        state = store.get("client1")
        assert state is not None and not state.enabled  # a passed deadline disables


def test_config_change_is_picked_up_without_restart(tmp_path: Path, client_keys: Path,
                                                    client_section: str) -> None:
    with Mandosd(tmp_path, sections=[]) as srv:
        assert fetch(client_keys, srv.address).returncode == 1
        srv.sections = [client_section]
        srv.write_config()
        p = fetch(client_keys, srv.address)
        assert p.returncode == 0 and p.stdout == PASSWORD


def test_unreachable_server_is_bounded(client_keys: Path) -> None:
    t0 = time.monotonic()
    p = fetch(client_keys, f"127.0.0.1:{free_port()}", timeout=2)
    assert p.returncode == 1 and b"refused" in p.stderr.lower()
    assert time.monotonic() - t0 < 10


# -- hostile peers ----------------------------------------------------------------------------

def hostile(address: str, payload: bytes, *, hold: float = 0) -> bytes:
    srv = parse_server(address)
    with socket.create_connection((srv.host, srv.port), timeout=5) as s:
        if payload:
            s.sendall(payload)
        time.sleep(hold)  # not a wait: the peer holds its half-sent line this long
        s.settimeout(5)
        try:
            return s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            return b""


def hostile_server(tmp_path: Path, section: str) -> Mandosd:
    return Mandosd(tmp_path, sections=[section], extra_args=["--peer-timeout", "1"])


@pytest.mark.parametrize("payload,reason", [
    (b"", "version-timeout"),
    (b"2\r\n", "bad-version-line"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad-version-line"),
    (os.urandom(64).replace(b"\n", b"x"), "bad-version-line"),
    (b"1\r\n" + os.urandom(300), "bad-version-line"),
    (b"1\r\n", "tls-handshake"),  # version line, then silence instead of TLS
])
def test_hostile_peers_dropped(tmp_path: Path, client_keys: Path, client_section: str,
                               payload: bytes, reason: str) -> None:
    with hostile_server(tmp_path, client_section) as srv:
        got = hostile(srv.address, payload)
        # the server never answers anything but TLS; at most a TLS ClientHello
        assert got == b"" or got[:1] == b"\x16"
        srv.wait_log(f"MANDOS_REASON={reason}")
        assert fetch(client_keys, srv.address).stdout == PASSWORD


def test_garbage_instead_of_tls(tmp_path: Path, client_keys: Path, client_section: str) -> None:
    with hostile_server(tmp_path, client_section) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(b"1\r\n")
        assert s.recv(5)[:1] == b"\x16"  # the server's ClientHello
        s.sendall(os.urandom(2000))
        s.close()
        srv.wait_log("MANDOS_REASON=tls-handshake")
        assert fetch(client_keys, srv.address).stdout == PASSWORD


def test_tls12_peer_refused(tmp_path: Path, client_keys: Path, client_section: str) -> None:
    """A client machine that will only speak TLS 1.2 gets nothing; the audit says why."""
    with hostile_server(tmp_path, client_section) as srv:
        r = exchange(client_keys, srv.address,
                     priority="SECURE128:+CTYPE-RAWPK:!CTYPE-X.509:-VERS-ALL:+VERS-TLS1.2")
        assert r.data == b"" and r.error is not None
        srv.wait_log("MANDOS_REASON=tls-handshake")
        assert "sent secret" not in srv.log()


def test_stalling_peers_do_not_block_others(tmp_path: Path, client_keys: Path,
                                            client_section: str) -> None:
    """50 peers that connect and stall; a real client is served at once meanwhile."""
    with hostile_server(tmp_path, client_section) as srv:
        stallers = []
        for i in range(50):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            if i % 2:
                s.sendall(b"1")  # one byte, then nothing
            stallers.append(s)
        t0 = time.monotonic()
        p = fetch(client_keys, srv.address)
        elapsed = time.monotonic() - t0
        assert p.stdout == PASSWORD
        assert elapsed < 1.0 + 3  # served before the stallers' 1 s timeout would free anything
        for s in stallers:
            s.close()


def test_slow_loris_dropped_after_timeout(tmp_path: Path, client_section: str) -> None:
    with hostile_server(tmp_path, client_section) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        stop = threading.Event()

        def dribble() -> None:
            for b in b"1\r":
                if stop.is_set():
                    return
                try:
                    s.send(bytes([b]))
                except OSError:
                    return
                time.sleep(0.8)  # not a wait: a slow-loris peer's pace

        t = threading.Thread(target=dribble)
        t.start()
        s.settimeout(5)
        t0 = time.monotonic()
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 4
        stop.set()
        t.join()
        s.close()


def test_second_client_enrolled(tmp_path: Path, client_keys: Path, client_section: str) -> None:
    other = make_keys(tmp_path / "k2", "client2")
    section2 = enroll(other, b"second", "client2")
    with Mandosd(tmp_path / "s", sections=[client_section, section2]) as srv:
        assert fetch(other, srv.address).stdout == b"second"
        assert fetch(client_keys, srv.address).stdout == PASSWORD
