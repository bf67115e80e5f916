"""bench/pool: a pool of key servers on one PostgreSQL, against one server on SQLite.

In one run (a real PostgreSQL 15 from Debian's packages, on a Unix socket, started
here as in tests/pglib.py; needs root):
- herds of N load-generator clients (real TLS, real key_ids; bench/loadgen.py) at
  once against one mandosd on SQLite, one on PostgreSQL, and three on one
  PostgreSQL (the herd spread over the three): time until all served, failures,
  servers' CPU per secret (the database's included), the database's CPU per secret;
- the cold start of a site: --cold clients at once against the three-server pool;
- a checker pass over --checks clients (checker ``true``) by one server, and by
  three servers at once on the pool (each check runs once across the pool).
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import cpu_seconds, free_port, ours, start_ready, stop, table, tempdir  # noqa: E402
from loadgen import (  # noqa: E402
    HerdResult,
    Identity,
    Mode,
    fetch_rawpk,
    fetch_x509,
    make_identities,
    source_address,
)

from tests.pglib import Postgres, available  # noqa: E402


def tree_cpu(root: int) -> float:
    """CPU seconds of *root* (with reaped children) plus its living children."""
    total = cpu_seconds(root)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def start(conf: Path, state: Path, port: int, url: str | None, name: str,
          peer_timeout: float = 10) -> subprocess.Popen[bytes]:
    argv = ["systemd-socket-activate", "-E", "NOTIFY_SOCKET", "-E", "PATH", "-E",
            "PYTHONPATH", "-l", f"127.0.0.1:{port}", ours("mandosd"), "--configdir",
            str(conf), "--statedir", str(state), "--server-name", name,
            "--peer-timeout", str(peer_timeout)]
    if url:
        argv += ["--state-url", url]

    def trigger() -> None:
        import socket

        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    return start_ready(argv, 600, trigger, log=state.parent / "mandosd.log")


async def spread(ports: list[int], clients: list[Identity], timeout: float = 120,
                 mode: Mode = "rawpk") -> tuple[HerdResult, list[float]]:
    """All *clients* at once, client i to server i mod len(ports), each from its own
    loopback address (a site's clients are machines of their own: mandosd caps the
    connections of one address).  Returns the result and each secret's arrival time."""
    sources = [source_address("127.0.0.1", i) for i in range(len(clients))]
    creds = [c.credentials() for c in clients] if mode == "rawpk" else []
    contexts = [c.context() for c in clients] if mode == "x509" else []
    done: list[float] = []
    t0 = time.perf_counter()

    async def one(i: int) -> bytes:
        port = ports[i % len(ports)]
        if mode == "rawpk":
            got = await fetch_rawpk("127.0.0.1", port, creds[i], timeout, sources[i])
        else:
            got = await fetch_x509("127.0.0.1", port, contexts[i], timeout, sources[i])
        if got:
            done.append(time.perf_counter() - t0)
        return got

    try:
        results = await asyncio.gather(*(one(i) for i in range(len(clients))),
                                       return_exceptions=True)
    finally:
        for cr in creds:
            cr.close()
    elapsed = time.perf_counter() - t0
    ok = sum(1 for c, r in zip(clients, results, strict=True) if r == c.secret)
    errors = tuple(sorted({type(r).__name__ for r in results if isinstance(r, BaseException)}))
    return HerdResult(elapsed, ok, len(clients) - ok, errors), sorted(done)


def identities(d: Path, n: int, keep: Path | None) -> list[Identity]:
    """*n* load-generator identities: made in *d*, or reused from *keep* (made there once)."""
    if keep is None:
        return make_identities(d, n)
    manifest = keep / "identities.json"
    if manifest.exists():
        rows = json.loads(manifest.read_text())
        if len(rows) >= n:
            return [Identity(r["name"], r["key_id"], Path(r["cert"]), Path(r["key"]),
                             Path(r["pub"]), bytes.fromhex(r["secret"])) for r in rows[:n]]
    keep.mkdir(parents=True, exist_ok=True, mode=0o700)
    made = make_identities(keep, n)
    manifest.write_text(json.dumps([{"name": i.name, "key_id": i.key_id, "cert": str(i.cert),
                                     "key": str(i.key), "pub": str(i.pub),
                                     "secret": i.secret.hex()} for i in made]))
    return made


