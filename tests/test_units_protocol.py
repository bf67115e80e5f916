"""Unit tests: key_id, certificate parsing, durations, server addresses, Secret."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mandos_core.durations import DurationError, format_duration, parse_duration
from mandos_core.keyfiles import KeyFiles
from mandos_core.protocol import (
    EMPTY_KEY_ID,
    KeyIdError,
    key_id,
    normalize_key_id,
    pem_to_der,
    spki_from_certificate,
)
from mandos_core.secret import Secret
from password_agent.client import parse_server
from tests.helpers import have


def test_key_id_equals_certtool(client_keys: Path) -> None:
    if not have("certtool"):
        pytest.skip("certtool (gnutls-bin) not installed")
    out = subprocess.run(["certtool", "--key-id", "--hash=sha256", "--load-pubkey",
                          str(client_keys / "tls-pubkey.pem")],
                         capture_output=True, text=True, check=True).stdout
    theirs = out.strip().splitlines()[-1].strip().upper()
    assert KeyFiles.from_dir(client_keys).key_id() == theirs


def test_certificate_spki_matches_public_key(client_keys: Path) -> None:
    cert = pem_to_der((client_keys / "tls-cert.pem").read_bytes(), "CERTIFICATE")
    spki = pem_to_der((client_keys / "tls-pubkey.pem").read_bytes(), "PUBLIC KEY")
    assert spki_from_certificate(cert) == spki
    assert key_id(spki) == KeyFiles.from_dir(client_keys).key_id()


@pytest.mark.parametrize("text", ["", "ab", "G" * 64, EMPTY_KEY_ID, EMPTY_KEY_ID.lower()])
def test_bad_key_ids(text: str) -> None:
    with pytest.raises(KeyIdError):
        normalize_key_id(text)


def test_key_id_is_case_and_space_insensitive() -> None:
    kid = "f33fcbed11ed5e03073f6a55b86ffe92af0e24c045fb6e3b40547b3dc0c030ed"
    assert normalize_key_id(kid[:32] + " " + kid[32:]) == kid.upper()


@pytest.mark.parametrize("text,seconds", [
    ("PT5M", 300), ("5m", 300), ("1h30m", 5400), ("1h 30m", 5400), ("P1DT2H", 93600),
    ("PT0S", 0), ("1w", 604800), ("PT1.5S", 1.5), ("pt2m", 120),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "5", "m", "P", "PT", "5x", "-5m", "PT5M junk", "1e9w"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


@pytest.mark.parametrize("text,host,port", [
    ("127.0.0.1:1234", "127.0.0.1", 1234), ("[::1]:99", "::1", 99),
    ("[fe80::1%eth0]:7", "fe80::1%eth0", 7), ("keys.example:443", "keys.example", 443),
])
def test_parse_server(text: str, host: str, port: int) -> None:
    s = parse_server(text)
    assert (s.host, s.port) == (host, port)


@pytest.mark.parametrize("text", ["host", "::1:5", "[::1]", "h:0", "h:70000", "h:x", ":5"])
def test_parse_server_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_server(text)


def test_secret_is_masked() -> None:
    s = Secret(b"hunter2")
    assert "hunter2" not in repr(s) + str(s) + f"{s}" + "{}".format(s)  # noqa: UP032
    assert s.reveal() == b"hunter2"
    s.wipe()
    assert s.reveal() == b""
