"""The escrow endpoint from the attacker's side (issue 11, items 4, 9 and 16).

A machine (or whoever holds its TLS key) talks to the real mandosd over real
TLS, as ``luks-passphrase sync`` would, and tries what the review found: to
escrow after it was disabled or removed, to fill the server's disk, to pin a
packet as current with a forged ``created`` time, to store the same packet
again and again, and to forge rows in ``mandos-ctl escrow list`` with
terminal escapes.  The decision itself is also tested as a pure function.

The TLS connect code is in one helper (:func:`escrow_tls`), so that it can
follow the server's TLS library when that changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mandos_core import escrow_packet
from mandos_core.escrow_wire import MAX_REQUESTS, json_frame
from mandos_core.text import printable
from mandosd import escrow_policy
from mandosd.audit import Kind
from mandosd.config import Client
from mandosd.escrow import EscrowStore
from mandosd.escrow_policy import EscrowVerdict, Kept, Upload, Usage, escrow_decision
from mandosd.state import ClientState, SQLiteStore
from tests.escrowlib import (
    EscrowCert,
    end_and_wait_closed,
    escrow_tls,
    make_cert,
    packet,
    reply,
    send_store,
    store,
)
from tests.helpers import PASSWORD, Mandosd, ctl, enroll, fetch, make_keys, tool


@pytest.fixture(scope="module")
def cert() -> EscrowCert:
    return make_cert()


def logged(srv: Mandosd, kind: Kind) -> list[str]:
    return [line for line in srv.log().splitlines() if f"MESSAGE_ID={kind.value}" in line]


def kept(srv: Mandosd) -> list[escrow_packet.Metadata]:
    s = EscrowStore(srv.statedir, durable=False)
    try:
        return [escrow_packet.parse(p.packet).metadata for p in s.list(history=True)]
    finally:
        s.close()


# -- known and enabled, as for secrets ---------------------------------------------------

@pytest.mark.parametrize("how", ["disable", "remove", "timeout"])
def test_upload_after_disable_is_refused(mandosd: Mandosd, client_keys: Path,
                                         cert: EscrowCert, how: str) -> None:
    """``mandos-ctl -d`` / ``-r`` / a passed deadline: nothing stored, no acknowledgement."""
    first = store(mandosd.address, client_keys, packet(cert))
    assert first is not None and first["ok"], mandosd.log()
    with escrow_tls(mandosd.address, client_keys) as tls:
        send_store(tls, packet(cert))  # within a session: still allowed
        assert (reply(tls) or {}).get("ok"), mandosd.log()
        if how == "timeout":  # the deadline passed without a successful checker
            st = SQLiteStore(mandosd.statedir)
            st.update("client1", deadline=time.time() - 1)
            st.close()
        else:
            p = ctl(mandosd, f"--{how}", "client1")
            assert p.returncode == 0, p.stderr
        send_store(tls, packet(cert, host="after"))
        assert reply(tls) is None  # closed, no acknowledgement
    # and a new session is refused the same way, before anything is read
    assert store(mandosd.address, client_keys, packet(cert, host="after")) is None
    assert [m.host_name for m in kept(mandosd)] == ["web1", "web1"]
    kind = {"disable": Kind.ESCROW_REFUSED_DISABLED, "remove": Kind.ESCROW_REFUSED_UNKNOWN,
            "timeout": Kind.ESCROW_REFUSED_TIMED_OUT}[how]
    refusals = logged(mandosd, kind)
    assert len(refusals) == 2 and all("MANDOS_CLIENT=client1" in r for r in refusals), \
        mandosd.log()
    assert "MANDOS_REASON=" in refusals[0]
    assert len(logged(mandosd, Kind.ESCROW_STORED)) == 2


def test_unknown_key_is_refused(mandosd: Mandosd, tmp_path: Path, cert: EscrowCert) -> None:
    stranger = make_keys(tmp_path / "stranger", "stranger")
    assert store(mandosd.address, stranger, packet(cert)) is None
    assert kept(mandosd) == []
    assert len(logged(mandosd, Kind.ESCROW_REFUSED_UNKNOWN)) == 1, mandosd.log()


# -- quota, rate, duplicates -------------------------------------------------------------

def test_sixteen_requests_on_one_connection(mandosd: Mandosd, client_keys: Path,
                                            cert: EscrowCert) -> None:
    """Exactly MAX_REQUESTS requests and the end marker: no protocol error (was off by one)."""
    with escrow_tls(mandosd.address, client_keys) as tls:
        for _ in range(MAX_REQUESTS):
            send_store(tls, packet(cert))
            assert (reply(tls) or {}).get("ok"), mandosd.log()
        end_and_wait_closed(tls)
    assert len(kept(mandosd)) == MAX_REQUESTS
    assert "more than" not in mandosd.log()
    assert not [line for line in mandosd.log().splitlines()
                if "escrow" in line and Kind.PROTOCOL_ERROR.value in line], mandosd.log()
    # one more is still too many
    with escrow_tls(mandosd.address, client_keys) as tls:
        for _ in range(MAX_REQUESTS):
            tls.sendall(json_frame({"op": "status", "volume_uuid": str(uuidlib.uuid4())}))
            assert reply(tls) is not None
        tls.sendall(json_frame({"op": "status", "volume_uuid": str(uuidlib.uuid4())}))
        assert reply(tls) is None
    assert f"more than {MAX_REQUESTS} requests" in mandosd.log()


def test_seventeenth_volume_over_quota(mandosd: Mandosd, client_keys: Path,
                                       cert: EscrowCert) -> None:
    """16 packets kept per client by default; a 17th volume is refused, not acknowledged."""
    volumes = [str(uuidlib.uuid4()) for _ in range(17)]
    with escrow_tls(mandosd.address, client_keys) as tls:
        for v in volumes[:16]:
            send_store(tls, packet(cert, v))
            assert (reply(tls) or {}).get("ok"), mandosd.log()
        end_and_wait_closed(tls)
    answer = store(mandosd.address, client_keys, packet(cert, volumes[16]))
    assert answer is not None and answer["ok"] is False and "quota" in str(answer["error"])
    assert volumes[16] not in {m.volume_uuid for m in kept(mandosd)}
    assert len(logged(mandosd, Kind.ESCROW_REFUSED_QUOTA)) == 1, mandosd.log()
    # a new packet for a volume it has (a backup passphrase rotated) still fits:
    # the superseded packet is pruned
    newer = packet(cert, volumes[0], slot=5)
    answer = store(mandosd.address, client_keys, newer)
    assert answer is not None and answer["sha256"] == hashlib.sha256(newer).hexdigest()
    slots = {m.volume_uuid: m.passphrase_slot for m in kept(mandosd)}
    assert len(kept(mandosd)) == 16 and slots[volumes[0]] == 5
    assert len(logged(mandosd, Kind.ESCROW_PRUNED)) == 1, mandosd.log()


def test_rate_limit(tmp_path: Path, client_section: str, client_keys: Path,
                    cert: EscrowCert) -> None:
    """escrow_uploads_per_hour counts packets stored, even those pruned since."""
    conf = "[DEFAULT]\nescrow_uploads_per_hour = 3\nescrow_max_packets = 2\n\n"
    with Mandosd(tmp_path / "srv", sections=[conf + client_section]) as srv:
        volume = str(uuidlib.uuid4())
        for _ in range(3):
            assert (store(srv.address, client_keys, packet(cert, volume)) or {}).get("ok")
        answer = store(srv.address, client_keys, packet(cert, volume))
        assert answer is not None and answer["ok"] is False
        assert "escrow_uploads_per_hour" in str(answer["error"])
        assert len(kept(srv)) == 2
        assert len(logged(srv, Kind.ESCROW_REFUSED_RATE)) == 1, srv.log()


def test_duplicate_is_acknowledged_not_stored(mandosd: Mandosd, client_keys: Path,
                                              cert: EscrowCert) -> None:
    p = packet(cert)
    first = store(mandosd.address, client_keys, p)
    again = store(mandosd.address, client_keys, p)
    assert first is not None and again is not None
    assert again["ok"] and again["sha256"] == first["sha256"] == hashlib.sha256(p).hexdigest()
    assert again["sequence"] == first["sequence"]
    assert len(kept(mandosd)) == 1
    assert len(logged(mandosd, Kind.ESCROW_DUPLICATE)) == 1, mandosd.log()


def test_forged_future_created_cannot_stay_current(mandosd: Mandosd, client_keys: Path,
                                                   cert: EscrowCert) -> None:
    """A packet claiming to be made in 2100 is not current forever: receive order decides."""
    volume = str(uuidlib.uuid4())
    forged = packet(cert, volume, slot=1)
    year_2100 = 4_102_444_800
    before = time.time()
    answer = store(mandosd.address, client_keys, forged, created=year_2100)
    assert answer is not None and answer["ok"]
    assert before - 1 <= int(answer["created"]) <= time.time()  # type: ignore[call-overload]
    honest = packet(cert, volume, slot=2)
    answer = store(mandosd.address, client_keys, honest)
    assert answer is not None and answer["sha256"] == hashlib.sha256(honest).hexdigest()
    s = EscrowStore(mandosd.statedir, durable=False)
    try:
        assert all(p.created <= time.time() for p in s.list(history=True))
    finally:
        s.close()
    stored = logged(mandosd, Kind.ESCROW_STORED)
    assert "in the future" in stored[0] and str(year_2100) in stored[0], mandosd.log()


# -- a full disk -------------------------------------------------------------------------

@pytest.fixture()
def small_statedir(tmp_path: Path) -> Iterator[Path]:
    """The state directory on its own 8 MiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    statedir = tmp_path / "srv" / "state"
    statedir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs",
                    str(statedir)], check=True)
    try:
        yield statedir
    finally:
        subprocess.run(["umount", "-l", str(statedir)], check=False)


