"""A full Debian 12 VM with systemd as PID 1, for testing our packages for real.

- :func:`cached_rootfs` builds a Debian root file system with ``mmdebstrap``
  from the apt sources this machine uses, once: the tarball is cached under
  :data:`CACHE` keyed by the package list and the sources.
- :func:`build_debs` runs ``dpkg-buildpackage -us -uc -b`` on a copy of the
  checkout (never in the working tree).
- :func:`cached_base_image` unpacks the root into a plain ext4 image
  (``mkfs.ext4 -d``, cached too), with DHCP by systemd-networkd and a tiny
  command runner (:data:`RUNNER`) started by systemd on ``ttyS1``;
  :func:`make_image` copies it and puts the packages under ``/root/debs``
  with ``debugfs``.
- :class:`Guest` boots it under QEMU (TCG) with the host's Debian kernel and a
  lean dracut initrd, ``restrict=on`` user networking with one ``hostfwd`` to
  the guest's port 9439, and runs commands through the runner: base64 JSON
  lines over the second serial port, no ssh, no network.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests import vmlib

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MANDOS_NBDE_TEST_CACHE", "/var/cache/mandos-nbde-tests"))
SUITE = "bookworm"
#: What the guest has besides Debian's minbase: systemd as PID 1, and every
#: dependency of our server package (the guest has no network to fetch them).
PACKAGES = [
    "systemd-sysv", "udev", "dbus", "python3", "python3-sdnotify", "python3-cryptography",
    "fping", "gpg", "gpg-agent", "libgnutls30",
]
INITRD_MODULES = ["systemd", "systemd-initrd", "dracut-systemd", "rootfs-block", "udev-rules",
                  "base", "fs-lib"]
INITRD_DRIVERS = ["virtio_pci", "virtio_net", "virtio_blk", "virtio_console", "ext4"]
#: A Mandos key server as Debian ships it, plus what our server package needs:
#: the machine that tests moving over (in a chroot, no boot needed).
MANDOS_PACKAGES = ["mandos", "systemd", "python3-sdnotify", "python3-cryptography", "fping",
                   "gpg", "gpg-agent", "libgnutls30"]
#: A Mandos client as Debian ships it (keys made by its postinst), plus what our
#: client package needs.
MANDOS_CLIENT_PACKAGES = ["mandos-client", "systemd", "python3-cryptography", "gpg", "gpg-agent",
                          "cryptsetup-bin", "libcryptsetup12", "libgnutls30"]
GUEST_PORT = 9439
MASKED = ["apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
          "dpkg-db-backup.timer", "systemd-networkd-wait-online.service"]
NICE = ["nice", "-n", "10"]
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}

RUNNER = r'''#!/usr/bin/python3
"""Test command runner: one base64 JSON request per line on ttyS1, one answer."""
import base64, json, os, subprocess, tty

fd = os.open("/dev/ttyS1", os.O_RDWR | os.O_NOCTTY)
tty.setraw(fd)


def send(data: bytes) -> None:
    view = memoryview(data + b"\n")
    while view:
        view = view[os.write(fd, view):]


send(b"MANDOS-RUNNER-READY")
buf = b""
while True:
    chunk = os.read(fd, 65536)
    if not chunk:
        break
    buf += chunk
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        line = line.strip()
        if not line.startswith(b"REQ "):
            continue
        req = json.loads(base64.b64decode(line[4:]))
        try:
            p = subprocess.run(req["argv"], input=base64.b64decode(req["stdin"]),
                               capture_output=True, timeout=req["timeout"])
            res = {"rc": p.returncode, "out": p.stdout, "err": p.stderr}
        except Exception as e:  # noqa: BLE001 - reported to the host
            res = {"rc": -1, "out": b"", "err": repr(e).encode()}
        res = {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v
               for k, v in res.items()}
        send(b"RES " + base64.b64encode(json.dumps(res).encode()))
'''

RUNNER_UNIT = """[Unit]
Description=mandos-nbde test command runner (ttyS1)
# Early: the host can start while the rest of the boot goes on.
DefaultDependencies=no
After=systemd-journald.socket local-fs.target

[Service]
ExecStart=/usr/bin/python3 /usr/local/sbin/mandos-test-runner
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""

DHCP_NETWORK = """[Match]
Type=ether

[Network]
DHCP=ipv4
"""


def skip_reason() -> str | None:
    missing = [p for p in ("mmdebstrap", "dpkg-buildpackage", vmlib.QEMU, "dracut", "mkfs.ext4")
               if shutil.which(p) is None]
    if missing:
        return (f"missing {', '.join(missing)} (apt-get install mmdebstrap dpkg-dev debhelper "
                "dh-python pybuild-plugin-pyproject qemu-system-x86 dracut e2fsprogs)")
    if os.geteuid() != 0:
        return "needs root (mmdebstrap, an image with root-owned files)"
    if vmlib.find_kernel() is None:
        return "no Debian kernel in /boot (apt-get install linux-image-amd64)"
    return None


