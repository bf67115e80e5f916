"""Mandos 1.8 on the wire, both ways, proven with Debian's own binaries.

- Debian's ``mandos-client`` (RFC 7250 raw public key through GnuTLS) fetches
  from mandosd over IPv4 and IPv6, and gets zero bytes when refused.
- Our ``mandos-client`` and our agent fetch from Debian's ``/usr/sbin/mandos``.
- Keys from Debian's ``mandos-keygen`` and from ours work against both servers.
- A mixed herd (Debian's clients, ours, and X.509 clients enrolled before raw
  keys) against one mandosd, all at once.
- Hostile handshakes, each refused with zero bytes and its own audit reason.
- GnuTLS objects are freed: no growth over 10,000 handshakes.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mandos_core import gnutls, tls
from mandos_core.keyfiles import KeyFiles
from mandosd.state import SQLiteStore
from tests.debianlib import (
    debian_client,
    debian_client_refused,
    debian_keys,
    debian_mandos,
    debian_section,
    have_debian_mandos,
)
from tests.helpers import PASSWORD, Mandosd, enroll, fetch, free_port, make_keys, tool
from tests.tlspeers import exchange, legacy_fetch

needs_mandos = pytest.mark.skipif(not have_debian_mandos(),
                                  reason="Debian's mandos and mandos-client not installed")


@pytest.fixture(scope="module")
def deb_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return debian_keys(tmp_path_factory.mktemp("deb") / "keys")


# -- Debian's mandos-client against mandosd --------------------------------------------------


@needs_mandos
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_debian_client_fetches_from_mandosd(tmp_path: Path, deb_keys: Path, v6: bool) -> None:
    section = debian_section(deb_keys, PASSWORD, "debclient",
                             host="::1" if v6 else "127.0.0.1")
    listen = [f"[::1]:{free_port(socket.AF_INET6)}"] if v6 else None
    with Mandosd(tmp_path / "srv", sections=[section], listen=listen) as srv:
        p = debian_client(deb_keys, srv.address)
        assert p.returncode == 0, p.stderr.decode() + srv.log()[-2000:]
        assert p.stdout == PASSWORD
        log = srv.wait_log("MANDOS_OUTCOME=secret-sent")
        assert "MANDOS_CERT_TYPE=raw-public-key" in log
        assert KeyFiles.from_dir(deb_keys).key_id() in log


@needs_mandos
def test_debian_client_refused_gets_nothing(tmp_path: Path, deb_keys: Path,
                                            client_section: str) -> None:
    """Unknown and disabled: Debian's client gets zero bytes; the audit says which."""
    section = debian_section(deb_keys, PASSWORD, "debclient")
    with Mandosd(tmp_path / "srv", sections=[client_section]) as srv:
        out = debian_client_refused(deb_keys, srv.address,
                                    lambda: "MANDOS_OUTCOME=refused-unknown" in srv.log())
        assert out == b""
        srv.wait_log("MANDOS_OUTCOME=refused-unknown")
    with Mandosd(tmp_path / "srv2", sections=[section]) as srv:
        SQLiteStore(srv.statedir).update("debclient", enabled=False)
        out = debian_client_refused(deb_keys, srv.address,
                                    lambda: "MANDOS_OUTCOME=refused-disabled" in srv.log())
        assert out == b""
        log = srv.wait_log("MANDOS_OUTCOME=refused-disabled")
        assert "MANDOS_CLIENT=debclient" in log and "secret-sent" not in log


# -- our clients against Debian's Mandos server ----------------------------------------------


@needs_mandos
def test_our_client_fetches_from_debian_mandos(tmp_path: Path, client_keys: Path,
                                               deb_keys: Path) -> None:
    """Keys from our keygen and from Debian's, our mandos-client, Debian's server."""
    ours = enroll(client_keys, PASSWORD, "ourclient", host="::1")
    theirs = debian_section(deb_keys, b"their passphrase", "debclient", host="::1")
    with debian_mandos(ours + "\n" + theirs) as mandos:
        p = fetch(client_keys, mandos.address)
        assert p.returncode == 0, p.stderr.decode() + mandos.log()[-2000:]
        assert p.stdout == PASSWORD
        p = fetch(deb_keys, mandos.address)
        assert p.returncode == 0, p.stderr.decode() + mandos.log()[-2000:]
        assert p.stdout == b"their passphrase"
        # a stranger gets nothing from Debian's server either
        stranger = make_keys(tmp_path / "stranger", "stranger")
        p = fetch(stranger, mandos.address)
        assert p.returncode == 1 and p.stdout == b""


