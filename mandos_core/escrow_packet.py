"""Escrow packets in volume_key's format 3 ("asymmetric_wrap_secret_only").

Written from the format as volume_key's tools show it (``volume_key --dump``
and the bytes of packets it makes), so that Debian's ``volume_key`` reads our
packets and we read its:

- 12-byte header: ``"\\0volume_key"`` and one byte, the packet format (3);
- a body in a KMIP-style tag/type/length/value encoding: 4-byte tag
  (``0x42xxxxxx``), 1-byte type, 4-byte big-endian length, the value, no
  padding.  Types: 0x01 integer, 0x04 enumeration (4 bytes, big-endian),
  0x06 text, 0x07 bytes, 0x80 structure;
- the body is a "secret data" object (a password) whose key value holds the
  passphrase encrypted with RSA (PKCS #1 v1.5) to the escrow certificate and,
  in clear, the metadata as "Application Specific Identification"
  attributes (``Host Name``, ``Volume UUID``, ``Volume File``,
  ``Volume Format``, ``Passphrase Slot``).  The wrapping key is named by the
  certificate's issuer and serial number, so the holder of the private key
  (in an NSS database for ``volume_key --secrets -d DIR``, or as a PEM file
  for ``mandos-ctl escrow secrets``) can find it.

Only format 3 keeps the metadata readable without the private key; format 1
packets (the whole packet enveloped) are recognised and refused on import.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from mandos_core.secret import Secret

MAGIC = b"\0volume_key"
FORMAT_ASYMMETRIC_WRAP_SECRET_ONLY = 3
FORMAT_NAMES = {
    0: "cleartext", 1: "asymmetric", 2: "passphrase",
    3: "asymmetric_wrap_secret_only", 4: "symmetric_wrap_secret_only",
}
MAX_PACKET = 64 * 1024

T_INT, T_ENUM, T_TEXT, T_BYTES, T_STRUCT = 0x01, 0x04, 0x06, 0x07, 0x80

TAG_PACKET = 0x420135F4
TAG_VERSION = 0x42000065
TAG_VERSION_MAJOR = 0x42000066
TAG_VERSION_MINOR = 0x42000067
TAG_OBJECT_TYPE = 0x42000052
TAG_SECRET_DATA = 0x42000080
TAG_SECRET_DATA_TYPE = 0x42000081
TAG_KEY_BLOCK = 0x4200003C
TAG_KEY_FORMAT = 0x42000040
TAG_KEY_VALUE = 0x4200003F
TAG_KEY_MATERIAL = 0x4200003D
TAG_ATTRIBUTE = 0x42000008
TAG_ATTRIBUTE_NAME = 0x4200000A
TAG_ATTRIBUTE_VALUE = 0x4200000B
TAG_APP_NAMESPACE = 0x42000003
TAG_APP_DATA = 0x42000002
TAG_ALGORITHM = 0x42000025
TAG_WRAPPING = 0x42000041
TAG_WRAPPING_METHOD = 0x4200009A
TAG_ENCRYPTION_KEY_INFO = 0x42000032
TAG_KEY_ID = 0x4200008F
TAG_CRYPTO_PARAMS = 0x42000027
TAG_PADDING = 0x4200005A

APP_SPECIFIC_ID = "Application Specific Identification"
VERSION = (0, 98)
OBJECT_TYPE_SECRET_DATA = 8
SECRET_TYPE_PASSWORD = 1
KEY_FORMAT_RAW = 2
ALGORITHM_NONE = 4
WRAP_METHOD_ASYMMETRIC = 0x81E64B1B
PADDING_PKCS1_V15 = 8
KEY_ID_PREFIX = "x-redhat.com:volume_key issuer/SN:"
VOLUME_FORMAT_LUKS = "crypt_LUKS"

# The metadata names as the packet stores them, and as ``volume_key --dump`` shows them.
ATTR_HOST = "Host Name"
ATTR_UUID = "Volume UUID"
ATTR_PATH = "Volume File"
ATTR_FORMAT = "Volume Format"
ATTR_SLOT = "Passphrase Slot"


class PacketError(ValueError):
    """Not a volume_key packet, or one we cannot use."""


@dataclass(frozen=True)
class Metadata:
    host_name: str
    volume_uuid: str
    volume_path: str
    volume_format: str
    passphrase_slot: int | None


@dataclass(frozen=True)
class Packet:
    format: int
    metadata: Metadata
    wrapped: bytes
    issuer_der: bytes
    serial_der: bytes


# -- encoding ---------------------------------------------------------------

def _item(tag: int, typ: int, value: bytes) -> bytes:
    return struct.pack(">IBI", tag, typ, len(value)) + value


def _int(tag: int, v: int) -> bytes:
    return _item(tag, T_INT, struct.pack(">i", v))


def _enum(tag: int, v: int) -> bytes:
    return _item(tag, T_ENUM, struct.pack(">I", v))


def _text(tag: int, s: str) -> bytes:
    return _item(tag, T_TEXT, s.encode())


def _struct(tag: int, *children: bytes) -> bytes:
    return _item(tag, T_STRUCT, b"".join(children))


def _attribute(name: str, value: str) -> bytes:
    return _struct(
        TAG_ATTRIBUTE,
        _text(TAG_ATTRIBUTE_NAME, APP_SPECIFIC_ID),
        _struct(TAG_ATTRIBUTE_VALUE, _text(TAG_APP_NAMESPACE, name), _text(TAG_APP_DATA, value)),
    )


def _der_int_content(n: int) -> bytes:
    """The content octets of a DER INTEGER (how NSS names a serial number)."""
    if n < 0:
        raise PacketError("negative certificate serial numbers are not supported")
    return n.to_bytes(n.bit_length() // 8 + 1, "big") if n else b"\0"


def build(certificate_pem: bytes, passphrase: Secret, metadata: Metadata) -> bytes:
    """A format-3 packet: *metadata* in clear, *passphrase* wrapped to the certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    try:
        cert = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError:
        try:
            cert = x509.load_der_x509_certificate(certificate_pem)
        except ValueError:
            raise PacketError("the escrow certificate is not a PEM or DER X.509 certificate") from None
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise PacketError("the escrow certificate must hold an RSA key (volume_key wraps with RSA)")
    wrapped = key.encrypt(passphrase.reveal(), padding.PKCS1v15())
    issuer = cert.issuer.public_bytes()
    serial = _der_int_content(cert.serial_number)
    key_name = (KEY_ID_PREFIX + base64.b64encode(issuer).decode() + " "
                + base64.b64encode(serial).decode())
    attrs = [
        _attribute(ATTR_HOST, metadata.host_name),
        _attribute(ATTR_UUID, metadata.volume_uuid),
        _attribute(ATTR_PATH, metadata.volume_path),
        _attribute(ATTR_FORMAT, metadata.volume_format),
    ]
    if metadata.passphrase_slot is not None:
        attrs.append(_attribute(ATTR_SLOT, str(metadata.passphrase_slot)))
    body = _struct(
        TAG_PACKET,
        _struct(TAG_VERSION, _int(TAG_VERSION_MAJOR, VERSION[0]), _int(TAG_VERSION_MINOR, VERSION[1])),
        _enum(TAG_OBJECT_TYPE, OBJECT_TYPE_SECRET_DATA),
        _struct(
            TAG_SECRET_DATA,
            _enum(TAG_SECRET_DATA_TYPE, SECRET_TYPE_PASSWORD),
            _struct(
                TAG_KEY_BLOCK,
                _enum(TAG_KEY_FORMAT, KEY_FORMAT_RAW),
                _struct(TAG_KEY_VALUE, _item(TAG_KEY_MATERIAL, T_BYTES, wrapped), *attrs),
                _enum(TAG_ALGORITHM, ALGORITHM_NONE),
                _struct(
                    TAG_WRAPPING,
                    _enum(TAG_WRAPPING_METHOD, WRAP_METHOD_ASYMMETRIC),
                    _struct(
                        TAG_ENCRYPTION_KEY_INFO,
                        _text(TAG_KEY_ID, key_name),
                        _struct(TAG_CRYPTO_PARAMS, _enum(TAG_PADDING, PADDING_PKCS1_V15)),
                    ),
                ),
            ),
        ),
    )
    return MAGIC + bytes([FORMAT_ASYMMETRIC_WRAP_SECRET_ONLY]) + body


