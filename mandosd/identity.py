"""The key server's own identity: an Ed25519 key pair that client machines pin.

Mandos key servers are anonymous; a fake one (DNS, ARP, any host announcing
``_mandos._tcp``) could answer a client.  mandosd keeps a key pair in its
state directory (``server-tls-privkey.pem``, 0600, made on first start) and
presents the public key as the TLS client whenever the client machine asks for
it.  A machine given this key_id at enrollment (``mandos-keygen --pin``) trusts
escrow acknowledgements, and when pinned also secrets, only from a server that
proved it.  ``mandos-ctl identity`` prints the key_id to pin.

Never sent anywhere but the TLS handshake; never logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mandos_core.protocol import key_id, pem_to_der

PRIVATE = "server-tls-privkey.pem"
PUBLIC = "server-tls-pubkey.pem"


class IdentityError(Exception):
    pass


@dataclass(frozen=True)
class Identity:
    spki_pem: bytes
    key_pem: bytes

    @property
    def key_id(self) -> str:
        return key_id(pem_to_der(self.spki_pem, "PUBLIC KEY"))

    def __repr__(self) -> str:
        return f"Identity(key_id={self.key_id})"


def _make() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _public_of(key_pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_pem, None)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_private(path: Path) -> None:
    st = path.stat()
    if st.st_mode & 0o077:
        raise IdentityError(f"{path}: readable by others (mode {st.st_mode & 0o777:04o}); "
                            f"run: chmod 600 {path}")
    if st.st_uid not in (0, os.geteuid()):
        raise IdentityError(f"{path}: not owned by root; run: chown root: {path}")


def load(statedir: Path) -> Identity:
    """The identity in *statedir*; :class:`IdentityError` when absent or unsafe."""
    priv = statedir / PRIVATE
    try:
        _check_private(priv)
        key_pem = priv.read_bytes()
        spki_pem = _public_of(key_pem)
    except FileNotFoundError:
        raise IdentityError(f"{priv}: no server identity yet (mandosd makes it on first "
                            "start)") from None
    except OSError as e:
        raise IdentityError(f"{e.filename}: {e.strerror}") from None
    except ValueError:
        raise IdentityError(f"{priv}: not a PEM private key") from None
    return Identity(spki_pem, key_pem)


def load_or_create(statedir: Path) -> Identity:
    """Load the identity, making it first if this state directory has none.

    The private key is created with O_EXCL, so of two servers starting at once
    the first one's key is the one both use.  The public key file is written
    for the admin's convenience only; the identity is always derived from the
    private key.
    """
    statedir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a pool server keeps no other state
    priv = statedir / PRIVATE
    try:
        fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(_make())
            f.flush()
            os.fsync(f.fileno())
    ident = load(statedir)
    pub = statedir / PUBLIC
    try:
        if not pub.exists() or pub.read_bytes() != ident.spki_pem:
            tmp = statedir / f".{PUBLIC}.{os.getpid()}"
            tmp.write_bytes(ident.spki_pem)
            os.chmod(tmp, 0o644)
            os.replace(tmp, pub)
    except OSError:
        pass  # a convenience copy only
    return ident
