"""Escrow packets against Debian's real volume_key, and the escrow exchange with mandosd.

- our format-3 packets (LUKS1 and LUKS2) are read by ``volume_key --dump
  --unencrypted`` and opened by ``volume_key --secrets`` with the private key
  in an NSS database;
- packets made by ``volume_key --create-random-passphrase`` on a LUKS1 image
  are imported by ``luks-passphrase import``, and their passphrase recovers;
- ``luks-passphrase sync`` against :func:`mandosd.escrow.handle_escrow`
  behind a small asyncio server doing the key server's TLS-client role.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from luks_passphrase.flows import Tool
from luks_passphrase.state import StateStore
from mandos_core import escrow_packet
from mandos_core.secret import Secret
from mandosd import escrow_cli
from mandosd.config import Client
from mandosd.escrow import EscrowStore, handle_escrow
from mandosd.state import ClientState
from tests.helpers import PASSWORD, Mandosd, fetch, free_port
from tests.lukslib import (
    BACKUP0,
    USER0,
    EscrowKeys,
    active_slots,
    cli,
    luks_uuid,
    make_escrow_keys,
    make_image,
    nss_db,
    opens,
    setup_volume,
)

USER1 = b"user passphrase one!"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> EscrowKeys:
    return make_escrow_keys(tmp_path_factory.mktemp("escrow"))


@pytest.fixture(scope="module")
def nss(tmp_path_factory: pytest.TempPathFactory, keys: EscrowKeys) -> Path:
    if shutil.which("volume_key") is None:
        pytest.skip("volume_key is not installed (apt-get install volume-key)")
    db = nss_db(tmp_path_factory.mktemp("nss"), keys)
    if db is None:
        pytest.skip("certutil/pk12util not installed (apt-get install libnss3-tools)")
    return db


def vk_dump(packet: Path) -> dict[str, str]:
    out = subprocess.run(["volume_key", "--dump", "--unencrypted", str(packet)], check=True,
                         capture_output=True).stdout.decode()
    return dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)


def vk_secret(packet: Path, db: Path) -> bytes:
    out = subprocess.run(["volume_key", "--secrets", "-b", "-d", str(db), str(packet)],
                         check=True, capture_output=True, stdin=subprocess.DEVNULL).stdout
    m = re.search(rb"^Passphrase:\t(.*)$", out, re.MULTILINE)
    assert m, out
    return m.group(1)


# -- packets and volume_key ----------------------------------------------------

@pytest.mark.parametrize("kind", ["luks1", "luks2"])
def test_volume_key_reads_our_packets(tmp_path: Path, kind: str, keys: EscrowKeys,
                                      nss: Path) -> None:
    image, store = setup_volume(tmp_path, kind, keys)
    Tool(store, certificate=keys.cert_pem, hostname="host.example").change(
        str(image), Secret(BACKUP0), lambda: Secret(USER1))
    st = store.load(luks_uuid(image))
    assert st.queue is not None and st.pending_backup is not None
    packet = tmp_path / "packet"
    packet.write_bytes(st.queue.packet)
    meta = vk_dump(packet)
    assert meta["Packet format"] == "Only secrets public key-encrypted"
    assert meta["Volume UUID"] == luks_uuid(image)
    assert meta["Passphrase slot"] == str(st.pending_backup.slot)
    assert meta["Host name"] == "host.example"
    assert meta["Volume path"] == str(image)
    assert meta["Volume format"] == "crypt_LUKS"
    secret = vk_secret(packet, nss)
    assert re.fullmatch(rb"[0-9A-Za-z./]{5}(-[0-9A-Za-z./]{5}){3}", secret)
    assert opens(image, secret, st.pending_backup.slot)


def test_serial_with_high_bit(tmp_path: Path) -> None:
    """NSS names a certificate by DER INTEGER content: a leading zero when the high bit is set."""
    if shutil.which("volume_key") is None:
        pytest.skip("volume_key is not installed")
    k = make_escrow_keys(tmp_path / "k", high_serial=True)
    db = nss_db(tmp_path, k)
    if db is None:
        pytest.skip("certutil/pk12util not installed")
    packet = tmp_path / "p"
    packet.write_bytes(escrow_packet.build(k.cert_pem, Secret(b"abcde-fghij-klmno-pqrst"),
                                           escrow_packet.Metadata("h", "u", "/dev/x",
                                                                  "crypt_LUKS", 3)))
    assert escrow_packet.parse(packet.read_bytes()).serial_der[0] == 0
    assert vk_secret(packet, db) == b"abcde-fghij-klmno-pqrst"


def test_import_packets_made_by_volume_key(tmp_path: Path, keys: EscrowKeys, nss: Path) -> None:
    image = make_image(tmp_path / "installed.img", "luks1")
    packet = tmp_path / "root" / f"{luks_uuid(image)}-escrow-backup-passphrase"
    packet.parent.mkdir()
    subprocess.run(["volume_key", "--save", "-b", str(image), "-c", str(keys.cert),
                    "--create-random-passphrase", str(packet),
                    "--output-format", "asymmetric_wrap_secret_only"],
                   input=USER0 + b"\0", check=True, capture_output=True)
    backup = vk_secret(packet, nss)
    slot = int(vk_dump(packet)["Passphrase slot"])
    assert opens(image, backup, slot)
    state = tmp_path / "state"
    proc = cli("--state-dir", str(state), "--crypttab", str(tmp_path / "none"),
               "import", str(packet), "--volume", str(image))
    assert proc.returncode == 0, proc.stderr
    st = StateStore(state).load(luks_uuid(image))
    assert st.current_backup is not None and st.current_backup.slot == slot
    # found by the packet's path when no volume is named
    proc = cli("--state-dir", str(state), "--crypttab", str(tmp_path / "none"), "import",
               str(packet))
    assert proc.returncode == 0, proc.stderr
    # (a recovery with it is the flow tested above; volume_key's slot has the default,
    # benchmarked PBKDF, so it is not repeated here)


def test_import_refuses_format_1(tmp_path: Path) -> None:
    """volume_key's format 1 envelops the metadata too: refused with a hint."""
    packet = tmp_path / "p"
    packet.write_bytes(b"\0volume_key\x01" + bytes(64))
    image = make_image(tmp_path / "v.img", "luks1")
    proc = cli("--state-dir", str(tmp_path / "s"), "import", str(packet), "--volume", str(image))
    assert proc.returncode == 1 and b"asymmetric_wrap_secret_only" in proc.stderr
    packet.write_bytes(b"garbage")
    proc = cli("--state-dir", str(tmp_path / "s"), "import", str(packet), "--volume", str(image))
    assert proc.returncode == 1 and b"not a volume_key escrow packet" in proc.stderr


