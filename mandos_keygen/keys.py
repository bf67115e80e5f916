"""Making the client's key set with Mandos's file names, and enrolling a secret."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mandos_core import gpghome
from mandos_core.keyfiles import KeyFiles
from mandos_core.protocol import key_id
from mandos_core.run import CommandError, run
from mandos_core.secret import Secret
from mandos_keygen.certificate import self_signed_pem

KEY_FILES = ("tls-privkey.pem", "tls-pubkey.pem", "tls-cert.pem", "seckey.txt", "pubkey.txt")
DEFAULT_CHECKER = "fping -q -- %%(host)s"


class KeygenError(Exception):
    pass


@dataclass(frozen=True)
class ClientIdentity:
    key_id: str
    fingerprint: str


class _GnupgHome:
    """A temporary GNUPGHOME; gpg-agent is stopped when it goes."""

    def __init__(self) -> None:
        self.path = gpghome.make("mandos-keygen-")

    def gpg(self, *args: str, input: bytes | None = None) -> bytes:
        argv = ["gpg", "--homedir", self.path, "--batch", "--quiet", "--no-tty",
                "--no-options", *args]
        try:
            return run(argv, input=input, timeout=120).stdout
        except CommandError as e:
            raise KeygenError(str(e)) from None

    def close(self) -> None:
        gpghome.remove(self.path)

    def __enter__(self) -> _GnupgHome:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fingerprint(home: _GnupgHome) -> str:
    out = home.gpg("--with-colons", "--fingerprint", "--list-keys").decode()
    for line in out.splitlines():
        if line.startswith("fpr:"):
            return line.split(":")[9]
    raise KeygenError("gpg made no key")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def generate(keydir: Path, name: str, *, force: bool = False, key_type: str = "ecc") -> None:
    """Make all key files in *keydir* (0700), all of them or none."""
    existing = [f for f in KEY_FILES if (keydir / f).exists()]
    if existing and not force:
        raise KeygenError(f"{keydir}: {', '.join(existing)} already exist; "
                          "use --force to replace the keys (the old ones are lost)")
    keydir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(keydir, 0o700)
    stage = Path(tempfile.mkdtemp(prefix=".keygen-", dir=keydir))
    try:
        tls = ed25519.Ed25519PrivateKey.generate()
        priv = tls.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        pub = tls.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        _write_private(stage / "tls-privkey.pem", priv)
        _write_private(stage / "tls-pubkey.pem", pub)
        _write_private(stage / "tls-cert.pem", self_signed_pem(priv, name))
        algo = {"ecc": "future-default", "rsa": "rsa4096"}[key_type]
        with _GnupgHome() as home:
            home.gpg("--pinentry-mode", "loopback", "--passphrase-fd", "0",
                     "--quick-gen-key", f"Mandos client key for {name}", algo, "default",
                     "never", input=b"")
            if key_type == "rsa":
                fpr = _fingerprint(home)
                home.gpg("--pinentry-mode", "loopback", "--passphrase-fd", "0",
                         "--quick-add-key", fpr, "rsa4096", "encr", "never", input=b"")
            _write_private(stage / "seckey.txt",
                           home.gpg("--pinentry-mode", "loopback", "--passphrase-fd", "0",
                                    "--armor", "--export-secret-keys", input=b""))
            _write_private(stage / "pubkey.txt", home.gpg("--armor", "--export"))
        for f in KEY_FILES:
            os.replace(stage / f, keydir / f)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def identity(keys: KeyFiles) -> ClientIdentity:
    with _GnupgHome() as home:
        try:
            home.gpg("--import", input=keys.pubkey.read_bytes())
        except OSError as e:
            raise KeygenError(f"{keys.pubkey}: {e.strerror}") from None
        fpr = _fingerprint(home)
    return ClientIdentity(key_id=keys.key_id(), fingerprint=fpr)


def encrypt_secret(keys: KeyFiles, secret: Secret) -> bytes:
    """The binary OpenPGP message of *secret* for the client's key (stdin only)."""
    with _GnupgHome() as home:
        try:
            home.gpg("--import", input=keys.pubkey.read_bytes())
        except OSError as e:
            raise KeygenError(f"{keys.pubkey}: {e.strerror}") from None
        fpr = _fingerprint(home)
        return home.gpg("--trust-model", "always", "--encrypt", "--recipient", fpr,
                        input=secret.reveal())


def client_section(name: str, host: str, ident: ClientIdentity, message: bytes,
                   checker: str | None = DEFAULT_CHECKER) -> str:
    """A clients.conf section in Mandos's layout (base64 wrapped at 64, indented)."""
    b64 = base64.b64encode(message).decode()
    lines = [f"[{name}]", f"host = {host}", f"key_id = {ident.key_id}",
             f"fingerprint = {ident.fingerprint}", "secret ="]
    lines += ["    " + chunk for chunk in textwrap.wrap(b64, 64)]
    if checker:
        lines.append(f"checker = {checker}")
    return "\n".join(lines) + "\n"


def default_name() -> str:
    return socket.gethostname().split(".")[0] or "client"


__all__ = ["KeygenError", "generate", "identity", "encrypt_secret", "client_section",
           "default_name", "key_id", "KEY_FILES"]
