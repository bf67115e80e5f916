"""Fuzzing with hypothesis: every parser of outside input either returns a typed value
or raises its one typed error.  CI runs a bounded number of cases; run more by hand:

    FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mandos_core.durations import DurationError, parse_duration
from mandos_core.protocol import DERError, spki_from_certificate
from mandosd.config import ConfigError, load
from password_agent.askfile import AskFileError, parse_ask

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

ASK_KEYS = ["PID", "Socket", "NotAfter", "AcceptCached", "Echo", "Silent", "Message", "Icon",
            "Id", "Junk"]
ask_line = st.one_of(
    st.tuples(st.sampled_from(ASK_KEYS), st.text(max_size=40)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=60),
    st.just("[Ask]"),
)


@fuzz
@given(st.lists(ask_line, max_size=12), st.booleans())
def test_ask_file_parser_text(lines: list[str], header: bool) -> None:
    text = ("[Ask]\n" if header else "") + "\n".join(lines)
    try:
        parse_ask(text.encode("utf-8", "surrogatepass"), "ask.fuzz")
    except (AskFileError, UnicodeEncodeError):
        pass


@fuzz
@given(st.binary(max_size=2048))
def test_ask_file_parser_bytes(data: bytes) -> None:
    try:
        parse_ask(data, "ask.fuzz")
    except AskFileError:
        pass


@fuzz
@given(st.text(max_size=30))
def test_duration_parser(text: str) -> None:
    try:
        assert parse_duration(text) >= 0
    except DurationError:
        pass


CONF_KEYS = ["key_id", "secret", "secfile", "host", "checker", "timeout", "interval",
             "extended_timeout", "approval_delay", "approval_duration", "approved_by_default",
             "enabled", "fingerprint", "port", "address", "use_ipv6", "zeroconf"]
conf_line = st.one_of(
    st.tuples(st.sampled_from(CONF_KEYS), st.text(max_size=70)).map(
        lambda kv: f"{kv[0]} = {kv[1]}"),
    st.text(max_size=40).map(lambda t: f"[{t}]"),
    st.text(max_size=60),
)


@fuzz
@given(st.lists(conf_line, max_size=15), st.lists(conf_line, max_size=6))
def test_config_loader(clients: list[str], server: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "clients.conf").write_text("\n".join(clients), errors="surrogateescape")
        os.chmod(Path(d, "clients.conf"), 0o600)  # else refused before parsing
        Path(d, "mandos.conf").write_text("[DEFAULT]\n" + "\n".join(server),
                                          errors="surrogateescape")
        try:
            load(Path(d))
        except ConfigError as e:
            assert "\n" not in str(e)


@fuzz
@given(st.binary(max_size=600))
def test_certificate_spki_extractor(data: bytes) -> None:
    try:
        spki_from_certificate(data)
    except DERError:
        pass


@fuzz
@given(st.binary(max_size=1500))
def test_escrow_packet_reader(data: bytes) -> None:
    from mandos_core.escrow_packet import PacketError, parse

    try:
        parse(data)
    except PacketError:
        pass


def _real_packet() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    from mandos_core.escrow_packet import Metadata, build
    from mandos_core.secret import Secret

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "escrow")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    meta = Metadata("host", "0f2b5c8e-1d3a-4b6c-9e7f-1234567890ab", "/dev/vda2", "crypt_LUKS2",
                    1)
    return build(cert.public_bytes(serialization.Encoding.PEM), Secret(b"abcd-efgh"), meta)


_PACKET: list[bytes] = []


@fuzz
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 10**6))
def test_escrow_packet_reader_mutations(flips: list[tuple[int, int]], cut: int) -> None:
    """A real packet with bytes changed and its tail cut: a packet or the typed error."""
    from mandos_core.escrow_packet import PacketError, parse

    if not _PACKET:
        _PACKET.append(_real_packet())
    data = bytearray(_PACKET[0])
    for pos, byte in flips:
        data[pos % len(data)] = byte
    del data[max(1, cut % (len(data) + 1)):]
    try:
        parse(bytes(data))
    except PacketError:
        pass
