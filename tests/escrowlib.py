"""An escrow session from the machine's side, over real TLS, as ``luks-passphrase sync``
speaks it but under the test's control (send what an attacker would), and real
volume_key packets for it.  Used by the escrow security tests and the pool's.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mandos_core import escrow_packet
from mandos_core.escrow_wire import ESCROW_LINE, frame, json_frame, parse_json
from mandos_core.secret import Secret
from tests.tlspeers import Session

# -- the attacker's tools ---------------------------------------------------------------


@contextmanager
def escrow_tls(address: str, keydir: Path) -> Iterator[Session]:
    """An escrow session as the machine with the keys in *keydir* (TLS server role)."""
    with Session(keydir, address, ESCROW_LINE) as tls:
        yield tls


def _recv(tls: Session, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = tls.recv(n - len(buf))
        if not chunk:
            return buf
        buf += chunk
    return buf


def reply(tls: Session) -> dict[str, object] | None:
    """The server's answer, or None when it closed the connection without one."""
    header = _recv(tls, 4)
    if len(header) < 4:
        return None
    return parse_json(_recv(tls, int.from_bytes(header, "big")))


def send_store(tls: Session, packet: bytes, *, created: int | None = None) -> None:
    meta = escrow_packet.parse(packet).metadata
    tls.sendall(json_frame({"op": "store", "volume_uuid": meta.volume_uuid,
                            "created": int(time.time()) if created is None else created,
                            "sha256": hashlib.sha256(packet).hexdigest()}))
    tls.sendall(frame(packet))


def store(address: str, keydir: Path, packet: bytes, *,
          created: int | None = None) -> dict[str, object] | None:
    """One packet on one connection; the answer (None: closed without one)."""
    with escrow_tls(address, keydir) as tls:
        send_store(tls, packet, created=created)
        answer = reply(tls)
        if answer is not None:
            tls.sendall(frame(b""))
        return answer


def end_and_wait_closed(tls: Session) -> None:
    """Send the end marker and wait for the server to close (its log is then written)."""
    tls.sendall(frame(b""))
    assert _recv(tls, 1) == b""


@dataclasses.dataclass(frozen=True)
class EscrowCert:
    pem: bytes


def make_cert() -> EscrowCert:
    """A fresh escrow certificate (RSA, as the helpdesk's)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Escrow test")])
    now = datetime.datetime.now(datetime.UTC)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(4711)
         .not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    return EscrowCert(c.public_bytes(serialization.Encoding.PEM))


def packet(cert: EscrowCert, volume: str | None = None, *, host: str = "web1",
           pad: int = 0, slot: int = 1) -> bytes:
    """A real volume_key packet (a fresh one every call: RSA padding is random)."""
    return escrow_packet.build(cert.pem, Secret(b"abcde-fghij-klmno-pqrst"),
                               escrow_packet.Metadata(host, volume or str(uuidlib.uuid4()),
                                                      "/dev/sda2" + "p" * pad, "crypt_LUKS",
                                                      slot))
