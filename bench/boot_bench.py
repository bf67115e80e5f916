"""Boot benchmark: the same VM unlocked by our dracut module and by clevis + tang.

Builds four initrds for Debian's kernel from one private dracut tree (base:
the lean systemd initrd with networking; ours: + mandos-nbde; clevis: +
clevis + clevis-pin-tang; Debian's Mandos: + mandos, size only), boots ours
and clevis's RUNS times each under TCG, with mandosd / tangd on the host's
loopback reached through the guestfwd relay, and prints a Markdown table:
question -> answer (``Starting systemd-cryptsetup@`` to systemd-cryptsetup's
``Set cipher`` line, i.e. the passphrase accepted), question -> unlocked,
total to the real root (guest clock), and initrd sizes.

Run as root: ``bench/boot [--runs N] [--json FILE]``.  ``--no-boot`` builds and
sizes the initrds only; ``--also-ours DIR`` adds a row for our module from another
checkout (``git archive REV | tar -x -C DIR``), e.g. the last ``ssl`` agent (e210bdd)
against the GnuTLS one.  Debian's module reads the keys at the fixed path
``/etc/keys/mandos``: the bench bind-mounts keys from Debian's ``mandos-keygen`` there
for dracut alone, so the host's own keys never go into a bench initrd.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import vmlib  # noqa: E402
from tests.debianlib import debian_keys  # noqa: E402
from tests.helpers import Mandosd, enroll, free_port, make_keys  # noqa: E402

PASSPHRASE = b"bench root passphrase"
TANGD = "/usr/libexec/tangd"
TANGD_KEYGEN = "/usr/libexec/tangd-keygen"
CLEVIS_MODULES = ["clevis", "clevis-pin-tang"]


@dataclass
class Boot:
    variant: str
    question: float | None
    answer: float | None
    unlocked: float | None
    root: float | None
    wall: float

    @property
    def to_answer(self) -> float | None:
        return None if self.question is None or self.answer is None else self.answer - self.question

    @property
    def to_unlocked(self) -> float | None:
        if self.question is None or self.unlocked is None:
            return None
        return self.unlocked - self.question


def timings(variant: str, result: vmlib.BootResult) -> Boot:
    c = result.console
    return Boot(variant,
                question=vmlib.first_time(c, r"Starting systemd-cryptsetup@"),
                answer=vmlib.first_time(c, r"systemd-cryptsetup\[\d+\]: Set cipher"),
                unlocked=vmlib.first_time(c, r"Finished systemd-cryptsetup@"),
                root=result.uptime_at_root(), wall=result.seconds)


class Tang:
    """tangd on 127.0.0.1, socket-activated per connection (its inetd mode)."""

    def __init__(self, base: Path) -> None:
        self.keys = base / "tang-keys"
        self.keys.mkdir(parents=True)
        vmlib.run([TANGD_KEYGEN, str(self.keys)])
        self.port = free_port()
        self.log = (base / "tangd.log").open("wb")
        self.proc = subprocess.Popen(
            ["systemd-socket-activate", "--inetd", "-a", "-l", f"127.0.0.1:{self.port}",
             TANGD, str(self.keys)], stdout=self.log, stderr=self.log,
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/adv",
                                            timeout=2) as r:
                    self.adv = r.read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        self.log.close()


def clevis_bind(image: vmlib.RootImage, adv: Path) -> None:
    """Bind the image to tang at the guest's view of the server; no fetch from here."""
    cfg = json.dumps({"url": f"http://{vmlib.GUEST_SERVER_ADDR}:{vmlib.GUEST_SERVER_PORT}",
                      "adv": str(adv)})
    vmlib.run(["clevis", "luks", "bind", "-y", "-d", str(image.path), "-k",
               str(image.passfile), "tang", cfg], timeout=120)


def debian_mandos_module(tree: Path) -> str:
    """A wrapper of Debian's 90mandos whose check() passes outside host-only mode."""
    orig = tree / "modules.d" / "90mandos"
    if not orig.is_dir():
        return ""
    wrap = tree / "modules.d" / "89mandos-debian"
    wrap.mkdir()
    for f in orig.iterdir():
        if f.name != "module-setup.sh":
            (wrap / f.name).symlink_to(f)
    (wrap / "module-setup.sh").write_text(
        f". {orig}/module-setup.sh\ncheck() {{ return 0; }}\n")
    return "mandos-debian"


def fmt(x: float | None, unit: str = " s") -> str:
    return "–" if x is None else f"{x:.2f}{unit}"


