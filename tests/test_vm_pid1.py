"""Our server package under a real systemd PID 1: a full Debian 12 VM.

The root file system is built from Debian's archive with mmdebstrap (cached),
the packages with dpkg-buildpackage from this checkout; the guest boots under
QEMU (TCG) with systemd as PID 1 and no network but one forwarded port.  From
the host, through the test runner on the second serial port, it shows:

1. ``dpkg -i`` enables and starts mandosd.socket and mandosd-checker.timer the
   Debian way, creates the _mandos-checker user and the default /etc/mandos;
2. the first connection (our mandos-client on the host, through QEMU's
   hostfwd) starts mandosd.service, which serves the secret; the service
   exits when idle and the next connection starts it again;
3. the hardened unit really runs: no sandbox failure in the journal, and the
   running process has seccomp, no_new_privs, no capabilities and its own
   network namespace; ``systemctl show`` has the sandbox;
4. mandosd-checker.timer fires and the checker's success lands in the state
   (``mandos-ctl -v``);
5. ``journalctl MANDOS_CLIENT=…`` shows the decision with its MESSAGE_ID, and
   ``journalctl --catalog`` explains it;
5b. the LUKS2 test VM (vmlib), its initrd built from our client packages'
   dracut module, unlocks its root with the secret from the server VM;
6. ``dpkg --purge`` leaves no unit, no enablement link, no user, no state.

And, in a chroot of a Debian Mandos server (no boot needed): replacing Debian's
``mandos`` with our server keeps an edited /etc/mandos as it was, without a
conffile question, mandosd loads it, and a later purge of the replaced
``mandos`` no longer deletes it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import pid1lib, vmlib
from tests.helpers import enroll, fetch, free_port, make_keys

pytestmark = pytest.mark.vm

_reason = pid1lib.skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

PASSWORD = b"pid1 passphrase \xc3\xa9 !"
LUKS_PASSPHRASE = b"luks root from the server VM"
SECRET_SENT = "c89c15b2b5a2472f9bb353e320140d6f"
CHECKER_OK = "f2653064d33f4dc09ab048ac8ad9bdb5"
SERVER_DEBS = ("python3-mandos-nbde", "mandos-nbde-server")


@dataclass
class Booted:
    guest: pid1lib.Guest
    keys: Path
    port: int
    timings: dict[str, float]


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    t = time.monotonic()
    built = pid1lib.build_debs(tmp_path_factory.mktemp("debs"))
    print(f"\npid1 VM: dpkg-buildpackage: {time.monotonic() - t:.1f} s")
    assert set(SERVER_DEBS) <= set(built), f"built: {sorted(built)}"
    return built


def test_lintian_clean(debs: dict[str, Path]) -> None:
    """No lintian error or warning; each override in debian/*.lintian-overrides says why."""
    if shutil.which("lintian") is None:
        pytest.skip("lintian missing (apt-get install lintian)")
    proc = subprocess.run(["lintian", "--fail-on", "error,warning", "--pedantic",
                           *map(str, debs.values())], capture_output=True, text=True,
                          timeout=600, env=pid1lib.CLEAN_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory, debs: dict[str, Path]) -> Iterator[Booted]:
    work = tmp_path_factory.mktemp("pid1")
    timings: dict[str, float] = {}
    t = time.monotonic()
    rootfs = pid1lib.cached_rootfs(work / "mmdebstrap.log")
    timings["rootfs (mmdebstrap, cached)"] = time.monotonic() - t
    found = vmlib.find_kernel()
    assert found
    kernel, kver = found
    t = time.monotonic()
    initrd = pid1lib.cached_initrd(work, kver)
    image = pid1lib.make_image(work, pid1lib.cached_base_image(rootfs),
                               [debs[p] for p in SERVER_DEBS])
    timings["initrd + image"] = time.monotonic() - t
    keys = make_keys(work / "keys", "client1")
    port = free_port()
    guest = pid1lib.Guest(kernel, initrd, image, work, port)
    t = time.monotonic()
    guest.start()
    try:
        guest.connect_runner(timeout=300)
        timings["boot to runner"] = time.monotonic() - t
        yield Booted(guest, keys, port, timings)
    finally:
        guest.stop()
        print("\n".join(f"pid1 VM: {k}: {v:.1f} s" for k, v in timings.items()))


def test_server_package_under_systemd(booted: Booted) -> None:
    g, timings = booted.guest, booted.timings
    assert g.run("cat", "/proc/1/comm").check().out.strip() == "systemd"

    # -- 1. install: the socket and the timer are enabled and started by the package
    t = time.monotonic()
    debs = g.sh("ls /root/debs/*.deb").check().out.split()
    g.run("dpkg", "-i", *debs, timeout=600).check()
    timings["dpkg -i"] = time.monotonic() - t
    for unit in ("mandosd.socket", "mandosd-checker.timer"):
        assert g.run("systemctl", "is-enabled", unit).out.strip() == "enabled", unit
        assert g.run("systemctl", "is-active", unit).out.strip() == "active", unit
    assert g.run("systemctl", "is-active", "mandosd.service").out.strip() == "inactive"
    assert g.run("getent", "passwd", "_mandos-checker").rc == 0  # checkers run as it
    assert g.sh("stat -c '%a %U' /etc/mandos/clients.conf").check().out.split() == ["600", "root"]
    listen = g.run("systemctl", "show", "-p", "Listen", "mandosd.socket").check().out
    assert "0.0.0.0:9439 (Stream)" in listen and "[::]:9439 (Stream)" in listen

    # Enroll the client; a short idle timeout (the documented /etc/default knob).
    section = enroll(booted.keys, PASSWORD, "client1", host="127.0.0.1")
    g.run("tee", "-a", "/etc/mandos/clients.conf", stdin=section.encode()).check()
    g.run("sed", "-i", 's/^MANDOSD_OPTIONS=.*/MANDOSD_OPTIONS="--idle-timeout 15"/',
          "/etc/default/mandosd").check()

    # -- 2. the first connection starts the service, which serves the secret
    t = time.monotonic()
    got = fetch(booted.keys, f"127.0.0.1:{booted.port}", timeout=90)
    timings["first fetch (socket activation)"] = time.monotonic() - t
    assert got.returncode == 0, got.stderr.decode()
    assert got.stdout == PASSWORD
    first = g.run("systemctl", "show", "-p", "InvocationID", "--value", "mandosd.service")
    assert first.check().out.strip()

    # -- 3. the sandbox is applied and the hardened service ran without a failure
    props = dict(line.split("=", 1) for line in g.run(
        "systemctl", "show", "mandosd.service", "-p", "NoNewPrivileges", "-p", "ProtectSystem",
        "-p", "PrivateNetwork", "-p", "PrivateUsers", "-p", "CapabilityBoundingSet",
        "-p", "RestrictAddressFamilies", "-p", "SystemCallFilter", "-p", "MainPID",
        "-p", "ProtectProc", "-p", "MemoryDenyWriteExecute").check().out.splitlines())
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["PrivateNetwork"] == "yes" and props["PrivateUsers"] == "yes"
    assert props["CapabilityBoundingSet"] == ""
    assert props["RestrictAddressFamilies"] == "AF_UNIX"
    assert props["ProtectProc"] == "invisible" and props["MemoryDenyWriteExecute"] == "yes"
    assert len(props["SystemCallFilter"].split()) > 50
    pid = props["MainPID"]
    status = g.run("cat", f"/proc/{pid}/status").check().out
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["Seccomp"].strip() == "2", "no seccomp filter on the running server"
    assert fields["NoNewPrivs"].strip() == "1"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    netns_server = g.run("readlink", f"/proc/{pid}/ns/net").check().out
    assert netns_server != g.run("readlink", "/proc/1/ns/net").check().out
    journal = g.run("journalctl", "-b", "-o", "cat", "-u", "mandosd.service",
                    "-u", "mandosd.socket", "-u", "mandosd-checker.service").check().out
    for bad in ("SystemCallFilter", "Operation not permitted", "Read-only file system",
                "status=31/SYS", "Permission denied", "Traceback", "Failed to"):
        assert bad not in journal, f"{bad!r} in the journal:\n{journal}"

    # -- the service exits when idle; the next connection starts it again
    g.wait_until("! systemctl -q is-active mandosd.service", timeout=120).check()
    assert g.run("systemctl", "is-active", "mandosd.socket").out.strip() == "active"
    got = fetch(booted.keys, f"127.0.0.1:{booted.port}", timeout=90)
    assert got.returncode == 0 and got.stdout == PASSWORD, got.stderr.decode()
    second = g.run("systemctl", "show", "-p", "InvocationID", "--value", "mandosd.service")
    assert second.check().out.strip() not in ("", first.out.strip())
    result = g.run("systemctl", "show", "-p", "NRestarts", "--value", "mandosd.service").check()
    assert result.out.strip() == "0"

    # -- 4. the checker timer fires and the result lands in the state
    t = time.monotonic()
    g.wait_until(f"journalctl -q -o cat MESSAGE_ID={CHECKER_OK} MANDOS_CLIENT=client1 | grep -q .",
                 timeout=180).check()
    timings["checker success after enrolling"] = time.monotonic() - t
    ctl = g.run("mandos-ctl", "-j", "client1").check().out
    client = json.loads(ctl)["client1"]
    assert client["LastCheckedOK"], ctl
    assert client["LastCheckerStatus"] == 0, ctl
    verbose = g.run("mandos-ctl", "-v", "client1").check().out
    assert "client1" in verbose
    assert g.run("systemctl", "show", "-p", "Result", "--value",
                 "mandosd-checker.service").check().out.strip() == "success"

    # -- 5. the audit: the decision, its MESSAGE_ID, and the catalog's words
    entries = [json.loads(line) for line in g.run(
        "journalctl", "-o", "json", "MANDOS_CLIENT=client1",
        f"MESSAGE_ID={SECRET_SENT}").check().out.splitlines()]
    assert len(entries) >= 2, entries
    assert all(e["MANDOS_OUTCOME"] == "secret-sent" for e in entries)
    assert entries[0]["_SYSTEMD_UNIT"] == "mandosd.service"
    explained = g.run("journalctl", "--catalog", "--no-pager", "MANDOS_CLIENT=client1",
                      f"MESSAGE_ID={SECRET_SENT}").check().out
    assert "Subject: Mandos: secret sent to client1" in explained, explained
    assert "never" in explained  # "it never appears in the journal"


