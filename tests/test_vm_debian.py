"""Real boots across the two implementations: Debian's Mandos initrd against mandosd,
and our initrd against Debian's Mandos server.

- Debian's own dracut module (``/usr/lib/dracut/modules.d/90mandos``, from the
  mandos-client package), unchanged, builds the initrd the way a Mandos site
  does: dracut in host-only mode (its check() wants it), the module added with
  ``--add mandos``, the client's keys made by Debian's ``mandos-keygen`` in
  ``/etc/keys/mandos`` (bind-mounted for dracut alone, so the host's own keys
  stay out), and the server given through the service's own hook: its
  ``ExecStart=`` ends in ``$MANDOS_CLIENT_OPTIONS``, and the module copies the
  host's drop-ins for ``ask-password-mandos.service``; here the drop-in setting
  ``MANDOS_CLIENT_OPTIONS=--connect=ADDRESS:PORT`` goes in with ``--include``,
  as the host's would (the ``mandos=connect`` kernel argument and
  ``plugin-runner.conf`` are read only by the non-systemd initrd's
  plugin-runner).  The guest's mandos-client reaches mandosd on the host's loopback
  through the guestfwd relay and the root opens; mandosd's audit shows the
  secret sent to a raw-public-key client.
- Our initrd (tests/test_vm_boot.py's, built once per session) boots with the
  relay pointing at Debian's ``/usr/sbin/mandos`` on ``[::1]`` instead, which
  holds our client's section as our ``mandos-keygen`` wrote it: the root opens
  and Debian's server logs the secret sent.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import vmlib
from tests.debianlib import debian_keys, debian_mandos, debian_section, have_debian_mandos
from tests.helpers import Mandosd
from tests.vmlib import BOOT_TIMEOUT, CLIENT, PASSPHRASE, Setup, our_setup

pytestmark = pytest.mark.vm

DEBIAN_MODULE = Path("/usr/lib/dracut/modules.d/90mandos")
#: Debian's module takes the client's keys from here (or /etc/mandos/keys) on the build host.
DEBIAN_KEYDIR = "/etc/keys/mandos"
DROPIN = "/etc/systemd/system/ask-password-mandos.service.d/50-connect.conf"
DEBIAN_CLIENT = "debianvm"

_reason = vmlib.skip_reason()
if _reason is None and not (have_debian_mandos() and DEBIAN_MODULE.is_dir()):
    _reason = "Debian's Mandos is not installed (apt-get install mandos mandos-client)"
if _reason is None and not Path(DEBIAN_KEYDIR).is_dir():
    _reason = f"no {DEBIAN_KEYDIR} to bind the test's keys on (made by mandos-client)"
if _reason:
    pytest.skip(_reason, allow_module_level=True)


@dataclass
class DebianInitrd:
    initrd: Path
    keys: Path
    section: str
    unpacked: Path


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return our_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def debian_initrd(tmp_path_factory: pytest.TempPathFactory, ours: Setup) -> DebianInitrd:
    work = tmp_path_factory.mktemp("vm-debian")
    keys = debian_keys(work / "keys")
    section = debian_section(keys, PASSPHRASE, DEBIAN_CLIENT, host="127.0.0.1")
    dropin = work / "50-connect.conf"
    dropin.write_text("[Service]\nEnvironment=MANDOS_CLIENT_OPTIONS="
                      f"--connect={vmlib.GUEST_SERVER_ADDR}:{vmlib.GUEST_SERVER_PORT}\n")
    initrd = work / "initrd.img"
    # On a real machine, host-only dracut finds the root's cipher in `dmsetup table`
    # (module crypt); this host has no device-mapper, so name aes-xts's modules.
    vmlib.build_initrd(work, initrd, ours.kver, add=["mandos"], hostonly=True,
                       drivers=[*vmlib.DRIVERS, "xts", "ecb", "algif_skcipher"],
                       include=[(dropin, DROPIN)], binds=[(keys, DEBIAN_KEYDIR)])
    unpacked = vmlib.unpack_initrd(initrd, work / "unpacked")
    return DebianInitrd(initrd, keys, section, unpacked)


def test_debian_initrd_is_debians_module(debian_initrd: DebianInitrd) -> None:
    """What went in is Debian's client and the test's keys, not ours and not the host's."""
    u = debian_initrd.unpacked
    size = debian_initrd.initrd.stat().st_size
    print(f"\nDebian's Mandos initrd (host-only): {size / 1e6:.1f} MB (zstd)")
    for f in ("lib/mandos/mandos-client", "lib/mandos/password-agent"):
        assert (u / f).is_file(), f
    assert not (u / "usr/lib/python3/dist-packages/password_agent").exists()
    assert not list(u.glob("usr/lib/systemd/system/mandos-nbde-agent.*"))
    for name in ("tls-privkey.pem", "tls-pubkey.pem", "seckey.txt", "pubkey.txt"):
        got = u / "etc/mandos/keys" / name
        assert got.read_bytes() == (debian_initrd.keys / name).read_bytes(), name
    assert stat.S_IMODE((u / "etc/mandos/keys/seckey.txt").stat().st_mode) & 0o077 == 0
    assert "--connect=" in (u / DROPIN.lstrip("/")).read_text()


