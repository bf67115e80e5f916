"""Mandos's own ssh-keyscan checker line, written by Debian's mandos-keygen, run without a shell.

A real ``sshd`` runs on port 22 in a network namespace the test makes, with a
host key the test makes.  Debian's ``/usr/sbin/mandos-keygen --password``, run
inside that namespace, scans it (``ssh-keyscan localhost``, as it does on a real
client) and prints the clients.conf section with its ``checker = ssh-keyscan ...
| grep ...`` line and ``ssh_fingerprint``.  That section, unchanged, keeps its
client alive across checker passes; after sshd's host key changes the checker
fails, and once the timeout has passed the client is disabled.  At every step
the result is compared with what Mandos gets: the same line run through
``/bin/sh -c`` with the attributes shell-quoted, as Mandos's server runs it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mandosd.checker import run_pass
from mandosd.config import Client, load_clients
from mandosd.state import SQLiteStore
from tests.helpers import have, make_keys, veth_netns

KEYGEN = "/usr/sbin/mandos-keygen"
SSHD = "/usr/sbin/sshd"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not have("ip"),
                       reason="needs root and iproute2 for a network namespace"),
    pytest.mark.skipif(not Path(SSHD).exists() or not have("ssh-keyscan"),
                       reason="openssh-server not installed"),
    pytest.mark.skipif(not Path(KEYGEN).exists(),
                       reason="Debian's mandos-keygen (package mandos-client) not installed"),
]


@dataclass
class Sshd:
    ns: str
    addr: str
    base: Path
    proc: subprocess.Popen[str] | None = None

    def start(self, key: Path) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, SSHD, "-D", "-e", "-f", "/dev/null", "-h", str(key),
             "-o", "ListenAddress=0.0.0.0:22", "-o", "PidFile=none", "-o", "UsePAM=no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        assert self.proc.stderr is not None
        seen = []
        for line in self.proc.stderr:  # ready when it says it listens
            seen.append(line)
            if "Server listening on 0.0.0.0 port 22" in line:
                return
        raise AssertionError("sshd did not start: " + "".join(seen))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def new_host_key(self, name: str) -> Path:
        key = self.base / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "256", "-N", "", "-f",
                        str(key)], check=True, capture_output=True)
        return key


@pytest.fixture()
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    with veth_netns("mks") as (ns, addr):
        s = Sshd(ns, addr, tmp_path)
        s.start(s.new_host_key("host-key-1"))
        try:
            yield s
        finally:
            s.stop()


def debian_section(tmp_path: Path, sshd: Sshd) -> str:
    """The section Debian's mandos-keygen prints on the client, which is inside the namespace."""
    keydir = make_keys(tmp_path / "keys", sshd.addr)
    pw = tmp_path / "pw"
    pw.write_bytes(b"kept alive by ssh")
    p = subprocess.run(["ip", "netns", "exec", sshd.ns, KEYGEN, "--dir", str(keydir),
                        "--passfile", str(pw), "--name", sshd.addr],
                       capture_output=True, text=True, check=True)
    return p.stdout


def mandos_verdict(client: Client) -> int:
    """What Mandos's server gets: the checker through /bin/sh -c, attributes shell-quoted."""
    quoted = {k: shlex.quote(str(v)) for k, v in client.attributes.items()}
    return subprocess.run(["/bin/sh", "-c", client.checker % quoted],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60).returncode


def test_debian_keygen_ssh_checker_keeps_client_alive_until_host_key_changes(
        tmp_path: Path, sshd: Sshd) -> None:
    section = debian_section(tmp_path, sshd)
    assert "checker = ssh-keyscan -t " in section and "| grep --fixed-strings" in section
    assert "\nssh_fingerprint = ecdsa-sha2-nistp256 " in section
    confdir = tmp_path / "conf"
    confdir.mkdir()
    (confdir / "clients.conf").write_text(section)
    (confdir / "clients.conf").chmod(0o600)
    clients = load_clients(confdir / "clients.conf", confdir)
    (name,) = clients
    client = clients[name]
    now = [time.time()]
    store = SQLiteStore(tmp_path / "state", durable=False)
    store.sync_clients(clients.values(), now[0])

    def check() -> int:
        r = run_pass(store, clients, confdir, clock=lambda: now[0])
        assert r.checked == 1, r.summary()
        st = store.get(name)
        assert st is not None and st.last_checker_status is not None
        return st.last_checker_status

    # alive across passes, each an interval apart; Mandos agrees
    for _ in range(3):
        assert check() == 0 == mandos_verdict(client)
        st = store.get(name)
        assert st is not None and st.enabled and st.deadline == pytest.approx(
            now[0] + client.timeout)
        now[0] += client.interval
    kept_until = store.get(name).deadline  # type: ignore[union-attr]

    # another host answers on that address: a new host key
    sshd.stop()
    sshd.start(sshd.new_host_key("host-key-2"))
    assert check() == 1 == mandos_verdict(client)
    st = store.get(name)
    assert st is not None and st.enabled and st.deadline == kept_until

    # the timeout passes without a good check: disabled, as Mandos would
    now[0] = kept_until + 1
    r = run_pass(store, clients, confdir, clock=lambda: now[0])
    assert r.disabled == [name]
    st = store.get(name)
    assert st is not None and not st.enabled
    store.close()


def test_unreachable_host_fails_like_mandos(tmp_path: Path, sshd: Sshd) -> None:
    section = debian_section(tmp_path, sshd)
    sshd.stop()
    confdir = tmp_path / "conf"
    confdir.mkdir()
    (confdir / "clients.conf").write_text(section)
    (confdir / "clients.conf").chmod(0o600)
    clients = load_clients(confdir / "clients.conf", confdir)
    store = SQLiteStore(tmp_path / "state", durable=False)
    store.sync_clients(clients.values(), time.time())
    r = run_pass(store, clients, confdir)
    (client,) = clients.values()
    st = store.get(client.name)
    assert r.failed == 1 and st is not None and st.last_checker_status == 1
    assert mandos_verdict(client) == 1
    store.close()