def test_client_vm_unlocks_from_server_vm(booted: Booted, debs: dict[str, Path],
                                          tmp_path: Path) -> None:
    """The LUKS2 test VM, its initrd built with the dracut module and the agent from
    our client packages, unlocks its root with the secret from the server VM (its
    guestfwd relay reaches the host's end of the server VM's hostfwd)."""
    g = booted.guest
    pkgroot = tmp_path / "pkgroot"
    for name in ("python3-mandos-nbde", "mandos-nbde-client"):
        subprocess.run(["dpkg-deb", "-x", str(debs[name]), str(pkgroot)], check=True)
    module = pkgroot / "usr/lib/dracut/modules.d/90mandos-nbde"
    assert (module / "module-setup.sh").exists()
    found = vmlib.find_kernel()
    assert found
    kernel, kver = found
    keys = make_keys(tmp_path / "keys", "luks1")
    image = vmlib.make_root_image(tmp_path, LUKS_PASSPHRASE)
    section = enroll(keys, LUKS_PASSPHRASE, "luks1", host="127.0.0.1")
    g.run("tee", "-a", "/etc/mandos/clients.conf", stdin=section.encode()).check()
    t = time.monotonic()
    initrd = tmp_path / "initrd.img"
    conf = (f'mandos_keydir="{keys}"\n'
            f'mandos_servers="{vmlib.GUEST_SERVER_ADDR}:{vmlib.GUEST_SERVER_PORT}"\n'
            f'mandos_pythonpath="{pkgroot / "usr/lib/python3/dist-packages"}"\n')
    tree = vmlib.private_dracut_tree(tmp_path, module_src=module)
    vmlib.build_initrd(tmp_path, initrd, kver, modules=[vmlib.MODULE_NAME], conf=conf,
                       dracut_tree=tree)
    booted.timings["client initrd from the package"] = time.monotonic() - t
    t = time.monotonic()
    cmdline = vmlib.kernel_cmdline(image, net=False)
    with vmlib.VM(kernel, initrd, image, cmdline, tmp_path / "client-boot.log",
                  server_port=booted.port) as vm:
        result = vm.boot(600)
    booted.timings["client VM boot to its real root"] = time.monotonic() - t
    assert result.reached_root, "client root not reached:\n" + result.console[-4000:]
    sent = g.run("journalctl", "-o", "json", "MANDOS_CLIENT=luks1",
                 f"MESSAGE_ID={SECRET_SENT}").check().out.splitlines()
    assert sent and json.loads(sent[-1])["MANDOS_OUTCOME"] == "secret-sent"