# -- the escrow exchange -------------------------------------------------------

def machine_keys(directory: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    directory.mkdir(parents=True)
    k = ed25519.Ed25519PrivateKey.generate()
    (directory / "tls-privkey.pem").write_bytes(k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (directory / "tls-pubkey.pem").write_bytes(k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return directory


def standin_client(**kw: object) -> tuple[Client, ClientState]:
    """A known, enabled client1 (as mandosd's lookup would return it)."""
    base: dict[str, object] = dict(
        name="client1", key_id=None, fingerprint="", secret=b"pgp", host="client1",
        checker="true", timeout=300.0, interval=120.0, extended_timeout=900.0,
        approval_delay=0.0, approval_duration=1.0, approved_by_default=True, enabled=True)
    base.update(kw)
    return Client(**base), ClientState(name="client1", key_id=None, enabled=True,  # type: ignore[arg-type]
                                          deadline=None)


class EscrowServer:
    """The key server's side: `escrow 1` line, TLS client role, key_id, handle_escrow."""

    def __init__(self, statedir: Path) -> None:
        self.statedir = statedir
        self.store = EscrowStore(statedir, durable=False)
        self.client = standin_client()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.key_ids: list[str] = []

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._task = self.loop.create_task(self._serve())
        try:
            self.loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass

    async def _serve(self) -> None:
        from mandos_core import gnutls
        from mandosd import identity

        self.identity = identity.load_or_create(self.store.path.parent)
        self.cred = gnutls.Credentials()
        self.cred.set_rawpk(self.identity.spki_pem, self.identity.key_pem)
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        self.port = lsock.getsockname()[1]
        self.ready.set()
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(lsock)
            loop.create_task(self._conn(sock))

    async def _conn(self, sock: socket.socket) -> None:
        """The key server's side: `escrow 1` line, TLS client role, key_id, handle_escrow."""
        from mandos_core import gnutls
        from mandos_core.tls import AsyncTLS, effective_priority, peer_key
        from mandosd.server import tls_streams

        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        with sock:
            line = await asyncio.wait_for(loop.sock_recv(sock, 10), 5)
            if line != b"escrow 1\r\n":
                return
            with gnutls.Session(sock.fileno(), server=False, credentials=self.cred,
                                priority=effective_priority(None, server=True)) as session:
                tls = AsyncTLS(loop, sock.fileno(), session)
                await tls.handshake(loop.time() + 10)
                kid = peer_key(session).key_id
                self.key_ids.append(kid)
                reader, writer, pump = tls_streams(tls)
                try:
                    async def lookup() -> tuple[Client, ClientState]:
                        return self.client

                    await handle_escrow(reader, writer, key_id=kid,  # type: ignore[arg-type]
                                        peer="127.0.0.1", lookup=lookup,
                                        open_store=lambda: EscrowStore(self.statedir),
                                        reserve=0)
                finally:
                    pump.cancel()

    def __enter__(self) -> EscrowServer:
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._task.cancel)
        self.thread.join(5)


@pytest.fixture()
def escrow_server(tmp_path: Path) -> Iterator[EscrowServer]:
    with EscrowServer(tmp_path / "mandosd-state") as srv:
        yield srv


def test_sync_escrows_and_promotes(tmp_path: Path, keys: EscrowKeys,
                                   escrow_server: EscrowServer) -> None:
    image, store = setup_volume(tmp_path / "m", "luks2", keys)
    uuid = luks_uuid(image)
    Tool(store, certificate=keys.cert_pem).change(str(image), Secret(BACKUP0),
                                                  lambda: Secret(USER1))
    st = store.load(uuid)
    assert st.queue is not None and st.pending_backup is not None
    sha, pending = st.queue.sha256, st.pending_backup.slot
    keydir = machine_keys(tmp_path / "keys")
    pin(keydir, escrow_server.identity.key_id)
    proc = cli("--state-dir", str(store.dir), "sync", "--server",
               f"127.0.0.1:{escrow_server.port}", "--keydir", str(keydir))
    assert proc.returncode == 0, proc.stderr
    st = store.load(uuid)
    assert st.queue is None and st.pending_backup is None
    assert st.current_backup is not None and st.current_backup.slot == pending
    assert not opens(image, BACKUP0) and opens(image, USER1)
    assert sorted(active_slots(image)) == sorted({pending, *active_slots(image)})
    # the server holds it, under the machine's key_id
    from mandos_core.keyfiles import KeyFiles

    kid = KeyFiles.from_dir(keydir).key_id()
    assert escrow_server.key_ids == [kid]
    stored = escrow_server.store.current(kid, uuid)
    assert stored is not None and stored.sha256 == sha and stored.slot == pending
    # the helpdesk: list, export, read with the private key
    statedir = escrow_server.store.path.parent
    assert escrow_server.store.path.stat().st_mode & 0o777 == 0o600
    assert statedir.stat().st_mode & 0o777 == 0o700
    out = tmp_path / "exported"
    assert escrow_cli.main(["--statedir", str(statedir), "export", "client1", uuid,
                            "-o", str(out)]) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha
    secret = escrow_packet.unwrap(escrow_packet.parse(out.read_bytes()), keys.key_pem).reveal()
    assert opens(image, secret, pending)
    # nothing left to do
    proc = cli("--state-dir", str(store.dir), "sync", "--server",
               f"127.0.0.1:{escrow_server.port}", "--keydir", str(keydir))
    assert proc.returncode == 0 and b"Nothing queued" in proc.stdout


def test_escrow_cli_list_and_secrets(tmp_path: Path, keys: EscrowKeys,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    store = EscrowStore(tmp_path / "srv", durable=False)
    pkt = escrow_packet.build(keys.cert_pem, Secret(b"abcde-fghij-klmno-pqrst"),
                              escrow_packet.Metadata("web1", "12345678-1234-1234-1234-123456789abc",
                                                     "/dev/sda2", "crypt_LUKS", 2))
    store.store(key_id="A" * 64, client_name="web1",
                volume_uuid="12345678-1234-1234-1234-123456789abc", created=10, packet=pkt)
    # the packet received last is current, whatever the machine's created time says
    later = escrow_packet.build(keys.cert_pem, Secret(b"later-later-later-later"),
                                escrow_packet.Metadata("web1", "12345678-1234-1234-1234-123456789abc",
                                                       "/dev/sda2", "crypt_LUKS", 1))
    cur = store.store(key_id="A" * 64, client_name="web1",
                      volume_uuid="12345678-1234-1234-1234-123456789abc", created=5, packet=later)
    assert cur.slot == 1
    assert escrow_cli.main(["--statedir", str(tmp_path / "srv"), "list"]) == 0
    listing = capsys.readouterr().out
    assert "web1" in listing and "12345678-1234-1234-1234-123456789abc" in listing
    assert escrow_cli.main(["--statedir", str(tmp_path / "srv"), "list", "--history"]) == 0
    assert capsys.readouterr().out.count("12345678-1234-1234-1234-123456789abc") == 2
    p = tmp_path / "p"
    p.write_bytes(pkt)
    assert escrow_cli.main(["secrets", str(p), "--key", str(keys.key)]) == 0
    assert "abcde-fghij-klmno-pqrst" in capsys.readouterr().out


def test_sync_not_confirmed_keeps_everything(tmp_path: Path, keys: EscrowKeys,
                                             escrow_server: EscrowServer) -> None:
    image, store = setup_volume(tmp_path / "m", "luks1", keys)
    uuid = luks_uuid(image)
    Tool(store, certificate=keys.cert_pem).change(str(image), Secret(BACKUP0),
                                                  lambda: Secret(USER1))
    # the server refuses to keep it (no room in this client's quota): not confirmed
    escrow_server.client = standin_client(escrow_max_packets=0)
    keydir = machine_keys(tmp_path / "keys")
    pin(keydir, escrow_server.identity.key_id)
    proc = cli("--state-dir", str(store.dir), "sync", "--server",
               f"127.0.0.1:{escrow_server.port}", "--keydir", str(keydir))
    assert proc.returncode == 5, proc.stderr
    assert b"quota" in proc.stderr, proc.stderr
    assert opens(image, BACKUP0, 1)
    st = store.load(uuid)
    assert st.queue is not None and st.pending_backup is not None
    assert escrow_server.store.list() == []


def test_sync_server_unreachable(tmp_path: Path, keys: EscrowKeys) -> None:
    image, store = setup_volume(tmp_path / "m", "luks2", keys)
    Tool(store, certificate=keys.cert_pem).change(str(image), Secret(BACKUP0),
                                                  lambda: Secret(USER1))
    proc = cli("--state-dir", str(store.dir), "sync", "--server", f"127.0.0.1:{free_port()}",
               "--keydir", str(machine_keys(tmp_path / "keys")))
    assert proc.returncode == 1 and b"refused" in proc.stderr.lower()
    assert opens(image, BACKUP0, 1)


def test_hostile_peer_is_bounded(tmp_path: Path, escrow_server: EscrowServer) -> None:
    """An oversized frame after the handshake ends the session; the server stays up."""
    import struct

    from tests.tlspeers import exchange

    r = exchange(machine_keys(tmp_path / "keys"), f"127.0.0.1:{escrow_server.port}",
                 line=b"escrow 1\r\n", send_after=struct.pack(">I", 10**9))
    assert r.data == b""  # closed on us
    assert escrow_server.store.list() == []


def pin(keydir: Path, key_id: str) -> None:
    """Pin a key server's identity the way an admin does: the real mandos-keygen."""
    p = subprocess.run([sys.executable, "-m", "mandos_keygen", "--dir", str(keydir),
                        "--pin", key_id], capture_output=True)
    assert p.returncode == 0, p.stderr
    assert (keydir / "server-pins").stat().st_mode & 0o777 == 0o600


def _recovered_volume(tmp_path: Path, keys: EscrowKeys) -> tuple[Path, StateStore, int]:
    image, store = setup_volume(tmp_path / "m", "luks2", keys)
    Tool(store, certificate=keys.cert_pem).change(str(image), Secret(BACKUP0),
                                                  lambda: Secret(USER1))
    return image, store, sorted(active_slots(image)).__len__()


def test_attack_fake_escrow_server_without_pin_destroys_nothing(
        tmp_path: Path, keys: EscrowKeys, escrow_server: EscrowServer) -> None:
    """A host that answers as escrow server and acknowledges the packet's SHA-256 (it only
    has to echo what the machine sent) must not make `sync` destroy the escrowed backup
    slot when the machine never pinned a server identity."""
    image, store, _ = _recovered_volume(tmp_path, keys)
    slots = sorted(active_slots(image))
    keydir = machine_keys(tmp_path / "keys")  # no server-pins
    proc = cli("--state-dir", str(store.dir), "sync", "--server",
               f"127.0.0.1:{escrow_server.port}", "--keydir", str(keydir))
    assert proc.returncode == 5, proc.stderr
    assert b"not pinned" in proc.stdout + proc.stderr
    assert sorted(active_slots(image)) == slots
    assert opens(image, BACKUP0, 1)
    st = store.load(luks_uuid(image))
    assert st.queue is not None and st.pending_backup is not None


def test_attack_fake_escrow_server_with_another_identity(
        tmp_path: Path, keys: EscrowKeys, escrow_server: EscrowServer) -> None:
    """Pinned to the real key server; an impostor with its own key pair is not trusted."""
    image, store, _ = _recovered_volume(tmp_path, keys)
    slots = sorted(active_slots(image))
    keydir = machine_keys(tmp_path / "keys")
    pin(keydir, "AB" * 32)  # the real server's key_id, which the impostor cannot prove
    proc = cli("--state-dir", str(store.dir), "sync", "--server",
               f"127.0.0.1:{escrow_server.port}", "--keydir", str(keydir))
    assert proc.returncode != 0
    assert b"not a pinned escrow server" in proc.stderr
    assert sorted(active_slots(image)) == slots and opens(image, BACKUP0, 1)
    assert escrow_server.store.list() == []  # nothing was even sent


def test_hostile_frame_is_bounded_by_mandosd(mandosd: Mandosd, client_keys: Path) -> None:
    """A known machine sends an oversized escrow frame to the real mandosd: the session
    ends, nothing is stored, the audit log names it, and the server keeps serving."""
    import struct

    from tests.tlspeers import exchange

    r = exchange(client_keys, mandosd.address, line=b"escrow 1\r\n",
                 send_after=struct.pack(">I", 10**9))  # a frame "of 1 GB"
    assert r.data == b""  # closed on us, nothing answered
    log = mandosd.wait_log("MANDOS_REASON=escrow-protocol")
    line = next(ln for ln in log.splitlines() if "MANDOS_REASON=escrow-protocol" in ln)
    assert "MANDOS_CLIENT=client1" in line, line
    assert EscrowStore(mandosd.statedir, durable=False).list() == []
    assert fetch(client_keys, mandosd.address).stdout == PASSWORD
    assert mandosd.proc is not None and mandosd.proc.poll() is None


def test_sync_with_the_real_mandosd(tmp_path: Path, keys: EscrowKeys, mandosd: object,
                                    client_keys: Path) -> None:
    """End to end: `luks-passphrase sync` to a running mandosd (client1 enrolled)."""
    image, store = setup_volume(tmp_path / "m", "luks2", keys)
    uuid = luks_uuid(image)
    Tool(store, certificate=keys.cert_pem).change(str(image), Secret(BACKUP0),
                                                  lambda: Secret(USER1))
    st = store.load(uuid)
    assert st.queue is not None and st.pending_backup is not None
    sha, pending = st.queue.sha256, st.pending_backup.slot
    ident = subprocess.run([sys.executable, "-m", "mandosd.ctl", "identity", "--configdir",
                            str(mandosd.configdir), "--statedir", str(mandosd.statedir)],
                           capture_output=True, text=True)
    assert ident.returncode == 0, ident.stderr
    kid = ident.stdout.strip()
    (store.dir / "escrow-servers").write_text(f"# the key server\n{mandosd.address} {kid}\n")
    proc = cli("--state-dir", str(store.dir), "sync", "--keydir", str(client_keys))
    assert proc.returncode == 0, proc.stderr + mandosd.log().encode()
    assert not opens(image, BACKUP0)
    st = store.load(uuid)
    assert st.current_backup is not None and st.current_backup.slot == pending
    out = tmp_path / "exported"
    assert escrow_cli.main(["--statedir", str(mandosd.statedir), "export", "client1", uuid,
                            "-o", str(out)]) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha
    secret = escrow_packet.unwrap(escrow_packet.parse(out.read_bytes()), keys.key_pem)
    assert opens(image, secret.reveal(), pending)
    assert secret.reveal().decode() not in mandosd.log()


def test_sync_unknown_machine_is_refused_by_mandosd(tmp_path: Path, keys: EscrowKeys,
                                                    mandosd: Mandosd) -> None:
    image, store = setup_volume(tmp_path / "m", "luks1", keys)
    Tool(store, certificate=keys.cert_pem).change(str(image), Secret(BACKUP0),
                                                  lambda: Secret(USER1))
    proc = cli("--state-dir", str(store.dir), "sync", "--server", mandosd.address,
               "--keydir", str(machine_keys(tmp_path / "stranger")))
    assert proc.returncode != 0
    assert opens(image, BACKUP0, 1) and store.load(luks_uuid(image)).queue is not None