def threads_cpu(pid: int) -> list[float]:
    """CPU seconds of each thread of *pid* (the event loop's first)."""
    out = []
    for task in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                out.append(int(f.read().split()[0]) / 1e9)
        except FileNotFoundError:
            pass
    return out


def write_conf(base: Path, sections: list[str]) -> Path:
    conf = base / "conf"
    shutil.rmtree(conf, ignore_errors=True)
    conf.mkdir(parents=True)
    (conf / "clients.conf").write_text("\n".join(sections))
    (conf / "clients.conf").chmod(0o600)  # mandosd refuses a clients.conf others can read
    return conf


def herd_row(base: Path, pg: Postgres, idents: list[Identity], servers: int,
             db: str | None, peer_timeout: float = 10, mode: Mode = "rawpk") -> list[str]:
    url = pg.create_database(db) if db else None
    sections = [i.section() for i in idents]
    procs, ports = [], []
    what = ("1 server, SQLite" if not url else
            f"{servers} server{'s' if servers > 1 else ''}, one PostgreSQL")
    try:
        for k in range(servers):
            conf = write_conf(base / f"s{k}", sections)
            port = free_port()
            procs.append(start(conf, base / f"s{k}" / "state", port, url, f"ks{k}",
                               peer_timeout))
            ports.append(port)
        assert pg.proc is not None
        c0 = [cpu_seconds(p.pid) for p in procs]
        t0 = [threads_cpu(p.pid) for p in procs]
        d0 = tree_cpu(pg.proc.pid)
        g0 = resource.getrusage(resource.RUSAGE_SELF)
        res, arrivals = asyncio.run(spread(ports, idents, timeout=max(120, peer_timeout),
                                           mode=mode))
        g1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = sum(cpu_seconds(p.pid) - c for p, c in zip(procs, c0, strict=True))
        t1 = [threads_cpu(p.pid) for p in procs]
        dbcpu = tree_cpu(pg.proc.pid) - d0 if url else 0.0
    finally:
        for p in procs:
            stop(p)
    ok = max(res.ok, 1)
    if res.errors:
        print(f"  {what}: {res.errors}", file=sys.stderr)
    # where the servers' CPU went, per thread (event loop first, then database, audit...)
    per_thread = [sum(b[i] - (a[i] if i < len(a) else 0.0) for a, b in zip(t0, t1, strict=True)
                      if i < len(b)) * 1000 / ok for i in range(max(len(b) for b in t1))]
    marks = [arrivals[min(len(arrivals) - 1, int(q * len(arrivals)))]
             for q in (0.0, 0.1, 0.5, 0.9)] if arrivals else []
    print(f"  {what}, N={len(idents)}: CPU per secret by server thread "
          + " / ".join(f"{x:.3f}" for x in per_thread) + " ms; load generator "
          + f"{(g1.ru_utime - g0.ru_utime + g1.ru_stime - g0.ru_stime) * 1000 / ok:.2f} ms"
          + (f"; secrets arrived: first {marks[0]:.2f} s, 10% {marks[1]:.2f} s, "
             f"50% {marks[2]:.2f} s, 90% {marks[3]:.2f} s, last {arrivals[-1]:.2f} s"
             if marks else ""), file=sys.stderr, flush=True)
    return [what, str(len(idents)), f"{res.seconds:.2f} s", str(res.failed),
            f"{(cpu + dbcpu) * 1000 / ok:.2f} ms",
            f"{dbcpu * 1000 / ok:.2f} ms" if url else "-"]


