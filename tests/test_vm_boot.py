"""A real boot: our dracut module in an initrd for Debian's kernel unlocks a LUKS2 root.

The guest (qemu, TCG) reaches mandosd on the host's loopback only through a
per-connection guestfwd relay; user networking is ``restrict=on``.  First boot:
the root's init prints its marker and the server's audit shows the secret
sent.  Then ``mandos-ctl -d`` disables the client; second boot: the root is
not unlocked and the audit shows the refusal, until the passphrase typed on
the serial console (the console agent beside ours) opens it.  Third boot,
client enabled again, ``mandos=off``: our agent stays out, the server hears
nothing.  Also checked without a VM: the
initrd's own files (keys 0600, Debian's interpreter, units wired) and its
Python run in a chroot against the same server.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import vmlib
from tests.helpers import Mandosd, tool
from tests.vmlib import BOOT_TIMEOUT, CLIENT, PASSPHRASE, Setup, our_setup

pytestmark = pytest.mark.vm

REFUSED_GRACE = 15  # after the refusal, how long the root must stay locked
OFF_GRACE = 12  # with mandos=off, after the question

_reason = vmlib.skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return our_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def server(setup: Setup) -> Iterator[Mandosd]:
    with Mandosd(setup.work / "srv", sections=[setup.section]) as srv:
        yield srv


@pytest.fixture(scope="module")
def unpacked(setup: Setup) -> Path:
    return vmlib.unpack_initrd(setup.initrd, setup.work / "unpacked")


def test_initrd_contents(setup: Setup, unpacked: Path) -> None:
    size = setup.initrd.stat().st_size
    print(f"\ninitrd: {size / 1e6:.1f} MB (zstd), built in {setup.build_seconds:.1f} s")
    keydir = unpacked / "etc/keys/mandos"
    assert stat.S_IMODE(keydir.stat().st_mode) == 0o700
    for name in ("tls-privkey.pem", "tls-pubkey.pem", "seckey.txt", "pubkey.txt"):
        st = (keydir / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600, name
        assert (keydir / name).read_bytes() == (setup.keys / name).read_bytes()
    # the TLS key goes out as a raw public key (GnuTLS): no certificate in the initrd
    assert not (keydir / "tls-cert.pem").exists()
    # Debian's interpreter itself, not a venv or a shim
    py = unpacked / "usr/bin/python3"
    assert os.path.realpath(py).startswith(str(unpacked))
    assert Path(os.path.realpath(py)).read_bytes()[:4] == b"\x7fELF"
    agent_pkg = unpacked / "usr/lib/python3/dist-packages/password_agent"
    assert any(agent_pkg.glob("agent.py*"))
    assert not any(agent_pkg.glob("certificate.py*"))  # would need python3-cryptography
    core = unpacked / "usr/lib/python3/dist-packages/mandos_core"
    for mod in ("gnutls", "tls", "keyfiles", "protocol"):
        assert any(core.glob(f"{mod}.py*")), mod
    assert not (unpacked / "usr/lib/python3/dist-packages/mandosd").exists()
    # TLS is libgnutls through ctypes, loaded by name: dracut must have put it in
    # with its own libraries, and Python's ssl stays out
    libs = {p.name for p in unpacked.glob("usr/lib/*/*.so*")}
    assert "libgnutls.so.30" in libs
    for lib in ("libnettle.so.8", "libhogweed.so.6", "libtasn1.so.6", "libp11-kit.so.0"):
        assert lib in libs, lib
    assert not any(unpacked.glob("usr/lib/python3.*/lib-dynload/_ssl.*"))
    assert not any(unpacked.glob("usr/lib/python3.*/ssl.py*"))
    # imported lazily by socket.create_connection(): a plain import trace misses it
    assert any(unpacked.glob("usr/lib/python3.*/encodings/idna.py*"))
    conf = (unpacked / "etc/mandos/password-agent.conf").read_text()
    assert f"{vmlib.GUEST_SERVER_ADDR}:{vmlib.GUEST_SERVER_PORT}" in conf
    wants = [d / "sysinit.target.wants/mandos-nbde-agent.path"
             for d in (unpacked / "etc/systemd/system", unpacked / "usr/lib/systemd/system")]
    assert any(w.is_symlink() for w in wants)
    assert "rd.neednet=1" in (unpacked / "etc/cmdline.d/90mandos-nbde.conf").read_text()
    for exe in ("usr/bin/gpg", "usr/bin/gpg-agent", "usr/bin/gpgconf"):
        assert (unpacked / exe).exists(), exe


def test_initrd_python_fetches_in_chroot(setup: Setup, unpacked: Path, server: Mandosd) -> None:
    """The initrd's own Python and gpg fetch and decrypt the secret (chroot, same loopback)."""
    mounts = [(unpacked / "dev", ["--bind", "/dev"]), (unpacked / "proc", ["-t", "proc", "proc"])]
    done = []
    try:
        for where, how in mounts:
            where.mkdir(exist_ok=True)
            vmlib.run(["mount", *how, str(where)])
            done.append(where)
        (unpacked / "run").mkdir(exist_ok=True)
        proc = subprocess.run(
            ["chroot", str(unpacked), "/usr/bin/python3", "-I", "-m", "password_agent.mandos_client",
             "--connect", server.address, "--keydir", "/etc/keys/mandos", "--timeout", "20"],
            capture_output=True, timeout=60, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    finally:
        for where in reversed(done):
            subprocess.run(["umount", "-l", str(where)], check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout == PASSPHRASE


def _timings(console: str) -> dict[str, float | None]:
    asked = vmlib.first_time(console, r"Starting systemd-cryptsetup@")
    # the agent's own line, else systemd-cryptsetup taking the passphrase
    answered = vmlib.first_time(console, r"mandos-password-agent\[\d+\]: answered") \
        or vmlib.first_time(console, r"systemd-cryptsetup\[\d+\]: Set cipher")
    unlocked = vmlib.first_time(console, r"Finished systemd-cryptsetup@")
    m = re.search(re.escape(vmlib.ROOT_MARKER) + r" uptime=([0-9.]+)", console)
    return {"question": asked, "answer": answered, "unlocked": unlocked,
            "root": float(m.group(1)) if m else None}


def test_boot_unlocks_refuses_when_disabled_and_obeys_mandos_off(setup: Setup, server: Mandosd) -> None:
    # -- first boot: the client is enabled, the root opens
    cmdline = vmlib.kernel_cmdline(setup.image, net=False)  # the module brings the network up
    with vmlib.VM(setup.kernel, setup.initrd, setup.image, cmdline, setup.work / "boot1.log",
                  server_port=server.port) as vm:
        result = vm.boot(BOOT_TIMEOUT)
    t = _timings(result.console)
    assert result.reached_root, f"no real root; console in {setup.work / 'boot1.log'}:\n" \
        + result.console[-4000:]
    assert f"sent secret to {CLIENT}" in server.log()
    assert f"MANDOS_OUTCOME=secret-sent MANDOS_CLIENT={CLIENT}" in server.log()
    assert t["question"] is not None and t["answer"] is not None
    print(f"\nboot 1 (enabled): question at {t['question']:.2f} s, answered at "
          f"{t['answer']:.2f} s ({t['answer'] - t['question']:.2f} s after the question), "
          f"unlocked at {t['unlocked']} s, real root at {t['root']} s (guest clock); "
          f"{result.seconds:.1f} s wall clock")

    # -- the admin disables the client
    subprocess.run([tool("mandos-ctl"), "--configdir", str(server.configdir), "--statedir",
                    str(server.statedir), "-d", CLIENT], check=True, capture_output=True)
    log_before = len(server.log())

    # -- second boot: refused, the root stays locked; the console agent still works
    with vmlib.VM(setup.kernel, setup.initrd, setup.image, cmdline, setup.work / "boot2.log",
                  server_port=server.port, interactive=True) as vm:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline and "refused-disabled" not in server.log()[log_before:]:
            assert vm.wait_for(re.escape(vmlib.ROOT_MARKER), 0.5) is None, "root reached!"
        refused_at = time.monotonic() - vm.started
        assert "refused-disabled" in server.log()[log_before:], \
            f"no refusal in the audit; console in {setup.work / 'boot2.log'}"
        assert vm.wait_for(re.escape(vmlib.ROOT_MARKER) + "|Finished systemd-cryptsetup@",
                           REFUSED_GRACE) is None, "the root was unlocked by a disabled client"
        new_log = server.log()[log_before:]
        assert f"sent secret to {CLIENT}" not in new_log
        print(f"boot 2 (disabled): refused {refused_at:.1f} s after start, still locked "
              f"{REFUSED_GRACE} s later; {new_log.count('refused-disabled')} refusals audited")
        # Our agent keeps asking (and being refused); the console agent answers first.
        assert vm.wait_for(r"Starting password query on /dev/ttyS0", 5), "no console agent"
        vm.type(PASSPHRASE + b"\r")
        assert vm.wait_for(re.escape(vmlib.ROOT_MARKER), 60), \
            f"typing on the console did not unlock; see {setup.work / 'boot2.log'}"
    print("boot 2: the passphrase typed on the console unlocked the root beside our agent")

    # -- third boot: mandos=off on the kernel command line, the agent stays out
    subprocess.run([tool("mandos-ctl"), "--configdir", str(server.configdir), "--statedir",
                    str(server.statedir), "-e", CLIENT], check=True, capture_output=True)
    log_before = len(server.log())
    off = vmlib.kernel_cmdline(setup.image, "mandos=off", net=False)
    with vmlib.VM(setup.kernel, setup.initrd, setup.image, off, setup.work / "boot3.log",
                  server_port=server.port) as vm:
        assert vm.wait_for(r"Starting systemd-cryptsetup@", BOOT_TIMEOUT), "no question"
        assert vm.wait_for(re.escape(vmlib.ROOT_MARKER) + "|Finished systemd-cryptsetup@",
                           OFF_GRACE) is None, "unlocked despite mandos=off"
        console = vm.console
    assert "Started mandos-nbde-agent.service" not in console
    assert "mandos-password-agent[" not in console
    assert "MANDOS_PEER=" not in server.log()[log_before:]  # no request at all (checkers aside)
    print("boot 3 (mandos=off): agent skipped, no request to the server, root locked")
