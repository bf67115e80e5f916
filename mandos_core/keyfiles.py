"""The client's key files, with Mandos's names, and the TLS context made from them.

``/etc/keys/mandos`` (the default key directory) holds, as written by either
Debian's ``mandos-keygen`` or ours:

- ``tls-privkey.pem``  Ed25519 private key (PKCS#8)
- ``tls-pubkey.pem``   its SubjectPublicKeyInfo
- ``tls-cert.pem``     a self-signed certificate around it (ours only; made on demand)
- ``seckey.txt`` / ``pubkey.txt``  the armored OpenPGP key pair

Python's ``ssl`` needs a certificate to present, while Mandos 1.8 uses raw
public keys.  When ``tls-cert.pem`` is missing we make one in a private
temporary directory, with ``cryptography`` when installed or ``openssl``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .protocol import DERError, key_id, pem_to_der, spki_from_certificate, tls13_only
from .run import CommandError, run

#: Where the client's keys live, with Mandos's file names.
DEFAULT_KEYDIR = Path("/etc/keys/mandos")

if TYPE_CHECKING:
    import ssl



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


def _make_certificate(keyfiles: KeyFiles, outdir: Path) -> Path:
    cert = outdir / "tls-cert.pem"
    try:
        from mandos_keygen.certificate import self_signed_pem
    except ImportError:  # no cryptography (initrd): fall back to the openssl binary
        try:
            run(["openssl", "req", "-x509", "-new", "-key", str(keyfiles.tls_privkey),
                 "-subj", "/CN=mandos-client", "-days", "36500", "-out", str(cert)])
        except CommandError as e:
            raise KeyError_(f"cannot make a TLS certificate: {e}") from None
    else:
        cert.write_bytes(self_signed_pem(keyfiles.tls_privkey.read_bytes()))
    return cert


def server_context(keyfiles: KeyFiles) -> ssl.SSLContext:
    """TLS context for the client's role in protocol 1: the TLS *server*."""
    import ssl  # here, not at the top: mandos-client starts gpg before paying for ssl

    ctx = tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.verify_mode = ssl.CERT_NONE
    try:
        if keyfiles.tls_cert is not None:
            cert_der = pem_to_der(keyfiles.tls_cert.read_bytes(), "CERTIFICATE")
            if spki_from_certificate(cert_der) != keyfiles.spki_der():
                raise KeyError_(f"{keyfiles.tls_cert} does not match {keyfiles.tls_pubkey}")
            ctx.load_cert_chain(keyfiles.tls_cert, keyfiles.tls_privkey)
        else:
            with tempfile.TemporaryDirectory(prefix="mandos-tls-") as tmp:
                os.chmod(tmp, 0o700)
                cert = _make_certificate(keyfiles, Path(tmp))
                ctx.load_cert_chain(cert, keyfiles.tls_privkey)
    except OSError as e:
        name = getattr(e, "filename", None) or "key files"
        raise KeyError_(f"{name}: {e.strerror or e}") from None
    except (ssl.SSLError, ValueError, DERError) as e:
        raise KeyError_(f"TLS key files in {keyfiles.tls_privkey.parent}: {e}") from None
    return ctx


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