def _sources() -> Path:
    for p in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if p.exists():
            return p
    raise FileNotFoundError("no apt sources for mmdebstrap")


def cached_rootfs(log: Path, packages: Sequence[str] = PACKAGES) -> Path:
    """The Debian root file system tarball, built once per package list and sources."""
    sources = _sources()
    key = hashlib.sha256(json.dumps([SUITE, sorted(packages), sources.read_text()]).encode())
    CACHE.mkdir(parents=True, exist_ok=True)
    tar = CACHE / f"rootfs-{SUITE}-{key.hexdigest()[:16]}.tar"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tar.exists():
            return tar
        tmp = tar.with_name(tar.stem + ".part.tar")  # mmdebstrap picks the format by suffix
        argv = [*NICE, "mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}",
                '--aptopt=Acquire::Check-Valid-Until "false"', SUITE, str(tmp), str(sources)]
        with log.open("wb") as out:
            subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=1800,
                           env=CLEAN_ENV)
        tmp.rename(tar)
        return tar


def build_debs(workdir: Path) -> dict[str, Path]:
    """Build the binary packages from a copy of the checkout; {package: .deb}."""
    src = workdir / "src" / "mandos-nbde"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                           check=True, capture_output=True).stdout.split(b"\0")
    for f in filter(None, files):
        rel = f.decode()
        if not (ROOT / rel).is_file():
            continue
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    log = workdir / "dpkg-buildpackage.log"
    with log.open("wb") as out:
        proc = subprocess.run([*NICE, "dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src,
                              stdout=out, stderr=subprocess.STDOUT, env=CLEAN_ENV, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"dpkg-buildpackage failed, see {log}:\n{log.read_text()[-3000:]}")
    return {p.name.split("_")[0]: p for p in src.parent.glob("*.deb")}


def cached_initrd(workdir: Path, kver: str) -> Path:
    """A lean dracut initrd (no host-only mode) that mounts an ext4 root on virtio."""
    key = hashlib.sha256(json.dumps([kver, INITRD_MODULES, INITRD_DRIVERS]).encode())
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"initrd-{kver}-{key.hexdigest()[:12]}.img"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            tmp = out.with_suffix(".part")
            tree = vmlib.private_dracut_tree(workdir, module_src=workdir / "no-module")
            vmlib.build_initrd(workdir, tmp, kver, dracut_tree=tree, base_modules=INITRD_MODULES,
                               drivers=INITRD_DRIVERS)
            tmp.rename(out)
    return out


def cached_base_image(rootfs_tar: Path, size_mb: int = 2048) -> Path:
    """An ext4 image of the root file system, ready to boot with systemd (cached
    per rootfs tarball and guest set-up)."""
    setup = json.dumps([rootfs_tar.name, RUNNER, RUNNER_UNIT, DHCP_NETWORK, MASKED, size_mb])
    key = hashlib.sha256(setup.encode())
    out = CACHE / f"image-{key.hexdigest()[:16]}.img"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        for old in CACHE.glob("image-*.img"):
            old.unlink()  # one base image at a time: they are 2 GB (sparse)
        tree = CACHE / "rootfs.tmp"
        if tree.exists():
            shutil.rmtree(tree)
        tree.mkdir()
        try:
            with tarfile.open(rootfs_tar) as tf:
                tf.extractall(tree, numeric_owner=True)  # noqa: S202 - our own mmdebstrap tarball
            _set_up_guest(tree)
            tmp = out.with_suffix(".part")
            with tmp.open("wb") as f:
                f.truncate(size_mb << 20)
            subprocess.run([*NICE, "mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(tree),
                            str(tmp)], check=True, capture_output=True, timeout=900)
            tmp.rename(out)
        finally:
            shutil.rmtree(tree)
        return out


def _set_up_guest(tree: Path) -> None:
    (tree / "etc/hostname").write_text("mandos-pid1\n")
    (tree / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    net = tree / "etc/systemd/network/20-dhcp.network"
    net.parent.mkdir(parents=True, exist_ok=True)
    net.write_text(DHCP_NETWORK)
    runner = tree / "usr/local/sbin/mandos-test-runner"
    runner.parent.mkdir(parents=True, exist_ok=True)
    runner.write_text(RUNNER)
    runner.chmod(0o755)
    (tree / "etc/systemd/system/mandos-test-runner.service").write_text(RUNNER_UNIT)
    (tree / "root/debs").mkdir(parents=True, exist_ok=True)
    subprocess.run(["systemctl", "--root", str(tree), "enable", "systemd-networkd.service",
                    "mandos-test-runner.service"], check=True, capture_output=True)
    # Nothing periodic of Debian's own under TCG while the test runs.
    subprocess.run(["systemctl", "--root", str(tree), "mask", *MASKED], check=True,
                   capture_output=True)


def make_image(workdir: Path, base: Path, debs: Sequence[Path]) -> Path:
    """A copy of the base image with *debs* in /root/debs (debugfs: no mount needed)."""
    img = workdir / "root.img"
    subprocess.run(["cp", "--sparse=always", str(base), str(img)], check=True, timeout=600)
    for deb in debs:
        subprocess.run(["debugfs", "-w", "-R", f"write {deb} /root/debs/{deb.name}", str(img)],
                       check=True, capture_output=True, timeout=120)
    return img


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def check(self) -> Result:
        assert self.rc == 0, f"exit {self.rc}\nstdout:\n{self.out}\nstderr:\n{self.err}"
        return self


class Guest(vmlib.VM):
    """The Debian VM: console on ttyS0 (read by vmlib.VM), the runner on ttyS1."""

    def __init__(self, kernel: Path, initrd: Path, image: Path, workdir: Path, host_port: int):
        self.cmdsock = workdir / "runner.sock"
        self.host_port = host_port
        cmdline = ("console=ttyS0,115200 root=/dev/vda rootfstype=ext4 rw panic=-1 "
                   "systemd.show_status=1 net.ifnames=0")
        super().__init__(kernel, initrd, vmlib.RootImage(image, "", image), cmdline,
                         workdir / "console.log")
        self._conn: socket.socket | None = None
        self._buf = b""

    def argv(self) -> list[str]:
        return [
            *NICE, vmlib.QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
            "-m", "1024", "-no-reboot", "-nodefaults", "-display", "none",
            "-serial", "stdio",
            "-chardev", f"socket,id=cmd,path={self.cmdsock},server=on,wait=off",
            "-serial", "chardev:cmd",
            "-monitor", "none",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.cmdline,
            "-drive", f"file={self.image.path},if=virtio,format=raw,cache=unsafe",
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.host_port}-:"
                       f"{GUEST_PORT}",
            "-device", "virtio-net-pci,netdev=n0",
        ]

    def connect_runner(self, timeout: float) -> None:
        """Connect to the runner's serial port and wait for its READY line."""
        deadline = time.monotonic() + timeout
        while self._conn is None:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(self.cmdsock))
                self._conn = s
            except OSError as e:
                s.close()
                if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                    raise TimeoutError(f"no runner socket; console:\n{self.console[-3000:]}") from e
                time.sleep(0.05)  # not a wait on a condition we can watch: qemu makes the socket as it starts
        self._readline(b"MANDOS-RUNNER-READY", deadline)

    def _readline(self, prefix: bytes, deadline: float) -> bytes:
        assert self._conn is not None
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                line = line.strip()
                if line.startswith(prefix):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"runner: no {prefix!r}; console:\n{self.console[-3000:]}")
            self._conn.settimeout(left)
            try:
                chunk = self._conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionError(f"runner closed; console:\n{self.console[-3000:]}")
            self._buf += chunk

    def run(self, *argv: str, stdin: bytes = b"", timeout: float = 120) -> Result:
        """Run *argv* in the guest as root; its exit status and output."""
        assert self._conn is not None, "connect_runner() first"
        req = {"argv": list(argv), "stdin": base64.b64encode(stdin).decode(), "timeout": timeout}
        self._conn.sendall(b"REQ " + base64.b64encode(json.dumps(req).encode()) + b"\n")
        line = self._readline(b"RES ", time.monotonic() + timeout + 30)
        res = json.loads(base64.b64decode(line[4:]))
        if res["rc"] == -1 and not res["out"]:
            raise RuntimeError(f"runner: {argv}: {base64.b64decode(res['err']).decode()}")
        return Result(res["rc"], base64.b64decode(res["out"]).decode(errors="replace"),
                      base64.b64decode(res["err"]).decode(errors="replace"))

    def sh(self, script: str, timeout: float = 120) -> Result:
        return self.run("/bin/sh", "-c", script, timeout=timeout)

    def wait_until(self, script: str, timeout: float) -> Result:
        """Run *script* in the guest until it exits 0, up to *timeout* (a condition,
        checked once a second inside the guest, never a fixed sleep)."""
        loop = (f"end=$(( $(date +%s) + {int(timeout)} )); "
                f"until {script}; do [ $(date +%s) -ge $end ] && exit 1; sleep 1; done")
        return self.run("/bin/sh", "-c", loop, timeout=timeout + 30)

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        super().stop()
