"""A small harness to boot a real VM that unlocks a LUKS2 root: image, initrd, qemu.

Everything stays inside a temporary directory and on the host's loopback:

- :func:`make_root_image` builds an ext4 root (busybox and an ``/sbin/init``
  that prints :data:`ROOT_MARKER` on the console) with ``mkfs.ext4 -d`` on a
  plain file and encrypts it in place with ``cryptsetup reencrypt --encrypt``
  (no device-mapper needed on the host), fast PBKDF.
- :func:`build_initrd` runs dracut from a private copy of its module tree
  (``dracutbasedir``) with our module added, never touching the host's
  ``/usr/lib/dracut`` or ``/boot``.
- :class:`VM` starts ``qemu-system-x86_64`` under TCG with user networking
  ``restrict=on``; the only way out is a ``guestfwd`` whose ``-cmd:`` starts
  one relay process per guest connection (this file, ``relay`` mode) that
  connects stdin/stdout to ``127.0.0.1:PORT``.  The serial console is read
  with a deadline, and the VM is always killed on exit.

Run as a program, ``python3 vmlib.py relay HOST PORT`` is that relay, and
``vmlib.py bind-exec SRC DEST ... -- ARGV`` runs dracut with bind mounts
(:func:`build_initrd`'s *binds*).
"""

from __future__ import annotations

import fcntl
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest import TempPathFactory

ROOT = Path(__file__).resolve().parent.parent
MODULE_SRC = ROOT / "dracut-module"
MODULE_NAME = "mandos-nbde"
ROOT_MARKER = "MANDOS-NBDE-REAL-ROOT-REACHED"

#: Where the guest finds the key server: a guestfwd address inside QEMU's user network.
GUEST_SERVER_ADDR = "10.0.2.100"
GUEST_SERVER_PORT = 9999

QEMU = "qemu-system-x86_64"
PBKDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]

#: dracut modules of a lean systemd initrd with networking (no host-only mode here:
#: the build host has no /proc/modules worth copying).
BASE_MODULES = [
    "systemd", "systemd-initrd", "dracut-systemd", "systemd-ask-password", "crypt", "dm",
    "rootfs-block", "udev-rules", "base", "fs-lib", "systemd-networkd",
]
DRIVERS = ["virtio_pci", "virtio_net", "virtio_blk", "dm_crypt", "ext4"]


# ---------------------------------------------------------------- what is there


