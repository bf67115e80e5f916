"""Protocol 1 of the Mandos wire protocol, as both sides need it.

1. The client (agent) opens TCP and sends ``1\\r\\n``.
2. TLS 1.3 with inverted roles: the client is the TLS *server* and presents
   its Ed25519 key as an RFC 7250 raw public key (or, for clients enrolled
   before raw keys, inside a self-signed X.509 certificate); the key server is
   the TLS *client* (:mod:`mandos_core.tls`).
3. The key server identifies the client by :func:`key_id` of its public key.
4. If allowed, the server writes the raw binary OpenPGP message and closes;
   every refusal is the same: a complete handshake, then zero bytes.

This module is imported by the initrd agent and by the server; standard library only.
"""

from __future__ import annotations

import base64
import hashlib
import re

VERSION_LINE = b"1\r\n"
#: The escrow exchange (luks-passphrase sync) shares the port, selected by its own line.
ESCROW_LINE = b"escrow 1\r\n"
#: The longest first line the server reads before giving up on a peer.
MAX_VERSION_LINE = 16
#: The largest secret either side accepts (Mandos secrets are a few KiB).
MAX_SECRET_SIZE = 64 * 1024

#: SHA-256 of empty input: what a broken client computes for "no key".  Never valid.
EMPTY_KEY_ID = hashlib.sha256(b"").hexdigest().upper()

_HEX64 = re.compile(r"[0-9A-F]{64}")


class KeyIdError(ValueError):
    pass


def key_id(spki_der: bytes) -> str:
    """SHA-256 over the DER SubjectPublicKeyInfo, 64 upper-case hex digits.

    Equal to ``certtool --key-id --hash=sha256`` and to Mandos's ``key_id``.
    """
    return hashlib.sha256(spki_der).hexdigest().upper()


def normalize_key_id(text: str) -> str:
    """Accept key_ids as Mandos does: case- and whitespace-insensitive."""
    kid = "".join(text.split()).upper()
    if not _HEX64.fullmatch(kid):
        raise KeyIdError("key_id must be 64 hexadecimal digits (SHA-256)")
    if kid == EMPTY_KEY_ID:
        raise KeyIdError("key_id is the SHA-256 of empty input, which is never valid")
    return kid


def pem_to_der(pem: str | bytes, label: str) -> bytes:
    """Extract the DER body of the first PEM block with *label*."""
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    m = re.search(
        rf"-----BEGIN {label}-----\s*(.*?)\s*-----END {label}-----", text, re.DOTALL
    )
    if not m:
        raise ValueError(f"no PEM block '{label}' found")
    return base64.b64decode("".join(m.group(1).split()), validate=True)


class DERError(ValueError):
    pass


def _der_element(data: bytes, pos: int) -> tuple[int, int, int]:
    """Return (tag, start of content, end of content) of the DER element at *pos*."""
    if pos + 2 > len(data):
        raise DERError("truncated DER")
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise DERError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise DERError("truncated DER")
    return tag, pos, pos + length


def spki_from_certificate(cert_der: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo inside an X.509 certificate (RFC 5280 4.1)."""
    tag, start, _ = _der_element(cert_der, 0)  # Certificate
    if tag != 0x30:
        raise DERError("not an X.509 certificate")
    tag, pos, end = _der_element(cert_der, start)  # tbsCertificate
    if tag != 0x30:
        raise DERError("not an X.509 certificate")
    fields: list[tuple[int, int, int]] = []
    while pos < end and len(fields) < 7:
        tag, cstart, cend = _der_element(cert_der, pos)
        fields.append((tag, pos, cend))
        pos = cend
    if fields and fields[0][0] == 0xA0:  # explicit [0] version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    if len(fields) < 6 or fields[5][0] != 0x30:
        raise DERError("certificate has no SubjectPublicKeyInfo")
    _, s, e = fields[5]
    return cert_der[s:e]


#: Key algorithms a client may identify itself with (Mandos 1.8 makes Ed25519).
KEY_ALGORITHMS = {
    bytes.fromhex("2b6570"): "ed25519",  # 1.3.101.112
    bytes.fromhex("2b6571"): "ed448",  # 1.3.101.113
}


def spki_algorithm(spki_der: bytes) -> str:
    """The key algorithm of a DER SubjectPublicKeyInfo: ``ed25519``, ``ed448``, or the
    dotted OID of anything else.  Raises :class:`DERError` on malformed input."""
    tag, start, end = _der_element(spki_der, 0)
    if tag != 0x30 or end != len(spki_der):
        raise DERError("not a SubjectPublicKeyInfo")
    tag, astart, aend = _der_element(spki_der, start)  # AlgorithmIdentifier
    if tag != 0x30:
        raise DERError("not a SubjectPublicKeyInfo")
    tag, ostart, oend = _der_element(spki_der, astart)
    if tag != 0x06:
        raise DERError("no algorithm identifier")
    oid = spki_der[ostart:oend]
    if oid in KEY_ALGORITHMS:
        return KEY_ALGORITHMS[oid]
    return _dotted(oid)


def _dotted(oid: bytes) -> str:
    if not oid:
        return "?"
    parts = [oid[0] // 40, oid[0] % 40]
    n = 0
    for b in oid[1:]:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(n)
            n = 0
    return ".".join(map(str, parts))