def checker_row(base: Path, pg: Postgres, n: int, servers: int) -> list[str]:
    """One checker pass over *n* clients (checker ``true``) by *servers* servers at once.

    Reports the wall time from starting the processes to the last one's exit, and on
    stderr each pass's own time and count as the servers log them (without process
    start, configuration load and merge)."""
    assert pg.proc is not None
    url = pg.create_database(f"checks{servers}")
    sections = [f"[c{i:05}]\nkey_id = {i + 1:064X}\nsecret = cGdw\nhost = 127.0.0.1\n"
                f"checker = true\ninterval = PT1H\n" for i in range(n)]
    confs = [write_conf(base / f"c{servers}_{k}", sections) for k in range(servers)]
    env = {**os.environ}
    d0 = tree_cpu(pg.proc.pid)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # each server's log to a file: a pipe read after another server's would fill and stall it
    outs = [(c.parent / "pass.log").open("wb") for c in confs]
    procs = [subprocess.Popen([ours("mandosd"), "--configdir", str(c), "--statedir",
                               str(c.parent / "state"), "--state-url", url,
                               "--server-name", f"ks{k}", "--run-checkers"], env=env,
                              stdout=subprocess.DEVNULL, stderr=out)
             for k, (c, out) in enumerate(zip(confs, outs, strict=True))]
    for p in procs:
        p.wait()
    secs = time.perf_counter() - t0
    for out in outs:
        out.close()
    logs = [(c.parent / "pass.log").read_text(errors="replace") for c in confs]
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    dbcpu = tree_cpu(pg.proc.pid) - d0
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM clients WHERE last_checker_status=0"
                           ).fetchone()
    checked = row[0] if row else 0
    what = f"checker pass, {servers} server{'s' if servers > 1 else ''}"
    passes = [line.split("checker pass: ", 1)[1] for log in logs
              for line in log.splitlines() if "checker pass: " in line]
    print(f"  {what}: servers + checkers {cpu * 1000 / max(checked, 1):.2f} ms CPU per "
          f"check, database {dbcpu * 1000 / max(checked, 1):.2f} ms; "
          + "; ".join(passes), file=sys.stderr, flush=True)
    return [what, str(n), f"{secs:.2f} s", str(n - checked), "-", "-"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--herd", type=int, default=1500, help="herd size (default: %(default)s)")
    ap.add_argument("--cold", type=int, default=10000,
                    help="clients at once against the three-server pool (0: skip)")
    ap.add_argument("--cold-peer-timeout", type=float, default=10,
                    help="mandosd --peer-timeout for the cold start (default: mandosd's, "
                    "%(default)s)")
    ap.add_argument("--mode", choices=["rawpk", "x509"], default="rawpk",
                    help="load-generator clients: raw public keys as Mandos 1.8's and "
                    "ours, or legacy X.509 (Python ssl) (default: %(default)s)")
    ap.add_argument("--checks", type=int, default=10000,
                    help="clients in the checker-pass rows (0: skip)")
    ap.add_argument("--keep-identities", type=Path, metavar="DIR",
                    help="make the load generator's keys once in DIR and reuse them "
                    "in later runs (default: new ones in a temporary directory)")
    args = ap.parse_args()
    why = available()
    if why:
        print(f"bench/pool: {why}", file=sys.stderr)
        return 1
    nmax = max(args.herd, args.cold)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * nmax + 1024)), hard))
    rows: list[list[str]] = []
    pg = Postgres()
    pg.start()
    try:
        with tempdir("bench-pool-") as base:
            idents = identities(base / "ids", nmax, args.keep_identities)
            herd = idents[:args.herd]
            if herd:
                rows.append(herd_row(base, pg, herd, 1, None, mode=args.mode))
                rows.append(herd_row(base, pg, herd, 1, "one", mode=args.mode))
                rows.append(herd_row(base, pg, herd, 3, "three", mode=args.mode))
            if args.cold:
                row = herd_row(base, pg, idents[:args.cold], 3, "cold",
                               args.cold_peer_timeout, mode=args.mode)
                row[0] = "cold start: " + row[0]
                rows.append(row)
            if args.checks:
                rows.append(checker_row(base, pg, args.checks, 1))
                rows.append(checker_row(base, pg, args.checks, 3))
    finally:
        pg.destroy()
    print(f"Pool: load-generator herds and checker passes ({os.cpu_count()} cores, "
          "load generator and database on the same cores)\n")
    print(table(rows, ["system", "N", "all served / pass", "failed",
                       "CPU/secret (servers + database)", "database CPU/secret"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
