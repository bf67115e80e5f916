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
from loadgen import HerdResult, Identity, fetch_one, make_identities  # noqa: E402

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
    return start_ready(argv, 600, trigger)


async def spread(ports: list[int], clients: list[Identity], timeout: float = 120
                 ) -> HerdResult:
    contexts = [c.context() for c in clients]
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(fetch_one("127.0.0.1", ports[i % len(ports)], ctx, timeout)
          for i, ctx in enumerate(contexts)), return_exceptions=True)
    elapsed = time.perf_counter() - t0
    ok = sum(1 for c, r in zip(clients, results, strict=True) if r == c.secret)
    errors = tuple(sorted({type(r).__name__ for r in results if isinstance(r, BaseException)}))
    return HerdResult(elapsed, ok, len(clients) - ok, errors)


def write_conf(base: Path, sections: list[str]) -> Path:
    conf = base / "conf"
    shutil.rmtree(conf, ignore_errors=True)
    conf.mkdir(parents=True)
    (conf / "clients.conf").write_text("\n".join(sections))
    return conf


def herd_row(base: Path, pg: Postgres, idents: list[Identity], servers: int,
             db: str | None, peer_timeout: float = 10) -> list[str]:
    url = pg.create_database(db) if db else None
    sections = [i.section() for i in idents]
    procs, ports = [], []
    try:
        for k in range(servers):
            conf = write_conf(base / f"s{k}", sections)
            port = free_port()
            procs.append(start(conf, base / f"s{k}" / "state", port, url, f"ks{k}",
                               peer_timeout))
            ports.append(port)
        assert pg.proc is not None
        c0 = [cpu_seconds(p.pid) for p in procs]
        d0 = tree_cpu(pg.proc.pid)
        res = asyncio.run(spread(ports, idents, timeout=max(120, peer_timeout)))
        cpu = sum(cpu_seconds(p.pid) - c for p, c in zip(procs, c0, strict=True))
        dbcpu = tree_cpu(pg.proc.pid) - d0 if url else 0.0
    finally:
        for p in procs:
            stop(p)
    ok = max(res.ok, 1)
    what = ("1 server, SQLite" if not url else
            f"{servers} server{'s' if servers > 1 else ''}, one PostgreSQL")
    if res.errors:
        print(f"  {what}: {res.errors}", file=sys.stderr)
    return [what, str(len(idents)), f"{res.seconds:.2f} s", str(res.failed),
            f"{(cpu + dbcpu) * 1000 / ok:.2f} ms",
            f"{dbcpu * 1000 / ok:.2f} ms" if url else "-"]


def checker_row(base: Path, pg: Postgres, n: int, servers: int) -> list[str]:
    url = pg.create_database(f"checks{servers}")
    sections = [f"[c{i:05}]\nkey_id = {i + 1:064X}\nsecret = cGdw\nhost = 127.0.0.1\n"
                f"checker = true\ninterval = PT1H\n" for i in range(n)]
    confs = [write_conf(base / f"c{servers}_{k}", sections) for k in range(servers)]
    env = {**os.environ}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([ours("mandosd"), "--configdir", str(c), "--statedir",
                               str(c.parent / "state"), "--state-url", url,
                               "--server-name", f"ks{k}", "--run-checkers"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for k, c in enumerate(confs)]
    for p in procs:
        p.wait()
    secs = time.perf_counter() - t0
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM clients WHERE last_checker_status=0"
                           ).fetchone()
    checked = row[0] if row else 0
    return [f"checker pass, {servers} server{'s' if servers > 1 else ''}", str(n),
            f"{secs:.2f} s", str(n - checked), "-", "-"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--herd", type=int, default=1500, help="herd size (default: %(default)s)")
    ap.add_argument("--cold", type=int, default=10000,
                    help="clients at once against the three-server pool (0: skip)")
    ap.add_argument("--cold-peer-timeout", type=float, default=120,
                    help="mandosd --peer-timeout for the cold start: the load generator "
                    "handshakes one client after another (default: %(default)s)")
    ap.add_argument("--checks", type=int, default=10000,
                    help="clients in the checker-pass rows (0: skip)")
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
            idents = make_identities(base / "ids", nmax)
            herd = idents[:args.herd]
            if herd:
                rows.append(herd_row(base, pg, herd, 1, None))
                rows.append(herd_row(base, pg, herd, 1, "one"))
                rows.append(herd_row(base, pg, herd, 3, "three"))
            if args.cold:
                row = herd_row(base, pg, idents[:args.cold], 3, "cold",
                               args.cold_peer_timeout)
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
