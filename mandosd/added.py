"""What ``mandos-ctl --add`` accepts from a section made on the client.

The documented pipe ``mandos-keygen --password | mandos-ctl --add -`` carries text
made on the machine being enrolled.  Such a section may name the client (``key_id``,
``fingerprint``), carry its encrypted secret (``secret``, an OpenPGP message encrypted
to the client's key) and say where it is (``host``); nothing else.  Checker, timeouts,
approvals and the rest come from the admin's clients.conf ``[DEFAULT]``.

Never read a file named in such a section, never let its text reach a command line
unchecked, and never write it anywhere but the state store.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import functools
import re
import zlib
from collections.abc import Mapping

from mandos_core.protocol import KeyIdError, normalize_key_id

from .config import Client, ConfigError, section_client

#: the keys a client-made section may set
ALLOWED = ("key_id", "fingerprint", "host", "secret")
#: what mandos-keygen prints by default; accepted and ignored (the admin's checker applies)
KEYGEN_CHECKER = "fping -q -- %%(host)s"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HOST = re.compile(r"[A-Za-z0-9_\[][A-Za-z0-9_.:\[\]-]{0,252}")
_HEX = re.compile(r"[0-9A-F]*")

#: OpenPGP packet tags (RFC 4880, RFC 9580) that may begin an encrypted message
ENCRYPTED = {1: "public-key encrypted session key", 3: "symmetric-key encrypted session key",
             9: "symmetrically encrypted data", 18: "integrity-protected encrypted data",
             20: "AEAD encrypted data"}
COMPRESSED = 8
OTHER = {2: "signature", 4: "one-pass signature", 5: "secret key", 6: "public key",
         7: "secret subkey", 10: "marker", 11: "literal data", 13: "user id", 14: "public subkey"}


class AddError(ConfigError):
    """A client-made section that ``--add`` refuses; one line naming what and why."""


def _first_tag(data: bytes) -> tuple[int, bytes] | None:
    """The first packet's tag and (as far as present) its body; None if not OpenPGP."""
    if not data or not data[0] & 0x80:
        return None
    b = data[0]
    if b & 0x40:  # new format
        tag = b & 0x3F
        if len(data) < 2:
            return tag, b""
        first = data[1]
        if first < 192:
            return tag, data[2:2 + first]
        if first < 224:
            return tag, data[3:]
        if first == 255:
            return tag, data[6:]
        return tag, data[2:]  # partial length: the first chunk follows
    tag, ltype = (b >> 2) & 0x0F, b & 0x03
    skip = {0: 1, 1: 2, 2: 4, 3: 0}[ltype]
    return tag, data[1 + skip:]


def check_encrypted(data: bytes, what: str = "secret", depth: int = 0) -> None:
    """Raise :class:`AddError` unless *data* is an encrypted binary OpenPGP message.

    A literal-data packet is refused: gpg "decrypts" it without any key, so it would
    hand the machine whatever the maker of the section chose.
    """
    hint = "make it with mandos-keygen --password"
    first = _first_tag(data)
    if first is None:
        raise AddError(f"{what}: not an OpenPGP message ({hint})")
    tag, body = first
    if tag in ENCRYPTED:
        return
    if tag == COMPRESSED and depth == 0 and body:
        algo, payload = body[0], body[1:]
        try:
            if algo == 1:
                inner = zlib.decompressobj(-15).decompress(payload, 64)
            elif algo == 2:
                inner = zlib.decompressobj().decompress(payload, 64)
            else:
                inner = b""
        except zlib.error:
            inner = b""
        if not inner:
            raise AddError(f"{what}: compressed OpenPGP data that cannot be checked ({hint})")
        return check_encrypted(inner, what, depth + 1)
    name = OTHER.get(tag, f"packet type {tag}")
    raise AddError(f"{what}: not an encrypted OpenPGP message (first packet: {name}); "
                   f"the secret must be encrypted to the client's key ({hint})")


