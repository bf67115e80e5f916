"""Benchmark: from an ``ask.*`` file appearing to the asker holding the password.

Side by side, in one run, interleaved round by round, each agent on its own
private ask directory, every server on loopback:

- ``ours``            mandos-password-agent, already running, mandosd on 127.0.0.1
- ``ours-cold``       mandos-password-agent --exit-when-idle started when the question
                      appears (what its .path unit does), same server
                      (both run as in the initrd: ``/usr/bin/python3 -m password_agent.agent``)
- ``ours-own``        as ``ours``, with the keys our own mandos-keygen makes (Ed25519 TLS,
                      Curve25519 OpenPGP) instead of Debian's RSA keys
- ``mandos``          Debian's Mandos password-agent + mandos-client 1.8.16, started when the
                      question appears (it exits when no question is left, so this *is*
                      its normal mode: its .path unit starts it), Mandos server on [::1]
- ``clevis``          clevis-luks-askpass -l (already running, polls every 0.5 s), tangd on
                      127.0.0.1, a LUKS2 image on a loop device bound with ``clevis luks bind``

The same OpenPGP/TLS keys (made by Debian's mandos-keygen) and the same clients.conf
section serve ours and Debian's.  The asker is a test double that speaks systemd's
protocol (a SO_PASSCRED datagram socket and the ask file, renamed into place); the
clock starts just before the rename and stops when the datagram arrives.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import stop  # noqa: E402
from tests.agentlib import AgentProc, FakeAsker  # noqa: E402
from tests.helpers import Mandosd, enroll, free_port, make_keys  # noqa: E402

PASSWORD = b"bench passphrase"
MANDOS_KEYGEN = "/usr/sbin/mandos-keygen"
INITRD_PYTHON = "/usr/bin/python3"
MANDOS_SERVER = "/usr/sbin/mandos"
MANDOS_AGENT = "/usr/lib/dracut/modules.d/90mandos/password-agent"
MANDOS_CLIENT = "/usr/lib/x86_64-linux-gnu/mandos/plugins.d/mandos-client"
TANGD = "/usr/libexec/tangd"
TANGD_KEYGEN = "/usr/libexec/tangd-keygen"
CLEVIS_ASKPASS = "/usr/libexec/clevis-luks-askpass"

_QUESTIONS = itertools.count()

DBUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={sock}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_type="method_call"/>
<allow send_destination="*"/><allow receive_sender="*"/></policy></busconfig>
"""


