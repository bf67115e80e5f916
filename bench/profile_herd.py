"""bench/profile_herd: where mandosd's CPU goes in a herd (cProfile, and perf if present).

Starts mandosd (its own code, this checkout) under cProfile, sends it herds of
N raw-key (or X.509) clients from the load generator, stops it, and prints the
functions by own time and by cumulative time.  With ``--perf``, a second
mandosd without cProfile is sampled by ``perf record`` and the time is split
by shared object (Python itself, libgnutls, nettle/hogweed, libc, kernel).

    PYTHONPATH=$PWD .venv/bin/python bench/profile_herd.py -n 500 --rounds 3 [--perf]
"""

from __future__ import annotations

import argparse
import asyncio
import pstats
import resource
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, free_port, start_ready, stop, tempdir, wait_port  # noqa: E402
from loadgen import MODES, herd, make_identities  # noqa: E402

PROFILED = """
import cProfile, runpy, sys, time
sys.argv[0] = "mandosd"
prof = cProfile.Profile(time.thread_time)
prof.enable()
try:
    runpy.run_module("mandosd", run_name="__main__")
except SystemExit:
    pass
finally:
    prof.disable()
    prof.dump_stats({out!r})
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=500, help="clients per herd")
    ap.add_argument("--rounds", type=int, default=3, help="herds per server")
    ap.add_argument("--mode", choices=MODES, default="rawpk")
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--perf", action="store_true", help="also sample with perf record")
    ap.add_argument("--compare-priority", metavar="STRING",
                    help="instead: A/B server CPU per secret, default priority vs this one")
    ap.add_argument("--ab-rounds", type=int, default=5)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8 * args.n)), hard))
    with tempdir("bench-profile-") as base:
        idents = make_identities(base / "ids", args.n)
        conf = base / "conf"
        conf.mkdir()
        (conf / "clients.conf").write_text("\n".join(i.section() for i in idents))
        (conf / "clients.conf").chmod(0o600)

        def start(prefix: list[str], conf: Path) -> tuple[subprocess.Popen[bytes], int]:
            """mandosd socket-activated, as in production and bench/herd (no checkers)."""
            port = free_port()
            shutil.rmtree(base / "state", ignore_errors=True)
            mod = [] if prefix[-1].endswith(".py") else ["-m", "mandosd"]
            argv = ["systemd-socket-activate", "-E", "NOTIFY_SOCKET", "-E", "PATH", "-E",
                    "PYTHONPATH", "-l", f"127.0.0.1:{port}", *prefix, *mod, "--configdir",
                    str(conf), "--statedir", str(base / "state")]
            srv = start_ready(argv, trigger=lambda: wait_port("127.0.0.1", port),
                              log=base / "mandosd.log")
            return srv, port

        def run(prefix: list[str], label: str, conf: Path = conf) -> float:
            srv, port = start(prefix, conf)
            try:
                c0 = cpu_seconds(srv.pid)
                served = 0
                for _ in range(args.rounds):
                    res = asyncio.run(herd("127.0.0.1", port, idents, mode=args.mode))
                    served += res.ok
                    if res.errors:
                        print(f"  errors: {res.errors}", file=sys.stderr)
                cpu = (cpu_seconds(srv.pid) - c0) * 1000 / max(served, 1)
                print(f"{label}: {served} secrets, server CPU {cpu:.2f} ms per secret",
                      flush=True)
                return cpu
            finally:
                srv.send_signal(signal.SIGTERM)
                srv.wait(60)

        if args.compare_priority:
            # A/B in one run, interleaved: the default priority string against this one
            other = base / "conf-other"
            other.mkdir()
            shutil.copy(conf / "clients.conf", other / "clients.conf")
            (other / "mandos.conf").write_text(
                "[DEFAULT]\npriority = " + args.compare_priority.replace("%", "%%") + "\n")
            a: list[float] = []
            b: list[float] = []
            for _ in range(args.ab_rounds):
                a.append(run([sys.executable], "default priority"))
                b.append(run([sys.executable], "compared priority", other))
            print(f"default priority: median {statistics.median(a):.3f} ms; compared "
                  f"({args.compare_priority}): median {statistics.median(b):.3f} ms")
            return 0
        run([sys.executable], "plain")
        prof = base / "mandosd.prof"
        # the event loop's own CPU time (time.thread_time), not wall time: on a busy
        # machine wall time charges other processes' turns to whatever runs here
        runner = base / "profiled.py"
        runner.write_text(PROFILED.format(out=str(prof)))
        run([sys.executable, str(runner)], "under cProfile (loop thread CPU time)")
        st = pstats.Stats(str(prof))
        st.sort_stats("tottime").print_stats(args.top)
        st.sort_stats("cumulative").print_stats(args.top)
        if args.perf and shutil.which("perf"):
            data = base / "perf.data"
            srv, port = start([sys.executable], conf)
            rec = subprocess.Popen(["perf", "record", "-F", "2000", "-g", "-o", str(data),
                                    "-p", str(srv.pid)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            try:
                for _ in range(args.rounds):
                    asyncio.run(herd("127.0.0.1", port, idents, mode=args.mode))
            finally:
                rec.send_signal(signal.SIGINT)
                rec.wait(60)
                stop(srv)
            out = subprocess.run(["perf", "report", "-i", str(data), "--no-children",
                                  "--sort", "dso", "--stdio"], capture_output=True, text=True)
            print("\n".join(ln for ln in out.stdout.splitlines()
                            if ln.strip() and not ln.startswith("#") and "%" in ln
                            and not ln.startswith(" ") or ln.startswith("    ")
                            and "%" in ln[:12])[:4000])
            out = subprocess.run(["perf", "report", "-i", str(data), "--no-children",
                                  "--sort", "dso,sym", "--stdio", "-g", "none"],
                                 capture_output=True, text=True)
            print("\n".join([ln for ln in out.stdout.splitlines()
                             if ln.strip() and not ln.startswith("#")][:45]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
