"""The key server decides the requests of a herd in batches (mandosd/server.py).

Each batch is one state read and one "secrets sent" write on the pool's
database.  The write is conditional: a client that another server or
``mandos-ctl`` disabled between the read and the write is not recorded, and
its secret is not sent, while the rest of the batch is served.  A real
PostgreSQL 15 (tests/pglib.py).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from tests import pglib


def _server(tmp_path: Path, url: str, n: int) -> Any:
    from mandosd.server import KeyServer

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "clients.conf").write_text("".join(
        f"[c{i}]\nkey_id = {i + 1:064X}\nsecret = cGdw\nhost = 127.0.0.1\n" for i in range(n)))
    (conf / "clients.conf").chmod(0o600)
    return KeyServer(conf, tmp_path / "state", state_url=url, server_name="ks-test")


def test_a_client_disabled_between_read_and_write_is_neither_recorded_nor_sent(
        tmp_path: Path, pg: pglib.Postgres) -> None:
    from mandosd import policy
    from mandosd.pgstate import PostgresStore

    url = pg.create_database(f"batch_{uuid.uuid4().hex[:12]}")
    srv = _server(tmp_path, url, 3)
    admin = PostgresStore(url, server_name="admin")
    try:
        stale = srv.store.get_many(["c0", "c1", "c2"])  # this server's read ...
        admin.update("c1", enabled=False)  # ... then another server disables c1
        srv.store.get_many = lambda names: {n: stale[n] for n in names}
        kids = [f"{i + 1:064X}" for i in range(3)]
        out = srv._decide_many(kids)
        assert [d.verdict for _, _, d, _ in out] == [policy.Verdict.SEND] * 3  # stale read
        errors = [e for _, _, _, e in out]
        assert errors[0] is None and errors[2] is None
        assert errors[1] is not None and "meanwhile" in errors[1]  # not sent
        after = {n: admin.get(n) for n in ("c0", "c1", "c2")}
        assert after["c1"] is not None and after["c1"].last_secret_sent is None
        assert all(after[n] is not None and after[n].last_secret_sent is not None  # type: ignore[union-attr]
                   for n in ("c0", "c2"))
    finally:
        admin.close()
        srv.close()


def test_a_batch_reads_and_writes_the_database_once(tmp_path: Path,
                                                    pg: pglib.Postgres) -> None:
    from mandosd import policy

    url = pg.create_database(f"batch_{uuid.uuid4().hex[:12]}")
    srv = _server(tmp_path, url, 20)
    calls: list[str] = []
    store = srv.store
    def counting(name: str) -> Any:
        real = getattr(store, name)

        def counted(*a: Any) -> Any:
            calls.append(name)
            return real(*a)
        return counted

    for name in ("get", "get_many", "record_secret_sent", "record_secrets_sent"):
        setattr(store, name, counting(name))
    try:
        before = time.time()
        out = srv._decide_many([f"{i + 1:064X}" for i in range(20)])
        assert all(d.verdict is policy.Verdict.SEND and e is None for _, _, d, e in out)
        assert calls == ["get_many", "record_secrets_sent"]
        st = store.get_many([f"c{i}" for i in range(20)])
        assert all(s.last_secret_sent is not None and s.last_secret_sent >= before
                   for s in st.values())
    finally:
        srv.close()
