"""bench/fetch: one full fetch, process start to passphrase printed, two clients x two servers.

Runs on loopback, in one run, interleaved, each row against its own server
process (so each server's CPU time belongs to one row):

- our ``mandos-client`` (raw public key through GnuTLS) with our keygen's keys
  (Ed25519 TLS, Curve25519 OpenPGP) against mandosd;
- our ``mandos-client`` with Debian's keygen's keys (Ed25519 TLS, RSA-4096
  OpenPGP) against mandosd, and against Debian's Mandos;
- Debian's ``mandos-client`` with the same keys against Debian's Mandos, and
  against mandosd.

Each server knows the one client it serves.  Reports median and p90 latency and
the server's CPU time per secret served (Mandos: children included, it forks
per connection).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MANDOS_KEYGEN,
    cpu_seconds,
    free_port,
    have_mandos,
    mandos_client_argv,
    mandos_server,
    median,
    ours,
    p90,
    start_mandosd,
    stop,
    table,
    tempdir,
    time_to_output,
)

SECRET = b"benchmark passphrase"
MANDOS = "Debian Mandos 1.8.16"
#: row key -> row name; the keys are what bench/all reads from the JSON
ROWS = {
    "ours": "our mandos-client -> mandosd (our keys)",
    "ours-debkeys": "our mandos-client -> mandosd (Debian's keygen keys)",
    "ours-mandos": f"our mandos-client -> {MANDOS} (Debian's keygen keys)",
    "mandos": f"Debian mandos-client -> {MANDOS}",
    "deb-mandosd": "Debian mandos-client -> mandosd",
}


def our_client_argv(keys: Path, address: str) -> list[str]:
    return [ours("mandos-client"), "--connect", address, "--keydir", str(keys)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--runs", type=int, default=20, help="fetches per row")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    with tempdir("bench-fetch-") as base, ExitStack() as stack:
        # our keys (Ed25519 TLS, Curve25519 OpenPGP)
        keys = base / "keys"
        subprocess.run([ours("mandos-keygen"), "--dir", str(keys), "--name", "bench"],
                       check=True, capture_output=True)
        section = subprocess.run([ours("mandos-keygen"), "--dir", str(keys), "--name", "bench",
                                  "--passfile", "/dev/stdin"], input=SECRET, check=True,
                                 capture_output=True, text=False).stdout.decode()

        def mandosd(name: str, sections: str) -> tuple[subprocess.Popen[bytes], str]:
            conf = base / f"conf-{name}"
            conf.mkdir()
            (conf / "clients.conf").write_text(sections)
            port = free_port()
            (base / f"state-{name}").mkdir()
            srv = start_mandosd(conf, base / f"state-{name}" / "state", "::1", port)
            stack.callback(stop, srv)
            return srv, f"[::1]:{port}"

        # row key -> (argv, server process)
        systems: dict[str, tuple[list[str], subprocess.Popen[bytes]]] = {}
        srv, addr = mandosd("ours", section)
        systems["ours"] = (our_client_argv(keys, addr), srv)
        if have_mandos():
            dkeys = base / "dkeys"
            dkeys.mkdir(mode=0o700)
            subprocess.run([MANDOS_KEYGEN, "--dir", str(dkeys), "--name", "deb"], check=True,
                           capture_output=True)
            (base / "pw").write_bytes(SECRET)
            dsection = subprocess.run([MANDOS_KEYGEN, "--dir", str(dkeys), "--name", "deb",
                                       "--passfile", str(base / "pw"), "--no-ssh"], check=True,
                                      capture_output=True, text=True).stdout
            hooks = base / "empty-network-hooks"
            hooks.mkdir()
            srv, addr = mandosd("ours-debkeys", dsection)
            systems["ours-debkeys"] = (our_client_argv(dkeys, addr), srv)
            srv, addr = mandosd("deb-mandosd", dsection)
            systems["deb-mandosd"] = (mandos_client_argv(dkeys, addr, hooks), srv)
            for key in ("ours-mandos", "mandos"):
                (base / key).mkdir()
                port = free_port()
                msrv = stack.enter_context(mandos_server(base / key, dsection, port))
                argv = (our_client_argv(dkeys, f"[::1]:{port}") if key == "ours-mandos"
                        else mandos_client_argv(dkeys, f"[::1]:{port}", hooks))
                systems[key] = (argv, msrv)
        times: dict[str, list[float]] = {k: [] for k in systems}
        for key, (argv, _) in systems.items():  # warm up
            _, out = time_to_output(argv)
            if out != SECRET:
                raise SystemExit(f"{ROWS[key]}: wrong output {out!r}")
        cpu_before = {k: cpu_seconds(s.pid) for k, (_, s) in systems.items()}
        for _ in range(args.runs):
            for key, (argv, _) in systems.items():
                t, out = time_to_output(argv)
                assert out == SECRET, (key, out)
                times[key].append(t)
        cpu = {k: (cpu_seconds(s.pid) - cpu_before[k]) / args.runs
               for k, (_, s) in systems.items()}

    rows = []
    ref = "mandos"
    for key, ts in times.items():
        ratio = (f"{median(times[ref]) / median(ts):.1f}x faster"
                 if ref in times and key != ref else "")
        rows.append([ROWS[key], f"{median(ts) * 1000:.0f} ms", f"{p90(ts) * 1000:.0f} ms",
                     f"{cpu[key] * 1000:.2f} ms", ratio])
    load1, load5, _ = os.getloadavg()
    print(f"Full fetch on loopback, process start to passphrase printed ({args.runs} runs "
          f"each, interleaved; each server knows one client; load average at the end "
          f"{load1:.1f}/{load5:.1f})\n")
    print(table(rows, ["client -> server", "median", "p90", "server CPU/secret",
                       "vs Debian's pair"]))
    if ref in cpu:
        print()
        for client, a, b in (("Debian's mandos-client", "mandos", "deb-mandosd"),
                             ("our mandos-client", "ours-mandos", "ours-debkeys")):
            print(f"{client}: server CPU per secret, Mandos {cpu[a] * 1000:.1f} ms, mandosd "
                  f"{cpu[b] * 1000:.2f} ms ({cpu[a] / max(cpu[b], 1e-9):.0f}x less); latency "
                  f"{median(times[a]) * 1000:.0f} ms vs {median(times[b]) * 1000:.0f} ms")
    else:
        print("\n(Debian's mandos and mandos-client are not installed: no comparison)")
    if args.json:
        args.json.write_text(json.dumps({
            key: {"name": ROWS[key], "median_ms": median(ts) * 1000, "p90_ms": p90(ts) * 1000,
                  "server_cpu_ms": cpu[key] * 1000}
            for key, ts in times.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