def find_kernel() -> tuple[Path, str] | None:
    """The newest /boot/vmlinuz-KVER that has /lib/modules/KVER (Debian's linux-image-amd64)."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        kver = vmlinuz.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / kver / "modules.dep").exists() and os.access(vmlinuz, os.R_OK):
            found.append((vmlinuz.stat().st_mtime, vmlinuz, kver))
    if not found:
        return None
    _, vmlinuz, kver = max(found)
    return vmlinuz, kver


def skip_reason() -> str | None:
    """Why a VM boot cannot run on this machine, or None."""
    missing = [p for p in (QEMU, "dracut", "cryptsetup", "mkfs.ext4", "busybox")
               if shutil.which(p) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install qemu-system-x86 dracut " \
               "dracut-network cryptsetup e2fsprogs busybox)"
    if find_kernel() is None:
        return "no kernel in /boot with modules (apt-get install linux-image-amd64)"
    if not Path("/usr/bin/python3").exists():
        return "no /usr/bin/python3 (Debian's python3) for the initrd"
    if os.geteuid() != 0:
        return "building an initrd with dracut needs root"
    return None


def run(argv: Sequence[str], *, input: bytes | None = None, env: dict[str, str] | None = None,
        timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout,
                          env=env, cwd=cwd,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n"
                           f"{proc.stdout.decode(errors='replace')[-3000:]}\n"
                           f"{proc.stderr.decode(errors='replace')[-3000:]}")
    return proc


# ---------------------------------------------------------------- the root image

INIT = f"""#!/bin/sh
# The real root's init: prove we got here, then power off.
export PATH=/bin
mount -t proc proc /proc 2>/dev/null
up=$(cut -d' ' -f1 /proc/uptime)
echo "{ROOT_MARKER} uptime=$up" > /dev/console
echo "{ROOT_MARKER} uptime=$up" > /dev/ttyS0 2>/dev/null
sync
poweroff -f
"""


@dataclass(frozen=True)
class RootImage:
    path: Path
    uuid: str
    passfile: Path

    @property
    def mapper(self) -> str:
        return f"/dev/mapper/luks-{self.uuid}"


def _copy_with_libs(binary: str, rootdir: Path) -> None:
    """Copy *binary* and the shared libraries ldd lists into *rootdir*."""
    paths = [Path(binary).resolve()]
    out = run(["ldd", binary]).stdout.decode()
    paths += [Path(m) for m in re.findall(r"(/\S+)", out)]
    for p in paths:
        dest = rootdir / str(p).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p.resolve(), dest)


def make_root_image(workdir: Path, passphrase: bytes, *, size_mb: int = 64,
                    fs_mb: int = 32) -> RootImage:
    """A LUKS2 image holding an ext4 root whose init prints :data:`ROOT_MARKER`."""
    rootdir = workdir / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "run", "tmp", "sbin", "etc", "sysroot"):
        (rootdir / d).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox
    _copy_with_libs(busybox, rootdir)
    bb = rootdir / str(Path(busybox).resolve()).lstrip("/")
    shutil.move(bb, rootdir / "bin" / "busybox")
    for applet in ("sh", "mount", "cut", "poweroff", "sync", "cat", "echo"):
        (rootdir / "bin" / applet).symlink_to("busybox")
    (rootdir / "sbin" / "init").write_text(INIT)
    (rootdir / "sbin" / "init").chmod(0o755)
    # systemd's initrd checks that the root has an os-release before switching to it.
    (rootdir / "etc" / "os-release").write_text('NAME="mandos-nbde test root"\nID=mandostest\n')
    (rootdir / "usr" / "lib").mkdir(parents=True, exist_ok=True)
    shutil.copy2(rootdir / "etc" / "os-release", rootdir / "usr" / "lib" / "os-release")

    img = workdir / "root.img"
    with img.open("wb") as f:
        f.truncate(size_mb << 20)
    run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(rootdir), str(img), f"{fs_mb}M"])
    passfile = workdir / "passphrase"
    passfile.write_bytes(passphrase)
    passfile.chmod(0o600)
    run(["cryptsetup", "reencrypt", "--encrypt", "--batch-mode", "--type", "luks2",
         "--reduce-device-size", f"{size_mb - fs_mb}M", *PBKDF, "--key-file", str(passfile),
         str(img)], timeout=120)
    uuid = run(["cryptsetup", "luksUUID", str(img)]).stdout.decode().strip()
    return RootImage(img, uuid, passfile)


# ---------------------------------------------------------------- the initrd

_dracut_tree_lock = threading.Lock()


def private_dracut_tree(workdir: Path, module_src: Path = MODULE_SRC,
                        extra_modules: Iterable[tuple[str, Path]] = ()) -> Path:
    """A copy of /usr/lib/dracut with our module (and *extra_modules*) in modules.d."""
    with _dracut_tree_lock:
        base = workdir / "dracut"
        if base.exists():
            shutil.rmtree(base)
        shutil.copytree("/usr/lib/dracut", base, symlinks=True)
        mods = base / "modules.d"
        if module_src.is_dir():
            shutil.copytree(module_src, mods / f"90{MODULE_NAME}", symlinks=True)
        for dirname, src in extra_modules:
            shutil.copytree(src, mods / dirname, symlinks=True)
        return base


def build_initrd(workdir: Path, out: Path, kver: str, *, modules: Sequence[str] = (),
                 conf: str = "", include: Sequence[tuple[Path, str]] = (),
                 dracut_tree: Path | None = None, drivers: Sequence[str] = DRIVERS,
                 base_modules: Sequence[str] = BASE_MODULES, add: Sequence[str] = (),
                 hostonly: bool = False, binds: Sequence[tuple[Path, str]] = (),
                 timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """Build *out* for kernel *kver* with dracut from a private module tree.

    *conf* is a dracut.conf snippet (sourced shell: ``mandos_servers="..."``);
    *include* pairs (host path, initrd path) go in with ``--include``.  *add*
    modules are asked for with ``--add`` (their check() still runs, in host-only
    mode with *hostonly*).  *binds* (host directory, path) are bind-mounted for
    dracut alone, in a private mount namespace: a module that reads fixed host
    paths (Debian's ``90mandos`` reads ``/etc/keys/mandos``) sees the test's
    files, and the host's stay untouched.
    """
    tree = dracut_tree or private_dracut_tree(workdir)
    confdir = workdir / "dracut.conf.d"
    confdir.mkdir(exist_ok=True)
    conffile = workdir / "dracut.conf"
    conffile.write_text(conf)
    tmp = workdir / "dracut-tmp"
    tmp.mkdir(exist_ok=True)
    argv = ["dracut", "--force", "--hostonly" if hostonly else "--no-hostonly",
            "--no-hostonly-cmdline", "--no-early-microcode",
            "--conf", str(conffile), "--confdir", str(confdir), "--tmpdir", str(tmp),
            "--kver", kver, "--zstd",
            "-m", " ".join([*base_modules, *modules]),
            "--add-drivers", " ".join(drivers)]
    if add:
        argv += ["--add", " ".join(add)]
    for src, dest in include:
        argv += ["--include", str(src), dest]
    argv.append(str(out))
    if binds:
        wrap = ["unshare", "--mount", "--propagation", "private",
                sys.executable, str(Path(__file__).resolve()), "bind-exec"]
        for src, dest in binds:
            wrap += [str(src), dest]
        argv = [*wrap, "--", *argv]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
           "dracutbasedir": str(tree), "TMPDIR": str(tmp)}
    return run(argv, env=env, timeout=timeout)


def unpack_initrd(initrd: Path, dest: Path) -> Path:
    """Unpack *initrd* into *dest* (``lsinitrd --unpack``)."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["lsinitrd", "--unpack", str(initrd)], cwd=dest)
    return dest


# ---------------------------------------------------------------- the VM


def relay_command(port: int, host: str = "127.0.0.1") -> str:
    """The guestfwd ``-cmd:`` that connects each guest connection to HOST:PORT."""
    return f"/usr/bin/python3 {Path(__file__).resolve()} relay {host} {port}"


def kernel_cmdline(image: RootImage, *extra: str, net: bool = True) -> str:
    args = [
        "console=ttyS0,115200", f"rd.luks.uuid={image.uuid}", f"root={image.mapper}",
        "rootfstype=ext4", "rw", "rd.shell=0", "rd.emergency=poweroff", "panic=-1",
        "systemd.journald.forward_to_console=1", "systemd.show_status=1",
        "printk.time=1", "quiet",
    ]
    if net:
        args += ["ip=dhcp", "rd.neednet=1"]
    return " ".join([*args, *extra])


@dataclass
class BootResult:
    console: str
    reached_root: bool
    seconds: float
    returncode: int | None

    def uptime_at_root(self) -> float | None:
        m = re.search(re.escape(ROOT_MARKER) + r" uptime=([0-9.]+)", self.console)
        return float(m.group(1)) if m else None


_vm_lock: list[int] = []  # [fd, holders] while this process holds MANDOS_VM_LOCK


def _vm_lock_acquire(lockfile: str) -> None:
    if _vm_lock:
        _vm_lock[1] += 1
        return
    fd = os.open(lockfile, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _vm_lock[:] = [fd, 1]


def _vm_lock_release() -> None:
    if not _vm_lock:
        return
    _vm_lock[1] -= 1
    if _vm_lock[1] == 0:
        os.close(_vm_lock[0])  # releases the lock
        _vm_lock.clear()


@dataclass
class VM:
    """One qemu-system-x86_64 under TCG; use as a context manager."""

    kernel: Path
    initrd: Path
    image: RootImage
    cmdline: str
    logfile: Path
    server_port: int | None = None
    #: keep the serial console's input open, for :meth:`type` (else it reads /dev/null)
    interactive: bool = False
    memory_mb: int = 1024
    smp: int = 2
    #: where the relay connects on the host (Debian's Mandos listens on ::1)
    server_host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None
    _lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None
    _lock_fd: int | None = None

    def argv(self) -> list[str]:
        netdev = "user,id=n0,restrict=on"
        if self.server_port is not None:
            cmd = relay_command(self.server_port, self.server_host).replace(",", ",,")
            netdev += f",guestfwd=tcp:{GUEST_SERVER_ADDR}:{GUEST_SERVER_PORT}-cmd:{cmd}"
        return [
            QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(self.smp),
            "-m", str(self.memory_mb), "-no-reboot", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-monitor", "none",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.cmdline,
            "-drive", f"file={self.image.path},if=virtio,format=raw,cache=unsafe",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
        ]

    def start(self) -> VM:
        # One VM at a time on a shared machine: MANDOS_VM_LOCK names a lock file
        # (flock(2), the same lock as flock(1)) held while the VM runs.
        # The lock is per process: a test that runs two VMs of its own at once (a server
        # VM and its client) takes it once, or it would wait for itself for ever.
        lockfile = os.environ.get("MANDOS_VM_LOCK")
        if lockfile:
            _vm_lock_acquire(lockfile)
            self._lock_fd = 1
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.argv(),
                                         stdin=subprocess.PIPE if self.interactive
                                         else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        except BaseException:
            self.stop()  # releases the lock
            raise
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def type(self, text: bytes) -> None:
        """Type *text* on the serial console (an interactive VM only)."""
        assert self.proc and self.proc.stdin, "VM(interactive=True) to type"
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        with self.logfile.open("w", encoding="utf-8", errors="replace") as log:
            buf = b""
            while True:
                chunk = self.proc.stdout.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    break
                buf += chunk
                *complete, buf = buf.split(b"\n")
                with self._cond:
                    for raw in complete:
                        line = raw.decode("utf-8", "replace").rstrip("\r")
                        self._lines.append(line)
                        log.write(line + "\n")
                    log.flush()
                    self._cond.notify_all()
            with self._cond:
                if buf:
                    self._lines.append(buf.decode("utf-8", "replace"))
                    log.write(self._lines[-1] + "\n")
                self._lines.append("")  # EOF marker for waiters
                self._cond.notify_all()

    @property
    def console(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def wait_for(self, pattern: str, timeout: float) -> str | None:
        """The first console line matching the regex *pattern*, or None at the deadline/exit."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None
                                 and self._reader is not None and not self._reader.is_alive()):
                    return None
                self._cond.wait(min(left, 0.5))

    def boot(self, timeout: float) -> BootResult:
        """Wait for the root's marker (or the VM's end, or *timeout*), then stop the VM."""
        line = self.wait_for(re.escape(ROOT_MARKER), timeout)
        elapsed = time.monotonic() - self.started
        if line is not None:
            # let the root power off by itself, briefly
            try:
                assert self.proc
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.stop()
        return BootResult(self.console, line is not None, elapsed,
                          self.proc.returncode if self.proc else None)

    def stop(self) -> None:
        try:
            if self.proc is None:
                return
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
            if self._reader is not None:
                self._reader.join(10)
        finally:
            if self._lock_fd is not None:
                _vm_lock_release()
                self._lock_fd = None

    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- console timing

_TS = re.compile(r"^\[\s*([0-9]+\.[0-9]+)\]\s?(.*)$")


def timestamped(console: str) -> list[tuple[float, str]]:
    """Console lines that carry a kernel/journald ``[  12.345678]`` timestamp."""
    out = []
    for line in console.splitlines():
        m = _TS.match(line.strip())
        if m:
            out.append((float(m.group(1)), m.group(2)))
    return out


def first_time(console: str, pattern: str) -> float | None:
    rx = re.compile(pattern)
    for t, text in timestamped(console):
        if rx.search(text):
            return t
    return None


# ---------------------------------------------------------------- the relay


def relay(host: str, port: int) -> int:
    """Copy stdin to HOST:PORT and back until both sides are done (one guest connection)."""
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as e:
        print(f"relay: {host}:{port}: {e}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    sel = selectors.DefaultSelector()
    stdin, stdout = sys.stdin.buffer.fileno(), sys.stdout.buffer.fileno()
    os.set_blocking(stdin, False)
    sel.register(stdin, selectors.EVENT_READ, "in")
    sel.register(sock, selectors.EVENT_READ, "sock")
    open_sides = 2
    while open_sides:
        for key, _ in sel.select(timeout=120):
            if key.data == "in":
                try:
                    data = os.read(stdin, 65536)
                except BlockingIOError:
                    continue
                if data:
                    sock.sendall(data)
                else:
                    sel.unregister(stdin)
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    open_sides -= 1
            else:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if data:
                    view = memoryview(data)
                    while view:
                        try:
                            n = os.write(stdout, view)
                        except BlockingIOError:
                            with selectors.DefaultSelector() as w:  # until it takes more
                                w.register(stdout, selectors.EVENT_WRITE)
                                w.select(5)
                            continue
                        view = view[n:]
                else:
                    sel.unregister(sock)
                    try:
                        os.close(stdout)
                    except OSError:
                        pass
                    open_sides -= 1
    sock.close()
    return 0


def bind_exec(args: Sequence[str]) -> int:
    """``SRC DEST ... -- ARGV``: bind-mount each SRC on DEST, then exec ARGV.

    Run under ``unshare --mount --propagation private`` (see :func:`build_initrd`):
    the mounts vanish with the namespace.
    """
    sep = list(args).index("--")
    pairs, argv = list(args[:sep]), list(args[sep + 1:])
    if len(pairs) % 2 or not argv:
        print("usage: vmlib.py bind-exec SRC DEST ... -- ARGV", file=sys.stderr)
        return 2
    for src, dest in zip(pairs[::2], pairs[1::2], strict=True):
        subprocess.run(["mount", "--bind", src, dest], check=True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "relay":
        sys.exit(relay(sys.argv[2], int(sys.argv[3])))
    if len(sys.argv) > 3 and sys.argv[1] == "bind-exec" and "--" in sys.argv:
        sys.exit(bind_exec(sys.argv[2:]))
    print("usage: vmlib.py relay HOST PORT | bind-exec SRC DEST ... -- ARGV", file=sys.stderr)
    sys.exit(2)


# -- our initrd and root image, built once per test session (test_vm_boot, test_vm_debian) --

PASSPHRASE = b"vm root passphrase \xc3\xa9"
CLIENT = "vmclient"
BOOT_TIMEOUT = 300  # seconds to the real root: ~25 s under TCG idle, 165 s seen at load 45


@dataclass
class Setup:
    work: Path
    image: RootImage
    keys: Path
    section: str
    kernel: Path
    kver: str
    initrd: Path
    build_seconds: float


_built: list[Setup] = []


def our_setup(tmp_path_factory: TempPathFactory) -> Setup:
    """The root image and our initrd, built once per test session (also used by
    tests/test_vm_debian.py, which boots it against Debian's Mandos server)."""
    if not _built:
        _built.append(_build(tmp_path_factory.mktemp("vm")))
    return _built[0]


def _build(work: Path) -> Setup:
    from tests.helpers import enroll, make_keys

    found = find_kernel()
    assert found
    kernel, kver = found
    image = make_root_image(work, PASSPHRASE)
    keys = make_keys(work / "keys", CLIENT)
    # The checker pings the loopback: nothing may leave this machine.
    section = enroll(keys, PASSPHRASE, CLIENT, host="127.0.0.1")
    initrd = work / "initrd.img"
    conf = (f'mandos_keydir="{keys}"\n'
            f'mandos_servers="{GUEST_SERVER_ADDR}:{GUEST_SERVER_PORT}"\n'
            f'mandos_pythonpath="{ROOT}"\n')
    t0 = time.monotonic()
    build_initrd(work, initrd, kver, modules=[MODULE_NAME], conf=conf)
    return Setup(work, image, keys, section, kernel, kver, initrd, time.monotonic() - t0)
