"""bench/fetch: one full fetch, process start to passphrase printed, ours vs Mandos.

Runs on loopback, in one run, interleaved: our mandos-client against mandosd,
and Debian's mandos-client against Debian's Mandos server.  Reports median and
p90 latency and the server's CPU time per secret served.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
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

from mandos_keygen.certificate import self_signed_pem  # noqa: E402

SECRET = b"benchmark passphrase"


def our_client_argv(keys: Path, port: int) -> list[str]:
    return [ours("mandos-client"), "--connect", f"[::1]:{port}", "--keydir", str(keys)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", "--runs", type=int, default=20, help="fetches per system")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    with tempdir("bench-fetch-") as base:
        # our keys (Ed25519 TLS, Curve25519 OpenPGP) and Debian's (RSA-4096 OpenPGP)
        keys = base / "keys"
        subprocess.run([ours("mandos-keygen"), "--dir", str(keys), "--name", "bench"],
                       check=True, capture_output=True)
        section = subprocess.run([ours("mandos-keygen"), "--dir", str(keys), "--name", "bench",
                                  "--passfile", "/dev/stdin"], input=SECRET, check=True,
                                 capture_output=True, text=False).stdout.decode()
        systems: dict[str, tuple[list[str], subprocess.Popen[bytes] | None]] = {}
        conf = base / "conf"
        conf.mkdir()
        rows = []
        port = free_port()
        mandos = have_mandos()
        if mandos:
            dkeys = base / "dkeys"
            dkeys.mkdir(mode=0o700)
            subprocess.run([MANDOS_KEYGEN, "--dir", str(dkeys), "--name", "deb"], check=True,
                           capture_output=True)
            (base / "pw").write_bytes(SECRET)
            dsection = subprocess.run([MANDOS_KEYGEN, "--dir", str(dkeys), "--name", "deb",
                                       "--passfile", str(base / "pw"), "--no-ssh"], check=True,
                                      capture_output=True, text=True).stdout
            # the same RSA-4096 keys for our client too, to separate gpg's share
            okeys = base / "dkeys-ours"
            shutil.copytree(dkeys, okeys)
            (okeys / "tls-cert.pem").write_bytes(
                self_signed_pem((okeys / "tls-privkey.pem").read_bytes()))
            section += "\n" + dsection
        (conf / "clients.conf").write_text(section)
        (conf / "clients.conf").chmod(0o600)  # mandosd refuses one others can read
        srv = start_mandosd(conf, base / "state", "::1", port)
        systems["ours (ECC keys)"] = (our_client_argv(keys, port), srv)
        ctx = None
        try:
            if mandos:
                mport = free_port()
                ctx = mandos_server(base, dsection, mport)
                msrv = ctx.__enter__()
                systems["ours (Mandos's RSA-4096 keys)"] = (our_client_argv(okeys, port), srv)
                systems["Debian Mandos 1.8.16"] = (mandos_client_argv(dkeys, mport), msrv)
            times: dict[str, list[float]] = {k: [] for k in systems}
            cpu: dict[str, float] = {}
            for name, (argv, _) in systems.items():  # warm up
                _, out = time_to_output(argv)
                if out != SECRET:
                    raise SystemExit(f"{name}: wrong output {out!r}")
            cpu_before = {n: cpu_seconds(s.pid) for n, (_, s) in systems.items() if s}
            for _ in range(args.runs):
                for name, (argv, _) in systems.items():
                    t, out = time_to_output(argv)
                    assert out == SECRET, (name, out)
                    times[name].append(t)
            for name, (_, s) in systems.items():
                if s:
                    cpu[name] = cpu_seconds(s.pid) - cpu_before[name]
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
            stop(srv)
        ref = "Debian Mandos 1.8.16"
        # both "ours" rows share one mandosd: its CPU over the run covers both rows' secrets
        our_cpu = cpu["ours (ECC keys)"]
        per_secret_ours = our_cpu / (args.runs * (2 if mandos else 1))
        for name, ts in times.items():
            ratio = (f"{median(times[ref]) / median(ts):.1f}x faster" if ref in times
                     and name != ref else "")
            if name == ref:
                per = cpu[name] / args.runs
            else:
                per = per_secret_ours
            rows.append([name, f"{median(ts) * 1000:.0f} ms", f"{p90(ts) * 1000:.0f} ms",
                         f"{per * 1000:.2f} ms", ratio])
        print(f"Full fetch on loopback, process start to passphrase printed "
              f"({args.runs} runs each, interleaved)\n")
        print(table(rows, ["system", "median", "p90", "server CPU/secret", "vs Mandos"]))
        if ref in cpu:
            print(f"\nserver CPU per secret: Mandos {cpu[ref] / args.runs * 1000:.1f} ms, "
                  f"ours {per_secret_ours * 1000:.2f} ms "
                  f"({cpu[ref] / args.runs / max(per_secret_ours, 1e-9):.0f}x less)")
        else:
            print("\n(Debian's mandos and mandos-client are not installed: no comparison)")
        if args.json:
            import json

            args.json.write_text(json.dumps({
                name: {"median_ms": median(ts) * 1000, "p90_ms": p90(ts) * 1000,
                       "server_cpu_ms": (cpu[name] / args.runs if name == ref
                                         else per_secret_ours) * 1000}
                for name, ts in times.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
