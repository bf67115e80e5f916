"""Self-signed certificates around a Mandos TLS key (needs ``cryptography``).

Only ``mandos-keygen`` and the booted system use this; the initrd ships the
certificate that ``mandos-keygen`` wrote, so it needs no ``cryptography``.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID


def self_signed_pem(private_key_pem: bytes, common_name: str = "mandos-client") -> bytes:
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("the TLS private key is not an Ed25519 key")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(datetime.datetime(9999, 12, 31, tzinfo=datetime.UTC))
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)