def _decode_secret(label: str, name: str, raw: str) -> bytes:
    try:
        data = base64.b64decode("".join(raw.split()), validate=True)
    except (binascii.Error, ValueError):
        raise AddError(f"{label}: [{name}] secret=…: not valid base64") from None
    check_encrypted(data, f"{label}: [{name}] secret")
    return data


def _same_checker(value: str, defaults: Mapping[str, str]) -> bool:
    words = value.split()
    return words in (KEYGEN_CHECKER.split(), defaults.get("checker", "").split())


def parse(text: str, defaults: Mapping[str, str], label: str) -> tuple[str, dict[str, str]]:
    """The one section of *text*, checked: its name and its accepted raw values."""
    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       default_section="\x00")  # [DEFAULT] is refused
    try:
        parser.read_string(text, source=label)
    except configparser.Error as e:
        raise AddError(f"{label}: not a clients.conf section: "
                       f"{str(e).splitlines()[0]}") from None
    sections = parser.sections()
    if len(sections) != 1:
        raise AddError(f"{label}: expected exactly one client section, found "
                       f"{len(sections)}" + (f" ({', '.join(sections)})" if sections else ""))
    name = sections[0]
    if name.upper() == "DEFAULT":
        raise AddError(f"{label}: a [DEFAULT] section is not accepted from a client; "
                       "defaults are the admin's, in clients.conf")
    if not _NAME.fullmatch(name):
        raise AddError(f"{label}: [{name}]: a client name is letters, digits, '.', '_', "
                       "'-' (at most 63)")
    values: dict[str, str] = {}
    for key, value in parser.items(name):
        if key == "checker" and _same_checker(value, defaults):
            continue  # mandos-keygen prints the default checker; the admin's applies
        if key not in ALLOWED:
            hint = ("; after adding, set it with mandos-ctl --checker" if key == "checker"
                    else "")
            raise AddError(f"{label}: [{name}] key '{key}' is not accepted from a client's "
                           "section (only key_id, fingerprint, host, secret; the rest comes "
                           f"from clients.conf [DEFAULT]{hint})")
        values[key] = value
    if "key_id" not in values:
        raise AddError(f"{label}: [{name}]: no key_id (mandos-keygen --password prints it)")
    try:
        values["key_id"] = normalize_key_id(values["key_id"])
    except KeyIdError as e:
        raise AddError(f"{label}: [{name}] key_id={values['key_id'].strip()}: {e}") from None
    if "secret" not in values:
        raise AddError(f"{label}: [{name}]: no secret (mandos-keygen --password prints it)")
    values["secret"] = base64.b64encode(_decode_secret(label, name, values["secret"])).decode()
    fpr = "".join(values.get("fingerprint", "").split()).upper()
    if not _HEX.fullmatch(fpr):
        raise AddError(f"{label}: [{name}] fingerprint: not hexadecimal")
    values["fingerprint"] = fpr
    host = values.get("host", "").strip() or name
    if not _HOST.fullmatch(host):
        raise AddError(f"{label}: [{name}] host={host}: not a host name or address")
    values["host"] = host
    return name, values


def canonical(name: str, values: Mapping[str, str]) -> str:
    """The section as stored: only the accepted keys, in a fixed order."""
    lines = [f"[{name}]"] + [f"{k} = {values[k]}" for k in ALLOWED if values.get(k)]
    return "\n".join(lines) + "\n"


def client(text: str, defaults: Mapping[str, str], label: str = "-") -> Client:
    """The client of a client-made section, with the admin's *defaults*; in memory."""
    return _client(text, tuple(sorted(defaults.items())), label)


@functools.lru_cache(maxsize=4096)
def _client(text: str, defaults: tuple[tuple[str, str], ...], label: str) -> Client:
    d = dict(defaults)
    name, values = parse(text, d, label)
    return section_client(name, values, d, label)
