"""bench/herd: a rack reboots after a power cut; N clients ask at the same moment.

For N in 50, 200, 500, in one run:
- mandosd, load generator, raw keys: N simulated Mandos 1.8 clients in one asyncio
  process (GnuTLS, RFC 7250 raw public keys, real key_ids; bench/loadgen.py);
- mandosd, legacy X.509 clients: the same with Python ``ssl`` presenting a
  self-signed certificate (clients enrolled before raw keys);
- the same client program against two servers: our ``mandos-client`` processes
  (raw keys, gpg decrypt included) against mandosd and against Debian's Mandos;
  Debian's ``mandos-client`` processes against Debian's Mandos and against mandosd;
- Debian's Mandos with the raw-key load generator (its server cost alone), up to 50
  clients: Mandos listens with a backlog of 5 and resets connections in a larger
  burst; its own client retries them, the load generator does not;
- tang (a process per request) with N ``clevis decrypt`` processes at once.
Reports the time until every client has its secret, failures, the server's CPU
per secret (children included: Mandos forks per connection, tang runs one per
request) and the server's peak RSS.  Process-driven rows include the clients'
own CPU on the same two cores, so compare those rows with each other.

mandosd knows all N clients of the largest herd; Debian's Mandos knows
``--mandos-max`` (its cost per connection grows with the clients it knows) and
runs no checker during the benchmark (interval and timeout of a day), as
mandosd runs none (socket-activated).
"""


from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cpu_seconds,
    free_port,
    have_mandos,
    mandos_client_argv,
    mandos_server,
    median,
    ours,
    rss_kib,
    stop,
    table,
    tempdir,
)
from common import (
    start_mandosd as start_socket_activated,
)
from loadgen import Identity, herd, make_identities  # noqa: E402

SECRET = b"herd passphrase"


def start_mandosd(base: Path, sections: list[str], port: int) -> subprocess.Popen[bytes]:
    conf = base / "conf"
    if conf.exists():
        shutil.rmtree(conf)
    conf.mkdir()
    (conf / "clients.conf").write_text("\n".join(sections))
    (conf / "clients.conf").chmod(0o600)  # mandosd refuses one others can read
    state = base / "state"
    shutil.rmtree(state, ignore_errors=True)
    return start_socket_activated(conf, state, "127.0.0.1", port)