# -- decoding ---------------------------------------------------------------

@dataclass(frozen=True)
class _Node:
    tag: int
    typ: int
    value: bytes

    def children(self) -> list[_Node]:
        if self.typ != T_STRUCT:
            raise PacketError(f"tag {self.tag:#010x} is not a structure")
        return list(_items(self.value, depth=1))

    def child(self, tag: int) -> _Node:
        for c in self.children():
            if c.tag == tag:
                return c
        raise PacketError(f"missing tag {tag:#010x}")

    def text(self) -> str:
        if self.typ != T_TEXT:
            raise PacketError(f"tag {self.tag:#010x} is not text")
        try:
            return self.value.decode()
        except UnicodeDecodeError:
            raise PacketError(f"tag {self.tag:#010x}: invalid UTF-8") from None


def _items(data: bytes, depth: int = 0) -> Iterator[_Node]:
    if depth > 16:
        raise PacketError("packet nested too deeply")
    i = 0
    while i < len(data):
        if len(data) - i < 9:
            raise PacketError("truncated packet")
        tag, typ, length = struct.unpack_from(">IBI", data, i)
        i += 9
        if length > len(data) - i:
            raise PacketError("truncated packet")
        yield _Node(tag, typ, data[i:i + length])
        i += length


def packet_format(data: bytes) -> int:
    if len(data) < len(MAGIC) + 1 or not data.startswith(MAGIC):
        raise PacketError("not a volume_key escrow packet")
    return data[len(MAGIC)]