def test_purge_leaves_nothing(booted: Booted) -> None:
    g, timings = booted.guest, booted.timings
    # -- 6. purge: no unit, no enablement, no user, no state left
    t = time.monotonic()
    g.run("dpkg", "--purge", *SERVER_DEBS[::-1], timeout=600).check()
    timings["dpkg --purge"] = time.monotonic() - t
    left = g.sh("ls -d /lib/systemd/system/mandosd* /usr/lib/systemd/system/mandosd* "
                "/etc/systemd/system/*/mandosd* /etc/systemd/system/mandosd* "
                "/usr/lib/sysusers.d/mandos-nbde* /var/lib/mandosd /usr/bin/mandosd "
                "/usr/bin/mandos-ctl /etc/default/mandosd 2>/dev/null").out
    assert left == "", f"left behind:\n{left}"
    assert g.run("getent", "passwd", "_mandos-checker").rc == 2
    assert g.run("systemctl", "is-active", "mandosd.socket").out.strip() != "active"
    units = g.run("systemctl", "list-units", "--all", "--plain", "--no-legend", "mandosd*").out
    assert all("not-found" in line for line in units.splitlines()), units
    assert g.run("test", "-e", "/etc/mandos").rc == 1  # purge: the conffiles too
    refused = g.run("python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 9439), 5)")
    assert "ConnectionRefusedError" in refused.err