def spawn_all(argvs: list[list[str]], expected: bytes, env: dict[str, str] | None = None,
              timeout: float = 600) -> tuple[float, int]:
    """Start every process at once; seconds until the last exits, and how many succeeded."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, env=env) for a in argvs]
    ok = 0
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # counts as a failure; the herd goes on
            p.kill()
            p.communicate()
            continue
        ok += p.returncode == 0 and out == expected
    return time.perf_counter() - t0, ok


def write_client_keydirs(base: Path, idents: list[Identity], shared: Path) -> list[Path]:
    """Per-client key directories: own TLS key, the shared OpenPGP key pair."""
    from cryptography.hazmat.primitives import serialization

    dirs = []
    for ident in idents:
        d = base / "kd" / ident.name
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = serialization.load_pem_private_key(ident.key.read_bytes(), None)
        (d / "tls-privkey.pem").write_bytes(ident.key.read_bytes())
        (d / "tls-pubkey.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (d / "tls-cert.pem").write_bytes(ident.cert.read_bytes())
        for f in ("seckey.txt", "pubkey.txt"):
            shutil.copy(shared / f, d / f)
        dirs.append(d)
    return dirs


def real_sections(idents: list[Identity], message_b64: str, fingerprint: str,
                  host: str = "127.0.0.1") -> list[str]:
    lines = [message_b64[i:i + 64] for i in range(0, len(message_b64), 64)]
    return [f"[{i.name}]\nhost = {host}\nkey_id = {i.key_id}\n"
            f"fingerprint = {fingerprint}\nsecret =\n    "
            + "\n    ".join(lines) + "\n" for i in idents]


#: The largest herd the load generator sends to Debian's Mandos (see the docstring).
MANDOS_LG_MAX = 50
MANDOS_QUIET = "[DEFAULT]\ninterval = 1d\ntimeout = 2d\n"

SYSTEMS = {  # row name -> (server, client)
    "lg-rawpk": "mandosd, load generator, raw keys (GnuTLS)",
    "lg-x509": "mandosd, legacy X.509 clients (load generator, Python ssl)",
    "ours-mandosd": "mandosd + our mandos-client processes (raw keys)",
    "deb-mandosd": "mandosd + Debian's mandos-client processes",
    "lg-mandos": "Debian Mandos 1.8.16, load generator, raw keys",
    "ours-mandos": "Debian Mandos 1.8.16 + our mandos-client processes",
    "deb-mandos": "Debian Mandos 1.8.16 + its mandos-client",
    "tang": "tang 14 + clevis decrypt",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50,200,500", help="herd sizes (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="runs per load-generator figure")
    ap.add_argument("--modes", default="rawpk,x509",
                    help="load-generator modes against mandosd (default: %(default)s)")
    ap.add_argument("--peers", default="real,debian,mandos,mandos-lg,tang",
                    help="other rows to include: real (our mandos-client -> mandosd), debian "
                    "(Debian's mandos-client -> mandosd), mandos (Debian's Mandos server with "
                    "our client and its own), mandos-lg (Debian's Mandos with the load "
                    "generator), tang (or none)")
    ap.add_argument("--mandos-max", type=int, default=200,
                    help="largest herd for Debian's Mandos, and the clients it knows (its "
                    "CPU per secret grows with them: 200 take it minutes; default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    peers = set(args.peers.split(",")) - {"none", ""}
    nmax = max(sizes)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8 * nmax)), hard))
    rows: list[list[str]] = []
    figures: dict[str, dict[int, dict[str, float]]] = {}

    def record(key: str, n: int, secs: float, ok: int, cpu: float, rss: int) -> None:
        figures.setdefault(SYSTEMS[key], {})[n] = {
            "seconds": secs, "ok": ok, "failed": n - ok,
            "cpu_ms_per_secret": cpu * 1000 / max(ok, 1), "peak_rss_mib": rss / 1024}
        print(f"  {SYSTEMS[key]}, N={n}: {secs:.2f} s, {n - ok} failed, "
              f"{cpu * 1000 / max(ok, 1):.2f} ms CPU/secret", file=sys.stderr, flush=True)

    with tempdir("bench-herd-") as base:
        idents = make_identities(base / "ids", nmax)
        # one shared OpenPGP key for the process-driven rows (gpg key generation is slow)
        shared = base / "shared"
        subprocess.run([ours("mandos-keygen"), "--dir", str(shared), "--name", "herd"],
                       check=True, capture_output=True)
        sec = subprocess.run([ours("mandos-keygen"), "--dir", str(shared), "--name", "x",
                              "--passfile", "/dev/stdin"], input=SECRET, check=True,
                             capture_output=True).stdout.decode()
        message_b64 = "".join(ln.strip() for ln in
                              sec.split("secret =")[1].split("checker")[0].splitlines())
        fingerprint = sec.split("fingerprint = ")[1].split()[0]
        port = free_port()

        # -- mandosd, load generator: raw keys and legacy X.509 -------------------------------
        for mode in modes:
            for n in sizes:
                times, cpus, rsss, oks = [], [], [], []
                for _ in range(args.runs):
                    srv = start_mandosd(base, [i.section() for i in idents], port)
                    try:
                        c0 = cpu_seconds(srv.pid)
                        res = asyncio.run(herd("127.0.0.1", port, idents[:n], mode=mode))
                        cpus.append(cpu_seconds(srv.pid) - c0)
                        rsss.append(rss_kib(srv.pid))
                    finally:
                        stop(srv)
                    times.append(res.seconds)
                    oks.append(res.ok)
                    if res.errors:
                        print(f"  {mode} n={n}: {res.errors}", file=sys.stderr)
                record(f"lg-{mode}", n, median(times), min(oks), median(cpus), int(max(rsss)))

        kd = (write_client_keydirs(base, idents, shared) if peers & {"real", "debian", "mandos"}
              else [])
        hooks = base / "empty-network-hooks"
        hooks.mkdir()

        def our_argvs(address: str, n: int) -> list[list[str]]:
            return [[ours("mandos-client"), "--connect", address, "--keydir", str(d),
                     "--timeout", "120"] for d in kd[:n]]

        def debian_argvs(address: str, n: int) -> list[list[str]]:
            return [mandos_client_argv(d, address, hooks) for d in kd[:n]]

        # -- mandosd with process clients: ours, then Debian's ---------------------------------
        for key, peer, argvs in (("ours-mandosd", "real", our_argvs),
                                 ("deb-mandosd", "debian", debian_argvs)):
            if peer not in peers or (peer == "debian" and not have_mandos()):
                continue
            for n in sizes:
                srv = start_mandosd(base, real_sections(idents, message_b64, fingerprint), port)
                try:
                    c0 = cpu_seconds(srv.pid)
                    secs, ok = spawn_all(argvs(f"127.0.0.1:{port}", n), SECRET)
                    record(key, n, secs, ok, cpu_seconds(srv.pid) - c0, rss_kib(srv.pid))
                finally:
                    stop(srv)

        # -- Debian's Mandos: load generator, our client, its client ---------------------------
        mknown = idents[:min(nmax, args.mandos_max)]
        msizes = [n for n in sizes if n <= args.mandos_max]
        if "mandos" in peers and have_mandos():
            mport = free_port()
            (base / "m").mkdir()
            conf = MANDOS_QUIET + "\n".join(real_sections(mknown, message_b64, fingerprint,
                                                          host="::1"))
            with mandos_server(base / "m", conf, mport) as msrv:
                print(f"  Debian Mandos knows {len(mknown)} clients", file=sys.stderr)
                for n in msizes:
                    for key, argvs in (("ours-mandos", our_argvs), ("deb-mandos", debian_argvs)):
                        c0 = cpu_seconds(msrv.pid)
                        secs, ok = spawn_all(argvs(f"[::1]:{mport}", n), SECRET)
                        time.sleep(0.5)  # let Mandos reap its children, so their CPU counts
                        record(key, n, secs, ok, cpu_seconds(msrv.pid) - c0, rss_kib(msrv.pid))
        if "mandos-lg" in peers and have_mandos():
            # the load generator's clients have secrets of their own: a Mandos of their own
            (base / "m2").mkdir()
            mport = free_port()
            conf = MANDOS_QUIET + "\n".join(i.section(host="::1", mandos=True) for i in mknown)
            with mandos_server(base / "m2", conf, mport) as msrv:
                for n in [n for n in msizes if n <= MANDOS_LG_MAX]:
                    c0 = cpu_seconds(msrv.pid)
                    res = asyncio.run(herd("::1", mport, idents[:n], mode="rawpk",
                                           timeout=600))
                    time.sleep(0.5)
                    if res.errors:
                        print(f"  Mandos load generator n={n}: {res.errors}", file=sys.stderr)
                    record("lg-mandos", n, res.seconds, res.ok, cpu_seconds(msrv.pid) - c0,
                           rss_kib(msrv.pid))

        # -- tang + clevis ---------------------------------------------------------------
        if "tang" in peers and Path("/usr/libexec/tangd").exists() and shutil.which("clevis"):
            tdir = base / "tang"
            tdir.mkdir()
            subprocess.run(["/usr/libexec/tangd-keygen", str(tdir)], check=True)
            tport = free_port()
            tang = subprocess.Popen(["systemd-socket-activate", "--inetd", "-a", "-l",
                                     f"127.0.0.1:{tport}", "/usr/libexec/tangd", str(tdir)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.3)
                jwe = subprocess.run(["clevis", "encrypt", "tang",
                                      json.dumps({"url": f"http://127.0.0.1:{tport}"}), "-y"],
                                     input=SECRET, check=True, capture_output=True).stdout
                (base / "secret.jwe").write_bytes(jwe)
                for n in sizes:
                    time.sleep(0.5)
                    c0 = cpu_seconds(tang.pid)
                    secs, ok = spawn_all([["sh", "-c", 'exec clevis decrypt < "$0"',
                                           str(base / "secret.jwe")]] * n, SECRET)
                    time.sleep(0.5)
                    record("tang", n, secs, ok, cpu_seconds(tang.pid) - c0, rss_kib(tang.pid))
            finally:
                stop(tang)

    for system, by_n in figures.items():
        for n, f in sorted(by_n.items()):
            rows.append([system, str(n), f"{f['seconds']:.2f} s", str(int(f["failed"])),
                         f"{f['cpu_ms_per_secret']:.2f} ms", f"{f['peak_rss_mib']:.0f} MiB"])
    load1, load5, _ = os.getloadavg()
    print(f"Herd: N clients ask at once ({os.cpu_count()} cores, load average at the end "
          f"{load1:.1f}/{load5:.1f}; load-generator rows against mandosd are the median of "
          f"{args.runs} runs; mandosd knows {nmax} clients, Debian's Mandos "
          f"{min(nmax, args.mandos_max)})\n")
    print(table(rows, ["system", "N", "all served", "failed", "server CPU/secret",
                       "server peak RSS"]))
    print()
    for a, b, what in (("deb-mandos", "deb-mandosd", "Debian's mandos-client"),
                       ("ours-mandos", "ours-mandosd", "our mandos-client"),
                       ("lg-mandos", "lg-rawpk", "the raw-key load generator")):
        ref, mine = figures.get(SYSTEMS[a]), figures.get(SYSTEMS[b])
        for n in sizes:
            if ref and mine and n in ref and n in mine and mine[n]["cpu_ms_per_secret"] > 0:
                r = ref[n]["cpu_ms_per_secret"] / mine[n]["cpu_ms_per_secret"]
                print(f"N={n}, {what}: mandosd serves {r:.0f}x the secrets per server "
                      "CPU-second of Mandos")
    for key in ("lg-rawpk", "lg-x509"):
        for n, f in sorted(figures.get(SYSTEMS[key], {}).items()):
            verdict = "met" if f["cpu_ms_per_secret"] <= 0.7 else "NOT met"
            print(f"target <= 0.7 ms server CPU per secret, {SYSTEMS[key]}, N={n}: "
                  f"{f['cpu_ms_per_secret']:.2f} ms, {verdict}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
