"""A real PostgreSQL 15 server for the tests, from Debian's packages, on a Unix socket.

``initdb`` and ``postgres`` refuse root: they run as the ``postgres`` user in
a fresh directory under /tmp that user owns (pytest's tmp_path is root-only).
No TCP (``listen_addresses=''``) unless :meth:`Postgres.serve_tls` asks for
127.0.0.1 with TLS; clients connect over the socket in
``sockdir``.  :meth:`Postgres.stop` (fast, immediate, or SIGKILL of the
postmaster) and :meth:`Postgres.start` let a test take the database away and
bring it back under running key servers.  Below it, the pool's helpers that the
pool tests share: real mandosd processes on one database (:func:`servers`),
mandos-ctl with its URL, a client's stored row.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

from tests.helpers import Mandosd, WaitTimeout, fetch, tool, wait_for

PGBIN = Path("/usr/lib/postgresql/15/bin")

#: how :meth:`Postgres.stop` takes the database away: ``fast`` (SIGINT: sessions are
#: cut, as a clean shutdown does), ``immediate`` (SIGQUIT: every process quits at once,
#: crash recovery at the next start) or ``kill`` (SIGKILL of the postmaster alone: its
#: backends notice and exit on their own, as after an OOM kill)
StopMode = Literal["fast", "immediate", "kill"]
_STOP_SIGNAL = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT, "kill": signal.SIGKILL}


def available() -> str | None:
    """Why a test server cannot run here, or None."""
    if not (PGBIN / "postgres").exists():
        return "PostgreSQL 15 not installed (apt-get install postgresql)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user"
    if os.geteuid() != 0:
        return "needs root to run PostgreSQL as the postgres user"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg 3 not installed (pip install psycopg)"
    return None


class Postgres:
    """One throw-away cluster: ``initdb`` once, then ``postgres`` started and stopped."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mandos-pg-"))
        pw = pwd.getpwnam("postgres")
        os.chmod(self.base, 0o700)
        os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self.datadir = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "postgres.log"
        self.port = random.randint(20000, 60000)  # only names the socket file
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen: list[int] = []
        #: more ``-c`` settings for postgres (see :meth:`serve_tls`)
        self.settings: list[str] = ["listen_addresses="]
        self._as_postgres(["mkdir", "-m", "0700", str(self.sockdir)])
        # the socket directory must be reachable by root's test clients (root may pass)
        self._as_postgres([str(PGBIN / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                           "--auth-local=trust", "--auth-host=reject", "-E", "UTF8",
                           "--no-sync"])

    def _as_postgres(self, argv: list[str]) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True,
                       capture_output=True, cwd=self.base)

    def url(self, dbname: str = "mandos") -> str:
        return f"postgresql:///{dbname}?host={self.sockdir}&port={self.port}&user=postgres"

    def start(self, timeout: float = 60) -> Postgres:
        log = os.open(self.logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            # postgres itself as the child (not under runuser), so that signals reach it
            self.proc = subprocess.Popen(
                [str(PGBIN / "postgres"),
                 "-D", str(self.datadir), "-k", str(self.sockdir), "-p", str(self.port),
                 *[x for kv in self.settings for x in ("-c", kv)],
                 "-c", "fsync=off", "-c", "max_connections=200"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.base,
                user="postgres", group="postgres", extra_groups=[],
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        finally:
            os.close(log)
        self._wait_ready(timeout)
        return self

    def serve_tls(self, cert_pem: bytes, key_pem: bytes) -> str:
        """Also listen on 127.0.0.1 (this port), TLS only, with this certificate; returns
        the TCP URL's start (``postgresql://postgres@127.0.0.1:PORT``).  Call before start."""
        from tests.helpers import free_port

        self.port = free_port()
        for name, data in (("server.crt", cert_pem), ("server.key", key_pem)):
            path = self.datadir / name
            path.write_bytes(data)
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)
            path.chmod(0o600)
        hba = self.datadir / "pg_hba.conf"  # the first matching line wins: ours first
        hba.write_text("hostssl all postgres 127.0.0.1/32 trust\n"
                       "hostnossl all all 127.0.0.1/32 reject\n" + hba.read_text())
        self.settings = ["listen_addresses=127.0.0.1", "ssl=on",
                         "ssl_min_protocol_version=TLSv1.3"]
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}:\n{self.log()}")
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                return False

        try:
            wait_for(ready, timeout, "postgres to accept connections", interval=0.05)
        except WaitTimeout:
            raise RuntimeError(f"postgres did not start:\n{self.log()}") from None

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)

    def freeze(self) -> None:
        """SIGSTOP every process of the cluster: connections stay open and nothing
        answers, as with a stalled disk or a paused machine (:meth:`thaw` ends it)."""
        self.frozen = self.processes()
        for pid in self.frozen:
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = []

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, mode: StopMode = "fast") -> None:
        """Take the database away (see :data:`StopMode`); returns once no process of
        this cluster is left, so that nothing can answer or commit any more."""
        self.thaw()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(_STOP_SIGNAL[mode])
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        # backends (each its own session) outlive a killed postmaster for a moment;
        # a new postmaster refuses to start while they hold the shared memory
        wait_for(lambda: not self.processes(), 60, "the cluster's processes to exit",
                 interval=0.05)

    def processes(self) -> list[int]:
        """Live processes of this cluster: every one works in the data directory."""
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if os.readlink(d / "cwd") == str(self.datadir) and \
                        "Z" not in (d / "stat").read_text().rsplit(")", 1)[1].split()[:1]:
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


# -- a pool of key servers on one database ------------------------------------------------

def servers(tmp_path: Path, url: str, sections: list[list[str]], stack: ExitStack
            ) -> list[Mandosd]:
    """Start one mandosd per entry of *sections* (its clients.conf), all at once."""
    out = []
    for i, secs in enumerate(sections, 1):
        srv = Mandosd(tmp_path / f"srv{i}", sections=secs,
                      extra_args=["--state-url", url, "--server-name", f"srv{i}"])
        out.append(srv)
    procs = []
    for srv in out:  # Popen all first: three servers meet an empty database together
        log = srv.logfile.open("ab")
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        srv.proc = subprocess.Popen(srv.argv(), stdout=log, stderr=log, env=env)
        procs.append(srv)
        stack.callback(srv.stop)
    for srv in procs:
        wait_logged(srv, "MANDOS_OUTCOME=server-started")
    return out


def wait_logged(srv: Mandosd, text: str, timeout: float = 60) -> None:
    """Wait for *text* in *srv*'s log; a server that exits meanwhile fails at once."""
    def logged() -> bool:
        assert srv.proc is not None
        if srv.proc.poll() is not None:
            raise AssertionError(f"mandosd exited {srv.proc.returncode}:\n{srv.log()}")
        return text in srv.log()

    wait_for(logged, timeout, f"{text!r} in the log", interval=0.05)


def pool_ctl(srv: Mandosd, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``mandos-ctl --state-url`` through *srv*'s configuration."""
    argv = [tool("mandos-ctl"), *args, "--configdir", str(srv.configdir),
            "--state-url", url]
    if args[:1] not in (("log",), ("migrate-state",)):
        argv += ["--statedir", str(srv.statedir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def state(url: str, name: str = "client1") -> dict[str, object]:
    """The client's row in the pool's database, read directly."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as conn:
        row = conn.execute("SELECT * FROM clients WHERE name=%s", (name,)).fetchone()
    assert row is not None
    return row


def fetch_all(keys: Path, srvs: list[Mandosd]) -> list[bytes]:
    return [fetch(keys, s.address).stdout for s in srvs]