@needs_mandos
def test_our_agent_answers_from_debian_mandos(tmp_path: Path, client_keys: Path) -> None:
    """The agent answers the real systemd-ask-password with a secret from Debian's Mandos."""
    from tests.agentlib import AgentProc, ask, remove_questions, unique_prefix

    if os.geteuid() != 0:
        pytest.skip("systemd's askers only accept answers from root")
    section = enroll(client_keys, PASSWORD, "ourclient", host="::1")
    prefix = unique_prefix()
    try:
        with debian_mandos(section) as mandos, \
                AgentProc(tmp_path, client_keys, [mandos.address], id_prefix=prefix) as agent:
            p = ask(prefix + "x")
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode() + agent.log()
            assert out == PASSWORD + b"\n"
            assert f"MANDOS_SERVER={mandos.address}" in agent.wait_log("answered question")
    finally:
        remove_questions(prefix)


# -- a mixed herd ----------------------------------------------------------------------------


@needs_mandos
def test_mixed_herd_all_served(tmp_path: Path, client_keys: Path, client_section: str) -> None:
    """Debian's mandos-client, ours and X.509 clients at the same moment, one mandosd."""
    n = 12
    deb = [debian_keys(tmp_path / f"deb{i}") for i in range(n)]
    sections = [client_section] + [debian_section(k, f"deb-{i}".encode(), f"deb{i}")
                                   for i, k in enumerate(deb)]
    with Mandosd(tmp_path / "srv", sections=sections) as srv:
        jobs = ([("debian", i) for i in range(n)] + [("ours", i) for i in range(n)]
                + [("x509", i) for i in range(n)])

        def one(job: tuple[str, int]) -> bytes:
            kind, i = job
            if kind == "debian":
                return debian_client(deb[i], srv.address, timeout=60).stdout
            if kind == "ours":
                return fetch(client_keys, srv.address, timeout=60).stdout
            return legacy_fetch(client_keys, srv.address, timeout=60)

        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(one, jobs))
        for (kind, i), data in zip(jobs, got, strict=True):
            want = f"deb-{i}".encode() if kind == "debian" else PASSWORD
            if kind == "x509":
                assert data != b"", f"{kind} {i} got nothing"  # ciphertext, not decrypted
            else:
                assert data == want, f"{kind} {i}: {data!r}"
        log = srv.log()
        assert log.count("MANDOS_OUTCOME=secret-sent") == 3 * n
        assert log.count("MANDOS_CERT_TYPE=x509") == n
        assert log.count("MANDOS_CERT_TYPE=raw-public-key") == 2 * n


# -- hostile handshakes ----------------------------------------------------------------------


