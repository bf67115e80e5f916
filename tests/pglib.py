"""A real PostgreSQL 15 server for the tests, from Debian's packages, on a Unix socket.

``initdb`` and ``postgres`` refuse root: they run as the ``postgres`` user in
a fresh directory under /tmp that user owns (pytest's tmp_path is root-only).
No TCP (``listen_addresses=''``); clients connect over the socket in
``sockdir``.  :meth:`Postgres.stop` and :meth:`Postgres.start` let a test take
the database away and bring it back under running key servers.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import WaitTimeout, wait_for

PGBIN = Path("/usr/lib/postgresql/15/bin")


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
                 "-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=200"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.base,
                user="postgres", group="postgres", extra_groups=[],
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        finally:
            os.close(log)
        self._wait_ready(timeout)
        return self

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

    def stop(self) -> None:
        """Fast shutdown (SIGINT): sessions are cut, as when the database host goes away."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