def med(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/boot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1, help="boots per variant (default 1)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-boot", action="store_true", help="build and size the initrds only")
    ap.add_argument("--also-ours", type=Path, metavar="DIR",
                    help="also build our module from another checkout (size only)")
    args = ap.parse_args()
    reason = vmlib.skip_reason()
    if reason:
        print(f"bench/boot: cannot run: {reason}", file=sys.stderr)
        return 1
    for need in ("clevis", TANGD, TANGD_KEYGEN, "systemd-socket-activate"):
        if shutil.which(need) is None and not Path(need).exists():
            print(f"bench/boot: {need} missing (apt-get install clevis clevis-luks "
                  "clevis-dracut tang)", file=sys.stderr)
            return 1
    found = vmlib.find_kernel()
    assert found
    kernel, kver = found
    work = Path(tempfile.mkdtemp(prefix="bench-boot-"))
    print(f"work directory: {work}", file=sys.stderr)
    tang: Tang | None = None
    try:
        (work / "img-ours").mkdir()
        (work / "img-clevis").mkdir()
        base_img = vmlib.make_root_image(work / "img-ours", PASSPHRASE)
        clevis_img = vmlib.RootImage(work / "img-clevis" / "root.img", base_img.uuid,
                                     base_img.passfile)
        shutil.copyfile(base_img.path, clevis_img.path)
        tang = Tang(work)
        adv = work / "adv.jws"
        adv.write_bytes(tang.adv)
        clevis_bind(clevis_img, adv)

        keys = make_keys(work / "keys", "bench")
        section = enroll(keys, PASSPHRASE, "bench", host="127.0.0.1")
        tree = vmlib.private_dracut_tree(work)
        mandos_debian = debian_mandos_module(tree)
        other_tree = None
        if args.also_ours:
            (work / "other").mkdir()
            other_tree = vmlib.private_dracut_tree(work / "other",
                                                   module_src=args.also_ours / "dracut-module")
        deb_keys = debian_keys(work / "debian-keys") if mandos_debian else None
        conf = (f'mandos_keydir="{keys}"\n'
                f'mandos_servers="{vmlib.GUEST_SERVER_ADDR}:{vmlib.GUEST_SERVER_PORT}"\n'
                f'mandos_pythonpath="{vmlib.ROOT}"\n')
        variants: dict[str, list[str]] = {"base": [], "ours": [vmlib.MODULE_NAME],
                                          "clevis": CLEVIS_MODULES}
        if mandos_debian:
            variants["mandos (Debian)"] = [mandos_debian]
        if other_tree is not None:
            variants[f"ours ({args.also_ours})"] = [vmlib.MODULE_NAME]
        initrds: dict[str, Path] = {}
        build_s: dict[str, float] = {}
        for i, (name, mods) in enumerate(variants.items()):
            d = work / f"build-{i}-{name.split()[0]}"
            d.mkdir()
            out = d / "initrd.img"
            t0 = time.monotonic()
            this_tree, this_conf = tree, conf
            binds: list[tuple[Path, str]] = []
            if name.startswith("ours (") and other_tree is not None and args.also_ours:
                this_tree = other_tree
                this_conf = conf.replace(f'mandos_pythonpath="{vmlib.ROOT}"',
                                         f'mandos_pythonpath="{args.also_ours.resolve()}"')
            if name == "mandos (Debian)" and deb_keys is not None \
                    and Path("/etc/keys/mandos").is_dir():
                binds = [(deb_keys, "/etc/keys/mandos")]
            try:
                vmlib.build_initrd(d, out, kver, modules=mods, conf=this_conf,
                                   dracut_tree=this_tree, binds=binds)
            except RuntimeError as e:
                print(f"bench/boot: {name}: initrd build failed: {e}", file=sys.stderr)
                continue
            build_s[name] = time.monotonic() - t0
            initrds[name] = out
        sizes = {k: v.stat().st_size for k, v in initrds.items()}

        cmdline_extra = ["ip=dhcp", "rd.neednet=1"]
        boots: list[Boot] = []
        with Mandosd(work / "srv", sections=[section]) as srv:
            for i in range(0 if args.no_boot else args.runs):
                for name, img, port in (("ours", base_img, srv.port),
                                        ("clevis", clevis_img, tang.port)):
                    cmd = vmlib.kernel_cmdline(img, *cmdline_extra, net=False)
                    log = work / f"console-{name}-{i}.log"
                    with vmlib.VM(kernel, initrds[name], img, cmd, log, server_port=port) as vm:
                        res = vm.boot(180)
                    b = timings(name, res)
                    boots.append(b)
                    print(f"run {i + 1} {name}: question->answer {fmt(b.to_answer)}, "
                          f"->unlocked {fmt(b.to_unlocked)}, root at {fmt(b.root)}"
                          + ("" if res.reached_root else f"  (NO ROOT; see {log})"),
                          file=sys.stderr)

        base = sizes.get("base")
        print(f"\nBoot benchmark, {args.runs} run(s) each, median; qemu TCG -smp 2, "
              f"kernel {kver}; times on the guest's clock.\n")
        print("| | question → answer | question → unlocked | to the real root | initrd | "
              "added to the lean initrd |")
        print("|---|---|---|---|---|---|")
        for name in initrds:
            bs = [b for b in boots if b.variant == name]
            added = "" if base is None or name == "base" else \
                f"{(sizes[name] - base) / 1e6:+.1f} MB"
            if bs:
                row = (fmt(med([b.to_answer for b in bs])), fmt(med([b.to_unlocked for b in bs])),
                       fmt(med([b.root for b in bs])))
            else:
                row = ("(not booted)",) * 3 if name != "base" else ("–",) * 3
            print(f"| {name} | {' | '.join(row)} | {sizes[name] / 1e6:.1f} MB | {added} |")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "kernel": kver, "runs": args.runs, "sizes": sizes, "build_seconds": build_s,
                "boots": [asdict(b) | {"to_answer": b.to_answer, "to_unlocked": b.to_unlocked}
                          for b in boots]}, indent=2))
        return 0
    finally:
        if tang is not None:
            tang.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