def say(msg: str) -> None:
    print(f"bench/agent: {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


@dataclass
class Variant:
    name: str
    what: str
    ask_dir: Path
    expected: bytes
    #: Called right after the question appeared (e.g. to start a per-question agent).
    on_question: Callable[[], subprocess.Popen[bytes] | None] = lambda: None
    times_ms: list[float] = field(default_factory=list)
    failures: int = 0

    def measure(self, timeout: float = 10) -> None:
        # A new Id each time: the agent rightly ignores the same asker asking the same again
        # (that means its answer was refused).
        asker = FakeAsker(self.ask_dir, f"cryptsetup:{self.device}-{next(_QUESTIONS)}")
        proc = self.on_question()
        try:
            got = asker.answer(timeout)
            t = (time.monotonic() - asker.published) * 1000
            if got is None or got[0].rstrip(b"\0") != b"+" + self.expected:
                self.failures += 1
            else:
                self.times_ms.append(t)
        finally:
            asker.close()
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    device: str = "/dev/bench"


class Bench(contextlib.ExitStack):
    def __init__(self, base: Path) -> None:
        super().__init__()
        self.base = base

    def spawn(self, argv: list[str], log: str, **kw: object) -> subprocess.Popen[bytes]:
        out = (self.base / log).open("ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,  # type: ignore[call-overload]
                             **kw)
        self.callback(stop, p)
        return p  # type: ignore[no-any-return]

    # --- keys shared by ours and Debian's Mandos ------------------------------------------------

    def mandos_keys(self) -> tuple[Path, str]:
        keys = self.base / "keys"
        keys.mkdir(mode=0o755)
        run([MANDOS_KEYGEN, "--dir", str(keys), "--length", "2048", "--sublength", "2048",
             "--name", "bench"])
        pw = self.base / "pw"
        pw.write_bytes(PASSWORD)
        section = run([MANDOS_KEYGEN, "--dir", str(keys), "--name", "bench", "--passfile",
                       str(pw), "--no-ssh"]).stdout.decode()
        pw.unlink()
        # Our mandos-keygen also writes the certificate that Python's ssl needs; Debian's
        # does not (ours would then make one at start, with the cryptography module).
        from mandos_keygen.certificate import self_signed_pem

        (keys / "tls-cert.pem").write_bytes(self_signed_pem((keys / "tls-privkey.pem")
                                                            .read_bytes()))
        # Debian's agent runs mandos-client as an unprivileged user: let it read the copy.
        for f in keys.iterdir():
            f.chmod(0o644)
        return keys, "[DEFAULT]\nchecker = true\n" + section

    # --- ours ------------------------------------------------------------------------------------

    def ours(self, keys: Path, section: str) -> tuple[Variant, Variant, Variant]:
        # A second client with the keys our own mandos-keygen makes (Ed25519 / Curve25519
        # OpenPGP), as deployed: the same server serves both.
        own_keys = make_keys(self.base / "own-keys", "bench-own")
        own_section = enroll(own_keys, PASSWORD, "bench-own", host="127.0.0.1")
        srv = Mandosd(self.base / "mandosd", sections=[section, own_section])
        srv.start()
        self.callback(srv.stop)
        warm = self.base / "ask-ours"
        warm.mkdir()
        agent = initrd_python(AgentProc(self.base, keys, [srv.address], ask_dir=warm))
        agent.start(wait_ready=False)
        self.callback(agent.stop)
        agent.wait_log("watching ")
        running = Variant("ours", "mandos-password-agent, running", warm, PASSWORD)

        own_dir = self.base / "ask-ours-own"
        own_dir.mkdir()
        own = initrd_python(AgentProc(self.base, own_keys, [srv.address], ask_dir=own_dir))
        own.start(wait_ready=False)
        self.callback(own.stop)
        own.wait_log("watching ")
        running_own = Variant("ours-own", "the same, with keys from our mandos-keygen "
                              "(Ed25519/Curve25519)", own_dir, PASSWORD)

        cold_dir = self.base / "ask-ours-cold"
        cold_dir.mkdir()
        cold_agent = initrd_python(AgentProc(self.base, keys, [srv.address], ask_dir=cold_dir))
        cold_agent.argv.append("--exit-when-idle")
        log = (self.base / "ours-cold.log").open("ab")

        def start_cold() -> subprocess.Popen[bytes]:
            return subprocess.Popen(cold_agent.argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, cwd=ROOT, env=cold_agent.env)

        cold = Variant("ours-cold", "mandos-password-agent --exit-when-idle, started per "
                       "question", cold_dir, PASSWORD, start_cold)
        return running, cold, running_own

    # --- Debian's Mandos -------------------------------------------------------------------------

    def debian_mandos(self, keys: Path, section: str) -> Variant:
        conf = self.base / "mandos-conf"
        conf.mkdir()
        (conf / "clients.conf").write_text(section)
        (conf / "mandos.conf").write_text("[DEFAULT]\nuse_dbus = False\nzeroconf = False\n"
                                          "restore = False\n")
        state = self.base / "mandos-state"
        state.mkdir()
        dbus_sock = self.base / "dbus.sock"
        (self.base / "dbus.conf").write_text(DBUS_CONF.format(sock=dbus_sock))
        self.spawn(["dbus-daemon", "--nofork", f"--config-file={self.base / 'dbus.conf'}"],
                   "dbus.log")
        port = free_port(socket.AF_INET6)
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={dbus_sock}"}
        self.spawn([MANDOS_SERVER, "--configdir", str(conf), "--statedir", str(state),
                    "--no-dbus", "--no-zeroconf", "--foreground", "--address", "::1",
                    "--port", str(port)], "mandos.log", env=env)
        wait_port("::1", port)
        ask_dir = self.base / "ask-mandos"
        ask_dir.mkdir()
        argv = [MANDOS_AGENT, f"--agent-directory={ask_dir}", "--", MANDOS_CLIENT,
                f"--connect=[::1]:{port}", "--interface=none",
                f"--pubkey={keys / 'pubkey.txt'}", f"--seckey={keys / 'seckey.txt'}",
                f"--tls-pubkey={keys / 'tls-pubkey.pem'}",
                f"--tls-privkey={keys / 'tls-privkey.pem'}"]
        log = (self.base / "mandos-agent.log").open("ab")

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

        return Variant("mandos", "Debian password-agent + mandos-client, started per question",
                       ask_dir, PASSWORD, start)

    # --- clevis + tang ---------------------------------------------------------------------------

    def clevis(self) -> Variant:
        tang = self.base / "tang"
        tang.mkdir()
        run([TANGD_KEYGEN, str(tang)])
        port = free_port()
        self.spawn(["systemd-socket-activate", "--inetd", "-a", "-l", f"127.0.0.1:{port}",
                    TANGD, str(tang)], "tang.log")
        wait_port("127.0.0.1", port)
        image = self.base / "clevis.img"
        with image.open("wb") as f:
            f.truncate(32 * 1024 * 1024)
        keyfile = self.base / "clevis.key"
        keyfile.write_bytes(PASSWORD)
        run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
             "--pbkdf-force-iterations", "1000", "--key-file", str(keyfile), str(image)])
        loop = run(["losetup", "-f", "--show", str(image)]).stdout.decode().strip()
        self.callback(subprocess.run, ["losetup", "-d", loop], capture_output=True)
        run(["clevis", "luks", "bind", "-y", "-d", loop, "-k", str(keyfile), "tang",
             json.dumps({"url": f"http://127.0.0.1:{port}"})])
        keyfile.unlink()
        ask_dir = self.base / "ask-clevis"
        ask_dir.mkdir()
        # clevis-luks-askpass -l exits when no question is left: keep one it cannot answer.
        keep = FakeAsker(ask_dir, "home:keep-clevis-running")
        self.callback(keep.close)
        self.spawn([CLEVIS_ASKPASS, "-l", "-p", str(ask_dir)], "clevis.log")
        # clevis answers with the passphrase it generated for its own key slot
        v = Variant("clevis", "clevis-luks-askpass -l (polls every 0.5 s), tang",
                    ask_dir, b"")
        v.device = loop
        v.expected = b""  # checked below: any answer that the LUKS header accepts
        return v


