"""Helpers for the passphrase tool's tests: LUKS images, escrow keys, checks with cryptsetup.

Everything is real: ``cryptsetup`` on image files with a fast PBKDF, RSA
escrow keys made with ``cryptography``.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from luks_passphrase.state import StateStore
from tests.helpers import ROOT

__all__ = ["ROOT", "FAST", "USER0", "BACKUP0", "OTHER", "need", "make_image", "add_key",
           "opens", "opens_fast", "active_slots", "luks_uuid", "EscrowKeys",
           "make_escrow_keys", "cli", "nss_db", "setup_volume", "dump_slots"]

FAST = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
USER0 = b"user passphrase zero"
BACKUP0 = b"AAAAA-BBBBB-CCCCC-DDDDD"
OTHER = b"another user passphrase"


def need(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed")


def make_image(path: Path, kind: str, passphrase: bytes = USER0) -> Path:
    """A LUKS image (kind "luks1" or "luks2") with *passphrase* in slot 0."""
    need("cryptsetup")
    with open(path, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    # a small LUKS2 key slot area (8 slots' worth) keeps header backups at 2 MiB
    small = ["--luks2-keyslots-size", "2M"] if kind == "luks2" else []
    subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", kind, *FAST, *small,
                    "--key-file", "-", str(path)], input=passphrase, check=True,
                   capture_output=True)
    return path


def add_key(image: Path, existing: bytes, new: bytes, slot: int, tmp: Path) -> None:
    keyfile = tmp / "existing.key"
    keyfile.write_bytes(existing)
    subprocess.run(["cryptsetup", "luksAddKey", "-q", *FAST, "--key-slot", str(slot),
                    "--key-file", str(keyfile), str(image), "-"],
                   input=new, check=True, capture_output=True)
    keyfile.unlink()


def opens(image: Path, passphrase: bytes, slot: int | None = None) -> bool:
    """``cryptsetup open --test-passphrase [--key-slot N]``: does it open?"""
    argv = ["cryptsetup", "open", "--test-passphrase", "--key-file", "-"]
    if slot is not None:
        argv += ["--key-slot", str(slot)]
    proc = subprocess.run(argv + [str(image)], input=passphrase, capture_output=True)
    return proc.returncode == 0


def opens_fast(image: Path, passphrase: bytes, slot: int | None = None) -> bool:
    """The same check in-process (libcryptsetup), for the many checks of the crash loops."""
    from luks_passphrase.libcryptsetup import LuksVolume, WrongPassphrase
    from mandos_core.secret import Secret

    with LuksVolume(image) as v:
        try:
            v.open_slot(Secret(passphrase), -1 if slot is None else slot)
        except WrongPassphrase:
            return False
    return True


def active_slots(image: Path) -> list[int]:
    from luks_passphrase.libcryptsetup import LuksVolume

    with LuksVolume(image) as v:
        return v.active_slots()


def dump_slots(image: Path) -> list[int]:
    """Active key slots as the ``cryptsetup`` program's ``luksDump`` shows them."""
    import json
    import re

    dump = subprocess.run(["cryptsetup", "luksDump", str(image)], capture_output=True,
                          check=True).stdout.decode()
    if dump.startswith("LUKS header information for"):  # LUKS1: "Key Slot 0: ENABLED"
        return [int(n) for n in re.findall(r"^Key Slot (\d+): ENABLED$", dump, re.M)]
    meta = subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(image)],
                          capture_output=True, check=True).stdout
    return sorted(int(n) for n in json.loads(meta)["keyslots"])


def luks_uuid(image: Path) -> str:
    return subprocess.run(["cryptsetup", "luksUUID", str(image)], check=True,
                          capture_output=True).stdout.decode().strip()


@dataclass(frozen=True)
class EscrowKeys:
    cert_pem: bytes
    key_pem: bytes
    cert: Path
    key: Path


def make_escrow_keys(directory: Path, high_serial: bool = False) -> EscrowKeys:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Escrow test"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Helpdesk")])
    now = datetime.datetime.now(datetime.UTC)
    serial = (1 << 151) | 12345 if high_serial else 0x1234567
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (directory / "escrow-cert.pem").write_bytes(cert_pem)
    (directory / "escrow-key.pem").write_bytes(key_pem)
    os.chmod(directory / "escrow-key.pem", 0o600)
    return EscrowKeys(cert_pem, key_pem, directory / "escrow-cert.pem",
                      directory / "escrow-key.pem")


def cli(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m luks_passphrase`` with passphrases on stdin."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "luks_passphrase", *args], input=stdin,
                          capture_output=True, env=full_env, timeout=timeout, cwd=ROOT)


def nss_db(directory: Path, keys: EscrowKeys) -> Path | None:
    """An NSS database holding the escrow key, for ``volume_key --secrets -d``."""
    if shutil.which("certutil") is None or shutil.which("pk12util") is None:
        return None
    db = directory / "nss"
    db.mkdir()
    subprocess.run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"], check=True,
                   capture_output=True)
    p12 = directory / "escrow.p12"
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import (
        NoEncryption,
        load_pem_private_key,
        pkcs12,
    )

    data = pkcs12.serialize_key_and_certificates(
        b"escrow", load_pem_private_key(keys.key_pem, None),  # type: ignore[arg-type]
        x509.load_pem_x509_certificate(keys.cert_pem), None, NoEncryption())
    p12.write_bytes(data)
    subprocess.run(["pk12util", "-i", str(p12), "-d", f"sql:{db}", "-W", ""], check=True,
                   capture_output=True)
    return db


def setup_volume(tmp: Path, kind: str, keys: EscrowKeys, extra_user: bool = False
                 ) -> tuple[Path, StateStore]:
    """USER0 in slot 0, the escrowed BACKUP0 in slot 1 (imported), OTHER in slot 2."""
    from luks_passphrase.flows import Tool
    from mandos_core import escrow_packet
    from mandos_core.secret import Secret

    tmp.mkdir(parents=True, exist_ok=True)
    image = make_image(tmp / "vol.img", kind)
    add_key(image, USER0, BACKUP0, 1, tmp)
    if extra_user:
        add_key(image, USER0, OTHER, 2, tmp)
    store = StateStore(tmp / "state")
    packet = escrow_packet.build(keys.cert_pem, Secret(BACKUP0), escrow_packet.Metadata(
        "testhost", luks_uuid(image), str(image), "crypt_LUKS", 1))
    Tool(store, certificate=keys.cert_pem).import_packet(str(image), escrow_packet.parse(packet))
    return image, store