ADMIN_SECTION = """
[web1]
host = 192.0.2.7
key_id = 3BB532A0A3BC927CD9D8D236D2BEAD58C64D1D68E88B0B9DE135D38A8D0052CF
fingerprint = F18392827A27DF4B684B0C97DF365E03787F8CAE
secret = aGVsbG8=
"""


def test_replacing_debian_mandos_keeps_etc_mandos(tmp_path: Path, debs: dict[str, Path]) -> None:
    tar = pid1lib.cached_rootfs(tmp_path / "mmdebstrap.log", pid1lib.MANDOS_PACKAGES)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(tar) as tf:
        tf.extractall(root, numeric_owner=True)  # noqa: S202 - our own mmdebstrap tarball
    etc = root / "etc/mandos"
    # A Mandos server in use: a client in clients.conf, a port in mandos.conf.
    with (etc / "clients.conf").open("a") as f:
        f.write(ADMIN_SECTION)
    conf = (etc / "mandos.conf").read_text().replace("\n;port = \n", "\nport = 4711\n")
    (etc / "mandos.conf").write_text(conf)
    before = {p.name: p.read_bytes() for p in etc.glob("*.conf")}
    (root / "root/debs").mkdir()
    for name in SERVER_DEBS:
        (root / "root/debs" / debs[name].name).write_bytes(debs[name].read_bytes())

    def chroot(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["chroot", str(root), *argv], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=600,
                              env={**pid1lib.CLEAN_ENV, "DEBIAN_FRONTEND": "noninteractive"})

    assert chroot("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "mandos").stdout == "ii "
    # apt removes Debian's mandos (Conflicts) and installs ours; stdin is /dev/null,
    # so a conffile question would fail the installation.
    inst = chroot("apt-get", "install", "-y", *(f"/root/debs/{debs[n].name}" for n in SERVER_DEBS))
    assert inst.returncode == 0, inst.stdout + inst.stderr
    assert "Removing mandos " in inst.stdout
    assert chroot("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "mandos").stdout == "rc "
    assert {p.name: p.read_bytes() for p in etc.glob("*.conf")} == before
    assert (etc / "clients.conf").stat().st_mode & 0o777 == 0o600
    check = chroot("mandosd", "--check-config")
    assert check.returncode == 0 and "(1 clients)" in check.stdout + check.stderr, check

    # The replaced package's purge used to delete Debian's conffiles, the files
    # mandosd now reads: dpkg moved them over to our package.
    purge = chroot("dpkg", "--purge", "mandos")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert {p.name: p.read_bytes() for p in etc.glob("*.conf")} == before
    owner = chroot("dpkg-query", "-S", "/etc/mandos/clients.conf")
    assert owner.stdout.startswith("mandos-nbde-server:"), owner
    check = chroot("mandosd", "--check-config")
    assert check.returncode == 0 and "(1 clients)" in check.stdout + check.stderr, check


def test_replacing_debian_mandos_client_keeps_the_keys(tmp_path: Path,
                                                       debs: dict[str, Path]) -> None:
    """Debian's mandos-client made this machine's keys; ours replaces it and uses
    them as they are: same files, same key_id, no new keys, nothing printed."""
    from mandos_core.keyfiles import KeyFiles

    tar = pid1lib.cached_rootfs(tmp_path / "mmdebstrap.log", pid1lib.MANDOS_CLIENT_PACKAGES)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(tar) as tf:
        tf.extractall(root, numeric_owner=True)  # noqa: S202 - our own mmdebstrap tarball
    keydir = root / "etc/keys/mandos"
    before = {p.name: p.read_bytes() for p in keydir.iterdir()}
    assert {"seckey.txt", "pubkey.txt", "tls-privkey.pem", "tls-pubkey.pem"} <= set(before)
    debian_key_id = KeyFiles.from_dir(keydir).key_id()
    names = ("python3-mandos-nbde", "mandos-nbde-client")
    (root / "root/debs").mkdir()
    for name in names:
        (root / "root/debs" / debs[name].name).write_bytes(debs[name].read_bytes())

    def chroot(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["chroot", str(root), *argv], stdin=subprocess.DEVNULL,
                              capture_output=True,
                              timeout=600,
                              env={**pid1lib.CLEAN_ENV, "DEBIAN_FRONTEND": "noninteractive"})

    inst = chroot("apt-get", "install", "-y", *(f"/root/debs/{debs[n].name}" for n in names))
    out = (inst.stdout + inst.stderr).decode(errors="replace")
    assert inst.returncode == 0, out
    assert "Removing mandos-client " in out
    assert {p.name: p.read_bytes() for p in keydir.iterdir()} == before
    assert not (root / "var/lib/mandos-nbde-client/keys-created-by-package").exists()
    assert "do not purge the replaced package 'mandos-client'" in out
    # The initrd is rebuilt through the trigger (initramfs-tools here, dracut alike).
    assert "Processing triggers for initramfs-tools" in out
    for secret in ("seckey.txt", "tls-privkey.pem"):
        assert before[secret].decode(errors="replace").strip().splitlines()[1] not in out
    # Our mandos-keygen enrolls with Debian's keys: the server's key_id stays valid.
    passfile = root / "root/luks-pass"
    passfile.write_bytes(b"pass")
    passfile.chmod(0o600)
    section = chroot("mandos-keygen", "--passfile", "/root/luks-pass")
    assert section.returncode == 0, section.stderr
    assert f"key_id = {debian_key_id}" in section.stdout.decode()

    # What the warning is about: Debian's purge destroys the keys ours uses.
    assert chroot("dpkg", "--purge", "mandos-client").returncode == 0
    assert not (keydir / "seckey.txt").exists()
    # A machine without keys: our package makes them (0600 in 0700) and its
    # purge destroys them again.
    assert chroot("dpkg", "--purge", *names[::-1]).returncode == 0
    inst = chroot("apt-get", "install", "-y", *(f"/root/debs/{debs[n].name}" for n in names))
    assert inst.returncode == 0, (inst.stdout + inst.stderr).decode(errors="replace")
    assert (root / "var/lib/mandos-nbde-client/keys-created-by-package").exists()
    assert keydir.stat().st_mode & 0o777 == 0o700
    for name in ("seckey.txt", "tls-privkey.pem", "tls-pubkey.pem", "pubkey.txt"):
        assert (keydir / name).stat().st_mode & 0o777 == 0o600, name
    assert chroot("dpkg", "--purge", *names[::-1]).returncode == 0
    assert not keydir.exists()