def test_debian_initrd_unlocks_from_mandosd(ours: Setup, debian_initrd: DebianInitrd) -> None:
    """Debian's 90mandos initrd, Debian's keys, our mandosd: the root opens."""
    work = debian_initrd.initrd.parent
    with Mandosd(work / "srv", sections=[debian_initrd.section]) as srv:
        cmdline = vmlib.kernel_cmdline(ours.image, net=True)  # Debian's module needs ip=
        log = work / "boot-debian-initrd.log"
        with vmlib.VM(ours.kernel, debian_initrd.initrd, ours.image, cmdline, log,
                      server_port=srv.port) as vm:
            result = vm.boot(BOOT_TIMEOUT)
        audit = srv.log()
    assert result.reached_root, f"no real root; console in {log}:\n" + result.console[-4000:]
    assert f"MANDOS_OUTCOME=secret-sent MANDOS_CLIENT={DEBIAN_CLIENT}" in audit, audit[-3000:]
    sent = next(ln for ln in audit.splitlines() if f"sent secret to {DEBIAN_CLIENT}" in ln)
    print(f"\nDebian's initrd -> mandosd: root reached in {result.seconds:.1f} s (wall), "
          f"root at {result.uptime_at_root()} s (guest); {sent.strip()}")
    # Debian's client presents a raw public key (RFC 7250), not a certificate
    assert re.search(r"MANDOS_CERT_TYPE=\S*raw", sent, re.I), sent


def test_our_initrd_unlocks_from_debian_mandos(ours: Setup) -> None:
    """Our initrd (our module, our keygen's keys), Debian's /usr/sbin/mandos: the root opens."""
    log = ours.work / "boot-debian-server.log"
    # Our keygen's section names 127.0.0.1 for the checker; Debian's Mandos serves it as is.
    with debian_mandos(ours.section, debuglevel="INFO") as mandos:
        cmdline = vmlib.kernel_cmdline(ours.image, net=False)  # our module brings the network
        with vmlib.VM(ours.kernel, ours.initrd, ours.image, cmdline, log,
                      server_port=mandos.port, server_host="::1") as vm:
            result = vm.boot(BOOT_TIMEOUT)
        logged = mandos.logged()
    said = "\n".join(logged)
    assert result.reached_root, f"no real root; console in {log}:\n" + result.console[-4000:] \
        + "\nDebian's Mandos:\n" + said[-3000:]
    assert f"Sending secret to {CLIENT}" in logged, said[-3000:]
    # the guest's only way out is the relay to Debian's server
    assert re.search(r"mandos-password-agent\[\d+\]: answered question cryptsetup:\S+ with "
                     rf"the secret from {re.escape(vmlib.GUEST_SERVER_ADDR)}:", result.console)
    print(f"\nour initrd -> Debian's Mandos: root reached in {result.seconds:.1f} s (wall), "
          f"root at {result.uptime_at_root()} s (guest)")