def parse(data: bytes) -> Packet:
    """Parse a format-3 packet (raise :class:`PacketError` for anything else)."""
    if len(data) > MAX_PACKET:
        raise PacketError(f"packet larger than {MAX_PACKET} bytes")
    fmt = packet_format(data)
    if fmt != FORMAT_ASYMMETRIC_WRAP_SECRET_ONLY:
        name = FORMAT_NAMES.get(fmt, f"unknown format {fmt}")
        raise PacketError(f"packet format {name}: only asymmetric_wrap_secret_only (3) keeps "
                          "its metadata readable; make packets with "
                          "--output-format asymmetric_wrap_secret_only")
    top = list(_items(data[len(MAGIC) + 1:]))
    if len(top) != 1 or top[0].tag != TAG_PACKET:
        raise PacketError("unexpected packet body")
    block = top[0].child(TAG_SECRET_DATA).child(TAG_KEY_BLOCK)
    value = block.child(TAG_KEY_VALUE)
    wrapped = b""
    attrs: dict[str, str] = {}
    for c in value.children():
        if c.tag == TAG_KEY_MATERIAL and c.typ == T_BYTES:
            wrapped = c.value
        elif c.tag == TAG_ATTRIBUTE:
            if c.child(TAG_ATTRIBUTE_NAME).text() != APP_SPECIFIC_ID:
                continue
            v = c.child(TAG_ATTRIBUTE_VALUE)
            attrs[v.child(TAG_APP_NAMESPACE).text()] = v.child(TAG_APP_DATA).text()
    if not wrapped:
        raise PacketError("packet holds no wrapped secret")
    key_name = block.child(TAG_WRAPPING).child(TAG_ENCRYPTION_KEY_INFO).child(TAG_KEY_ID).text()
    if not key_name.startswith(KEY_ID_PREFIX):
        raise PacketError("unknown wrapping key name")
    try:
        issuer_b64, serial_b64 = key_name[len(KEY_ID_PREFIX):].split(" ")
        issuer, serial = base64.b64decode(issuer_b64), base64.b64decode(serial_b64)
    except ValueError:
        raise PacketError("malformed wrapping key name") from None
    slot_text = attrs.get(ATTR_SLOT)
    try:
        slot = int(slot_text) if slot_text is not None else None
    except ValueError:
        raise PacketError(f"passphrase slot {slot_text!r} is not a number") from None
    meta = Metadata(
        host_name=attrs.get(ATTR_HOST, ""),
        volume_uuid=attrs.get(ATTR_UUID, ""),
        volume_path=attrs.get(ATTR_PATH, ""),
        volume_format=attrs.get(ATTR_FORMAT, ""),
        passphrase_slot=slot,
    )
    return Packet(fmt, meta, wrapped, issuer, serial)


def unwrap(packet: Packet, private_key_pem: bytes) -> Secret:
    """The passphrase in *packet*, with the escrow private key (helpdesk side)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise PacketError(f"cannot load the escrow private key: {e}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PacketError("the escrow private key is not an RSA key")
    try:
        return Secret(key.decrypt(packet.wrapped, padding.PKCS1v15()))
    except ValueError:
        raise PacketError("this private key does not open the packet") from None