def test_one_client_cannot_fill_the_disk(tmp_path: Path, small_statedir: Path,
                                         client_section: str, client_keys: Path,
                                         cert: EscrowCert) -> None:
    """With no quota to stop it, escrow stops at escrow_reserve; every machine still unlocks."""
    other = make_keys(tmp_path / "k2", "client2")
    conf = ("[DEFAULT]\nescrow_max_packets = 10000\nescrow_max_bytes = 1G\n"
            "escrow_uploads_per_hour = 10000\n\n")
    srv = Mandosd(tmp_path / "srv", sections=[conf + client_section,
                                              enroll(other, b"second", "client2", "127.0.0.1")])
    reserve = 2 << 20
    (srv.configdir / "mandos.conf").write_text(f"[DEFAULT]\nescrow_reserve = {reserve}\n")
    with srv:
        refused = None
        for _ in range(20):  # at most 20 x 16 x 61 KB = 19 MB offered to an 8 MiB disk
            with escrow_tls(srv.address, client_keys) as tls:
                for _ in range(MAX_REQUESTS):
                    send_store(tls, packet(cert, pad=60_000))
                    answer = reply(tls)
                    assert answer is not None, srv.log()
                    if not answer["ok"]:
                        refused = answer
                        break
            if refused:
                break
        assert refused is not None and "escrow_reserve" in str(refused["error"]), srv.log()
        st = os.statvfs(small_statedir)
        assert st.f_bavail * st.f_frsize >= reserve - (256 << 10)
        assert logged(srv, Kind.ESCROW_REFUSED_DISK), srv.log()
        assert not logged(srv, Kind.ESCROW_FAILED), srv.log()
        # both machines still get their secrets (each one recorded in the state database)
        assert fetch(client_keys, srv.address).stdout == PASSWORD, srv.log()
        assert fetch(other, srv.address).stdout == b"second", srv.log()