def test_attack_raw_key_of_a_type_we_do_not_accept(tmp_path: Path, client_section: str) -> None:
    """An RSA raw key (the handshake itself is valid) is refused: zero bytes, its reason."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    spki_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    with Mandosd(tmp_path / "srv", sections=[client_section]) as srv:
        r = exchange(tmp_path, srv.address, spki_pem=spki_pem, key_pem=key_pem)
        assert r.error is None and r.data == b""
        log = srv.wait_log("MANDOS_REASON=unsupported-key-type")
        assert "secret-sent" not in log


def test_attack_garbage_certificate(tmp_path: Path, client_keys: Path,
                                    client_section: str) -> None:
    """A Certificate message carrying garbage instead of DER: refused during the handshake."""
    tlslite = pytest.importorskip("tlslite", reason="tlslite-ng not installed")
    from tlslite.utils.keyfactory import parsePEMKey

    from tests.tlspeers import self_signed_cert

    x509 = tlslite.X509()
    x509.parse(self_signed_cert(client_keys).decode())
    x509.bytes = bytearray(os.urandom(len(x509.bytes)))  # what goes on the wire
    settings = tlslite.HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    with Mandosd(tmp_path / "srv", sections=[client_section]) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"1\r\n")
            conn = tlslite.TLSConnection(s)
            with pytest.raises(Exception):  # noqa: B017 - the server aborts; we check why below
                conn.handshakeServer(
                    certChain=tlslite.X509CertChain([x509]), settings=settings,
                    privateKey=parsePEMKey((client_keys / "tls-privkey.pem").read_text(),
                                           private=True))
                assert conn.read() == b""
        log = srv.wait_log("MANDOS_REASON=tls-handshake")
        assert "MANDOS_TLS_ERROR=" in log and "secret-sent" not in log


def test_priority_from_mandos_conf_is_honoured(tmp_path: Path, client_keys: Path,
                                               client_section: str) -> None:
    """Mandos's own priority string (raw keys only) refuses X.509 clients; a bad one is
    a clear error at start."""
    mandos_default = ("SECURE128:!CTYPE-X.509:+CTYPE-RAWPK:!RSA:!VERS-ALL:+VERS-TLS1.3"
                      ":%PROFILE_ULTRA")
    srv = Mandosd(tmp_path / "srv", sections=[client_section])
    # mandos.conf is read with interpolation, in Mandos as here: a literal % is written %%
    (srv.configdir / "mandos.conf").write_text(
        f"[DEFAULT]\npriority = {mandos_default.replace('%', '%%')}\n")
    with srv:
        assert fetch(client_keys, srv.address).stdout == PASSWORD
        assert legacy_fetch(client_keys, srv.address) == b""
        srv.wait_log("MANDOS_REASON=certificate-type-not-allowed")
    bad = Mandosd(tmp_path / "bad", sections=[client_section])
    (bad.configdir / "mandos.conf").write_text("[DEFAULT]\npriority = SECURE128:+NO-SUCH-THING\n")
    p = subprocess.run(bad.argv() + ["--check-config"], capture_output=True, text=True)
    assert p.returncode == 1
    assert "priority" in p.stderr and "NO-SUCH-THING" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(bad.argv(), capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "priority" in p.stderr and "NO-SUCH-THING" in p.stderr and "Traceback" not in p.stderr


# -- no leaks ---------------------------------------------------------------------------------


def _pair_handshake(cred_srv: gnutls.Credentials, cred_cli: gnutls.Credentials,
                    prio_srv: str, prio_cli: str) -> str:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        with gnutls.Session(a.fileno(), server=True, credentials=cred_cli, priority=prio_cli) as m, \
                gnutls.Session(b.fileno(), server=False, credentials=cred_srv,
                               priority=prio_srv) as k:
            done = [False, False]
            while not all(done):
                for i, s in enumerate((m, k)):
                    if not done[i]:
                        try:
                            s.handshake()
                            done[i] = True
                        except gnutls.WouldBlock:
                            pass
            return tls.peer_key(k).key_id
    finally:
        a.close()
        b.close()


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_gnutls_objects_freed_over_10000_handshakes(client_keys: Path) -> None:
    """Every session and credential is freed: memory and descriptors do not grow."""
    spki = (client_keys / "tls-pubkey.pem").read_bytes()
    key = (client_keys / "tls-privkey.pem").read_bytes()
    want = KeyFiles.from_dir(client_keys).key_id()
    prio_srv = tls.effective_priority(None, server=True)
    prio_cli = tls.effective_priority(None, server=False)

    def round_(n: int) -> None:
        for _ in range(n):
            with gnutls.Credentials() as cred_cli, gnutls.Credentials() as cred_srv:
                cred_cli.set_rawpk(spki, key)
                assert _pair_handshake(cred_srv, cred_cli, prio_srv, prio_cli) == want

    round_(500)  # warm up: allocator pools, lazily loaded GnuTLS parts
    fds = len(os.listdir("/proc/self/fd"))
    rss = _rss_kib()
    round_(10_000)
    grown = _rss_kib() - rss
    assert len(os.listdir("/proc/self/fd")) == fds
    # a leaked session is several KiB: 10,000 of them would be tens of MiB
    assert grown < 4096, f"RSS grew by {grown} KiB over 10,000 handshakes"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


# -- the key server's identity ----------------------------------------------------------------


def test_pinned_client_fetches_only_from_a_server_that_proves_the_pin(
        tmp_path: Path, client_section: str) -> None:
    """mandos-keygen --pin with the key_id `mandos-ctl identity` prints: that server serves;
    the answer of another server (an impostor with a secret for this key) is discarded."""
    keys = make_keys(tmp_path / "pinned", "client1")
    section = enroll(keys, PASSWORD, "client1", host="127.0.0.1")
    with Mandosd(tmp_path / "real", sections=[section]) as real, \
            Mandosd(tmp_path / "fake", sections=[section]) as fake:
        ident = subprocess.run([tool("mandos-ctl"), "identity", "--configdir",
                                str(real.configdir), "--statedir", str(real.statedir)],
                               capture_output=True, text=True)
        assert ident.returncode == 0, ident.stderr
        p = subprocess.run([tool("mandos-keygen"), "--dir", str(keys), "--pin",
                            ident.stdout.strip()], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert fetch(keys, real.address).stdout == PASSWORD
        p = fetch(keys, fake.address)
        assert p.returncode == 1 and p.stdout == b""
        assert b"not a pinned key server" in p.stderr
