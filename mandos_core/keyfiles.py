"""The client's key files, with Mandos's names, and the TLS context made from them.

``/etc/keys/mandos`` (the default key directory) holds, as written by either
Debian's ``mandos-keygen`` or ours:

- ``tls-privkey.pem``  Ed25519 private key (PKCS#8)
- ``tls-pubkey.pem``   its SubjectPublicKeyInfo
- ``tls-cert.pem``     a self-signed certificate around it (written by our keygen
                       before raw public keys; no longer used by the client)
- ``server-pins``      key_ids of the key servers this machine trusts (optional)
- ``seckey.txt`` / ``pubkey.txt``  the armored OpenPGP key pair

The client presents its key as an RFC 7250 raw public key through GnuTLS,
exactly as Mandos 1.8 does (:mod:`mandos_core.tls`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .protocol import key_id, pem_to_der

#: Where the client's keys live, with Mandos's file names.
DEFAULT_KEYDIR = Path("/etc/keys/mandos")

if TYPE_CHECKING:
    from .tls import ClientTLS



class KeyError_(Exception):
    """A key file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class KeyFiles:
    tls_privkey: Path
    tls_pubkey: Path
    seckey: Path
    pubkey: Path
    tls_cert: Path | None = None

    @classmethod
    def from_dir(cls, keydir: Path, **overrides: Path | None) -> KeyFiles:
        files = {
            "tls_privkey": keydir / "tls-privkey.pem",
            "tls_pubkey": keydir / "tls-pubkey.pem",
            "seckey": keydir / "seckey.txt",
            "pubkey": keydir / "pubkey.txt",
            "tls_cert": keydir / "tls-cert.pem",
        }
        files.update({k: v for k, v in overrides.items() if v is not None})
        cert = files.pop("tls_cert")
        return cls(tls_cert=cert if cert and cert.exists() else None, **files)  # type: ignore[arg-type]

    def spki_der(self) -> bytes:
        try:
            return pem_to_der(self.tls_pubkey.read_bytes(), "PUBLIC KEY")
        except OSError as e:
            raise KeyError_(f"{self.tls_pubkey}: {e.strerror}") from None
        except ValueError as e:
            raise KeyError_(f"{self.tls_pubkey}: {e}") from None

    def key_id(self) -> str:
        return key_id(self.spki_der())


#: Key servers this machine trusts: one key_id per line (``mandos-keygen --pin``).
PINS_FILE = "server-pins"


def read_pins(keydir: Path) -> frozenset[str]:
    """The pinned key servers' key_ids in *keydir*/server-pins (empty when absent)."""
    from .protocol import KeyIdError, normalize_key_id

    path = keydir / PINS_FILE
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return frozenset()
    except OSError as e:
        raise KeyError_(f"{path}: {e.strerror}") from None
    pins = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            pins.add(normalize_key_id(line))
        except KeyIdError as e:
            raise KeyError_(f"{path}:{n}: {e}") from None
    return frozenset(pins)


def server_context(keyfiles: KeyFiles, *, priority: str | None = None,
                   pins: frozenset[str] | None = None, require_pin: bool = True) -> ClientTLS:
    """The client's role in protocol 1: the TLS *server*, presenting its raw public key."""
    from . import gnutls
    from .tls import ClientTLS, effective_priority

    try:
        spki_pem = keyfiles.tls_pubkey.read_bytes()
        key_pem = keyfiles.tls_privkey.read_bytes()
    except OSError as e:
        raise KeyError_(f"{e.filename}: {e.strerror}") from None
    try:
        pem_to_der(spki_pem, "PUBLIC KEY")
    except ValueError as e:
        raise KeyError_(f"{keyfiles.tls_pubkey}: {e}") from None
    cred = gnutls.Credentials()
    try:
        cred.set_rawpk(spki_pem, key_pem)
    except gnutls.GnuTLSError as e:
        cred.close()
        raise KeyError_(f"TLS key files in {keyfiles.tls_privkey.parent}: {e}") from None
    if pins is None:
        pins = read_pins(keyfiles.tls_privkey.parent)
    return ClientTLS(cred, effective_priority(priority, server=False), pins, require_pin)


def check_private_keys(keydir: Path | None, keyfiles: KeyFiles) -> None:
    """Refuse a missing key directory, and private key files others can read or that others own.

    As ssh refuses an unprotected identity file: a key that another user can read
    (or write, through ownership) means this machine's identity, and with it the
    secret the key server holds for it, may be someone else's too.  Raises
    :class:`KeyError_` with one line that names the file and the command that fixes it.
    """
    if keydir is not None and not keydir.is_dir():
        raise KeyError_(f"{keydir}: directory not found (use --keydir DIR, or make the keys "
                        f"with mandos-keygen --dir {keydir})")
    me = os.geteuid()
    for path in (keyfiles.tls_privkey, keyfiles.seckey):
        try:
            st = path.stat()
        except FileNotFoundError:
            raise KeyError_(f"{path}: file not found") from None
        except OSError as e:
            raise KeyError_(f"{path}: {e.strerror or e}") from None
        if st.st_uid not in (0, me):
            raise KeyError_(f"{path}: private key owned by uid {st.st_uid}, not by root or "
                            f"uid {me}; fix with: chown {me} '{path}'")
        if st.st_mode & 0o077:
            raise KeyError_(f"WARNING: UNPROTECTED PRIVATE KEY FILE! Permissions "
                            f"{st.st_mode & 0o777:04o} for '{path}' are too open; "
                            f"fix with: chmod 600 '{path}'")