def test_large_upload_right_after_the_handshake_is_not_lost(
        tmp_path: Path, client_section: str, client_keys: Path, cert: EscrowCert) -> None:
    """Issue 11 item 10: a 61 KB packet sent as the very first bytes after the handshake
    (arriving together with the end of it) is stored whole, every time: GnuTLS holds
    what it received, and the escrow handler reads it from the same session."""
    with Mandosd(tmp_path / "srv", sections=[client_section]) as srv:
        for _ in range(5):
            big = packet(cert, pad=60_000)
            assert len(big) > 60_000
            answer = store(srv.address, client_keys, big)
            assert answer is not None and answer["ok"], srv.log()[-2000:]
            assert answer["sha256"] == hashlib.sha256(big).hexdigest()


# -- operator output ---------------------------------------------------------------------

FORGED = "web1\x1b[2K\rclient9  4242  forged row\x07"


def test_escrow_list_escapes_host_name(mandosd: Mandosd, client_keys: Path,
                                       cert: EscrowCert) -> None:
    assert (store(mandosd.address, client_keys, packet(cert, host=FORGED)) or {}).get("ok")
    for args in (["list"], ["list", "--history"]):
        p = subprocess.run([tool("mandos-ctl"), "escrow", "--statedir", str(mandosd.statedir),
                            *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", p.stdout), repr(p.stdout)
        assert "web1\\x1b[2K\\rclient9  4242  forged row\\x07" in p.stdout
        assert len(p.stdout.splitlines()) == 2


def test_ctl_table_escapes_client_text(tmp_path: Path, client_section: str) -> None:
    forged = FORGED.replace("\r", "\x1b[1A")  # a \r would end the line in clients.conf
    section = client_section.replace("host = 127.0.0.1", f"host = {forged}")
    assert forged in section
    with Mandosd(tmp_path / "srv", sections=[section]) as srv:  # makes the state store
        p = ctl(srv, "--verbose")
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "\r" not in p.stdout
    assert "web1\\x1b[2K\\x1b[1Aclient9" in p.stdout


def test_printable() -> None:
    assert printable("web1") == "web1"
    assert printable("a\x1b[2K\rb\u202e\\") == "a\\x1b[2K\\rb\\u202e\\\\"
    assert printable("caf\u00e9 \U0001f600") == "caf\u00e9 \U0001f600"


# -- the decision as a pure function -----------------------------------------------------

T0 = 1_700_000_000.0


def client(**kw: object) -> Client:
    base: dict[str, object] = dict(
        name="web1", key_id="A" * 64, fingerprint="", secret=b"pgp", host="web1",
        checker="true", timeout=300.0, interval=120.0, extended_timeout=900.0,
        approval_delay=0.0, approval_duration=1.0, approved_by_default=True, enabled=True)
    base.update(kw)
    return Client(**base)  # type: ignore[arg-type]


def state(**kw: object) -> ClientState:
    base: dict[str, object] = dict(name="web1", key_id="A" * 64, enabled=True,
                                   deadline=T0 + 300)
    base.update(kw)
    return ClientState(**base)  # type: ignore[arg-type]


def up(volume: str = "v1", sha: str = "new", size: int = 1000, created: int = int(T0)) -> Upload:
    return Upload(volume, sha, size, created)


NOTHING_KEPT = Usage()


def decide(usage: Usage = NOTHING_KEPT, upload: Upload | None = None, *, c: Client | None = None,
           s: ClientState | None = None, now: float = T0, reserve: int = 0
           ) -> escrow_policy.EscrowDecision:
    return escrow_decision(c or client(), s or state(), usage, upload or up(), now,
                           reserve=reserve)


def test_policy_known_enabled_as_for_secrets() -> None:
    assert escrow_decision(None, None, Usage(), up(), T0, reserve=0).verdict \
        is EscrowVerdict.UNKNOWN
    assert decide(s=state(enabled=False)).verdict is EscrowVerdict.DISABLED
    assert decide(s=state(source="removed")).verdict is EscrowVerdict.UNKNOWN
    assert decide(s=state(deadline=T0 - 1)).verdict is EscrowVerdict.TIMED_OUT
    # approval is for secrets, not escrow
    assert decide(c=client(approval_delay=60.0)).verdict is EscrowVerdict.STORE
    assert decide(c=client(approved_by_default=False)).verdict is EscrowVerdict.STORE
    for v in (EscrowVerdict.UNKNOWN, EscrowVerdict.DISABLED, EscrowVerdict.TIMED_OUT):
        assert v.refused and v.silent


def test_policy_duplicate_before_limits() -> None:
    usage = Usage([Kept(7, "v1", "new", 1000)], [T0] * 100, free_bytes=0)
    d = decide(usage)
    assert d.verdict is EscrowVerdict.DUPLICATE and d.duplicate_of == 7 and not d.verdict.refused


def test_policy_rate_counts_the_last_hour_only() -> None:
    c = client(escrow_uploads_per_hour=2)
    assert decide(Usage(uploads=[T0 - 10, T0 - 20]), c=c).verdict is EscrowVerdict.RATE
    assert decide(Usage(uploads=[T0 - 10, T0 - 3600]), c=c).verdict is EscrowVerdict.STORE


def test_policy_disk_reserve() -> None:
    assert decide(Usage(free_bytes=10_000), up(size=1000), reserve=9000).verdict \
        is EscrowVerdict.DISK
    assert decide(Usage(free_bytes=11_000), up(size=1000), reserve=9000).verdict \
        is EscrowVerdict.STORE
    assert decide(Usage(free_bytes=None), reserve=1 << 40).verdict is EscrowVerdict.STORE


def test_policy_quota_prunes_superseded_oldest_first() -> None:
    c = client(escrow_max_packets=3, escrow_max_bytes=10_000)
    # v1: 1 (superseded), 2 (current); v2: 3 (current)
    kept_ = [Kept(1, "v1", "a", 100), Kept(2, "v1", "b", 100), Kept(3, "v2", "c", 100)]
    d = decide(Usage(kept_), up("v3"), c=c)
    assert d.verdict is EscrowVerdict.STORE and d.prune == (1,)
    # a new packet for v2 may replace v2's current one, but v1's is older and superseded
    assert decide(Usage(kept_), up("v2"), c=c).prune == (1,)
    # only current packets of other volumes: refused
    full = [Kept(1, "v1", "a", 100), Kept(2, "v2", "b", 100), Kept(3, "v3", "c", 100)]
    assert decide(Usage(full), up("v4"), c=c).verdict is EscrowVerdict.QUOTA
    assert decide(Usage(full), up("v3"), c=c).prune == (3,)
    # bytes: a big packet prunes as many superseded ones as it needs
    big = [Kept(1, "v1", "a", 4000), Kept(2, "v1", "b", 4000), Kept(3, "v1", "c", 1000)]
    assert decide(Usage(big), up("v1", size=5000), c=c).prune == (1,)
    assert decide(Usage(big), up("v2", size=5000), c=c).prune == (1,)
    assert decide(Usage(big), up("v2", size=9500), c=c).verdict is EscrowVerdict.QUOTA
    assert decide(Usage(), up(size=20_000), c=c).verdict is EscrowVerdict.QUOTA
    assert decide(c=client(escrow_max_packets=0)).verdict is EscrowVerdict.QUOTA


def test_policy_created_never_after_receipt() -> None:
    d = decide(upload=up(created=int(T0) + 10**9))
    assert d.verdict is EscrowVerdict.STORE and d.created == int(T0)
    assert "in the future" in d.reason
    assert decide(upload=up(created=int(T0) - 5)).created == int(T0) - 5
    small_skew = decide(upload=up(created=int(T0) + 30))
    assert small_skew.created == int(T0) and "future" not in small_skew.reason


def test_escrow_settings_parse(tmp_path: Path, client_section: str) -> None:
    from mandosd import config as configmod

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "clients.conf").write_text("[DEFAULT]\nescrow_max_bytes = 512K\n\n" + client_section
                                       + "escrow_max_packets = 4\n")
    (conf / "clients.conf").chmod(0o600)
    (conf / "mandos.conf").write_text("[DEFAULT]\nescrow_reserve = 1G\n")
    cfg = configmod.load(conf)
    c = cfg.clients["client1"]
    assert (c.escrow_max_packets, c.escrow_max_bytes, c.escrow_uploads_per_hour) == \
        (4, 512 << 10, 32)
    assert cfg.server.escrow_reserve == 1 << 30
    (conf / "clients.conf").write_text("[DEFAULT]\nescrow_max_bytes = lots\n\n" + client_section)
    with pytest.raises(configmod.ConfigError, match=r"\[client1\] escrow_max_bytes=lots"):
        configmod.load(conf)
