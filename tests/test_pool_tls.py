"""The pool's database over TLS when the URL asks for it (issue 14), for real.

A PostgreSQL 15 of the tests listens on 127.0.0.1 with TLS 1.3 only and a
certificate from a throw-away CA; plain TCP is rejected by its pg_hba.conf.
mandosd with ``sslmode=verify-full&sslrootcert=CA`` serves, and its sessions
are seen encrypted in ``pg_stat_ssl``; with another CA it refuses
(``state-unavailable``) rather than talk to a database it cannot verify.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests import pglib
from tests.helpers import PASSWORD, fetch


def _ca(name: str) -> tuple[object, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (key, cert), cert.public_bytes(serialization.Encoding.PEM)


def _server_cert(ca: object) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key, ca_cert = ca  # type: ignore[misc]
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[pglib.Postgres, str, Path]]:
    """A PostgreSQL with TLS on 127.0.0.1; (server, TCP URL start, the CA's file)."""
    why = pglib.available()
    if why:
        pytest.skip(why)
    ca, ca_pem = _ca("pool test CA")
    cert, key = _server_cert(ca)
    server = pglib.Postgres()
    tcp = server.serve_tls(cert, key)
    server.start()
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca_file.write_bytes(ca_pem)
    try:
        yield server, tcp, ca_file
    finally:
        server.destroy()


def test_mandosd_reaches_the_database_over_verified_tls(
        tmp_path: Path, tls_pg: tuple[pglib.Postgres, str, Path], client_keys: Path,
        client_section: str) -> None:
    import psycopg

    server, tcp, ca_file = tls_pg
    server.create_database("tlspool")
    url = f"{tcp}/tlspool?sslmode=verify-full&sslrootcert={ca_file}"
    with ExitStack() as stack:
        srv = pglib.servers(tmp_path, url, [[client_section]], stack)[0]
        assert fetch(client_keys, srv.address).stdout == PASSWORD, srv.log()
        with psycopg.connect(server.url("tlspool")) as conn:  # the Unix socket: no TLS
            rows = conn.execute(
                "SELECT a.application_name, s.ssl, s.version FROM pg_stat_activity a"
                " JOIN pg_stat_ssl s USING (pid) WHERE a.client_addr IS NOT NULL").fetchall()
    assert any(name.startswith("mandosd") for name, _, _ in rows), rows
    assert all(ssl and version == "TLSv1.3" for _, ssl, version in rows), rows
    # and the same database without TLS is turned away (pg_hba.conf): TLS was not optional
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"{tcp}/tlspool?sslmode=disable", connect_timeout=5).close()


def test_a_database_that_cannot_prove_itself_gets_nothing(
        tmp_path: Path, tls_pg: tuple[pglib.Postgres, str, Path], client_keys: Path,
        client_section: str) -> None:
    """Another CA (a man in the middle, or a wrong sslrootcert): refused, said, no URL."""
    server, tcp, _ = tls_pg
    server.create_database("tlswrong")
    _, other_pem = _ca("someone else")
    other = tmp_path / "other-ca.pem"
    other.write_bytes(other_pem)
    url = f"{tcp}/tlswrong?sslmode=verify-full&sslrootcert={other}"
    with ExitStack() as stack:
        srv = pglib.servers(tmp_path, url, [[client_section]], stack)[0]
        assert fetch(client_keys, srv.address).stdout == b""
        log = srv.log()
    assert "MANDOS_REASON=state-unavailable" in log
    assert "certificate verify failed" in log, log
    assert str(other) not in log and "sslrootcert" not in log