def initrd_python(agent: AgentProc) -> AgentProc:
    """Run the agent as the initrd does: Debian's /usr/bin/python3 -m password_agent.agent."""
    agent.argv = [INITRD_PYTHON, *[a for a in agent.argv[1:] if a != "--debug"]]
    agent.env["PYTHONPATH"] = str(ROOT)
    return agent


def wait_port(host: str, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def clevis_measure(v: Variant, timeout: float = 10) -> None:
    """Like Variant.measure, but the secret is clevis's own: verify it against the header."""
    asker = FakeAsker(v.ask_dir, "cryptsetup:" + v.device)
    try:
        got = asker.answer(timeout)
        t = (time.monotonic() - asker.published) * 1000
    finally:
        asker.close()
    if got is None or not got[0].startswith(b"+"):
        v.failures += 1
        return
    if not v.expected:  # first answer: check it once against the LUKS header
        pw = got[0][1:].rstrip(b"\0")
        ok = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", "-",
                             v.device], input=pw, capture_output=True).returncode == 0
        if not ok:
            v.failures += 1
            return
        v.expected = pw
    elif got[0][1:].rstrip(b"\0") != v.expected:
        v.failures += 1
        return
    v.times_ms.append(t)


def table(variants: list[Variant]) -> str:
    ours = statistics.median(variants[0].times_ms) if variants[0].times_ms else float("nan")
    rows = [f"{'agent':<10} {'n':>3} {'median':>8} {'p90':>8} {'min':>8} {'max':>8} "
            f"{'vs ours':>8}  what"]
    for v in variants:
        t = sorted(v.times_ms)
        if not t:
            rows.append(f"{v.name:<10} {0:>3}  (no answer; {v.failures} failures)  {v.what}")
            continue
        med = statistics.median(t)
        p90 = t[min(len(t) - 1, int(round(0.9 * (len(t) - 1))))]
        rows.append(f"{v.name:<10} {len(t):>3} {med:>6.1f}ms {p90:>6.1f}ms {t[0]:>6.1f}ms "
                    f"{t[-1]:>6.1f}ms {med / ours:>7.1f}x  {v.what}"
                    + (f"  [{v.failures} failed]" if v.failures else ""))
    return "\n".join(rows)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="mandos-bench-agent-"))
    base.chmod(0o755)  # Debian's mandos-client runs unprivileged and reads the keys here
    try:
        yield base
    finally:
        if keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30, help="questions per agent (default 30)")
    ap.add_argument("--only", action="append",
                    choices=["ours", "ours-cold", "ours-own", "mandos", "clevis"],
                    help="run only these agents")
    ap.add_argument("--json", type=Path, help="also write the raw timings here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        say("must run as root (askers accept answers from root only; losetup)")
        return 2
    only = set(args.only or ["ours", "ours-cold", "ours-own", "mandos", "clevis"])
    with workdir(args.keep) as base, Bench(base) as bench:
        variants: list[Variant] = []
        need_mandos_keys = bool(only & {"ours", "ours-cold", "ours-own", "mandos"})
        if need_mandos_keys and not Path(MANDOS_KEYGEN).exists():
            say("Debian's mandos-keygen is missing (apt-get install mandos)")
            return 2
        if need_mandos_keys:
            keys, section = bench.mandos_keys()
            running, cold, own = bench.ours(keys, section)
            variants += [v for v in (running, cold, own) if v.name in only]
            if "mandos" in only:
                if Path(MANDOS_SERVER).exists() and Path(MANDOS_AGENT).exists():
                    variants.append(bench.debian_mandos(keys, section))
                else:
                    say("skipping Debian's Mandos: install mandos and mandos-client")
        if "clevis" in only:
            if Path(CLEVIS_ASKPASS).exists() and Path(TANGD).exists():
                variants.append(bench.clevis())
            else:
                say("skipping clevis: install clevis-luks clevis-systemd tang")
        say(f"{len(variants)} agents, {args.rounds} questions each, interleaved")
        time.sleep(0.5)
        for v in variants:  # one warm-up question each, not counted
            clevis_measure(v) if v.name == "clevis" else v.measure()
            v.times_ms.clear()
            v.failures = 0
        for _ in range(args.rounds):
            for v in random.sample(variants, len(variants)):
                # a random pause, so a polling agent is caught at a random phase
                time.sleep(random.uniform(0.05, 0.3))
                clevis_measure(v) if v.name == "clevis" else v.measure()
        print(table(variants))
        if variants and variants[0].name == "ours" and variants[0].times_ms:
            ours = statistics.median(variants[0].times_ms)
            others = [statistics.median(v.times_ms) for v in variants
                      if v.name in ("mandos", "clevis") and v.times_ms]
            verdict = ("met" if ours < 50 and all(o >= 4 * ours for o in others)
                       else "NOT met")
            print(f"target (median < 50 ms and >= 4x faster than Mandos and clevis): {verdict}")
            print(f"target (issue 10: the running agent answers in at most 20 ms): "
                  f"{'met' if ours <= 20 else 'NOT met'} ({ours:.1f} ms; load average "
                  f"{os.getloadavg()[0]:.1f})")
        if args.json:
            args.json.write_text(json.dumps({v.name: {"what": v.what, "ms": v.times_ms,
                                                      "failures": v.failures}
                                             for v in variants}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
