"""Checkers as an attacker would use them: stall the pass, outlive it, rewrite the state.

* A checker that exits at once but leaves a background child holding its pipes
  must not stall the pass, and the child must die with the checker (issue 11,
  item 7).  The child blocks on a FIFO that the test controls, so its death is
  seen as an event (no reader left on the FIFO), not waited for.
* Checker commands run unprivileged: a checker that tries to re-enable a
  disabled client by writing the state database, or to read clients.conf,
  fails; a checker has no capability but CAP_NET_RAW, no groups, not uid 0
  (issue 11, item 13).
* The pass works inside the checker unit's own capability bounding set and
  no_new_privs, as systemd would start it: fping still gets its ICMP socket.
"""

from __future__ import annotations

import configparser
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mandosd import checker
from mandosd.checker import run_pass
from mandosd.config import Client, load_clients
from mandosd.state import SQLiteStore
from tests.helpers import ROOT, group_gone, have, no_fifo_reader, shared_dir

KEY = "%064X"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="checkers drop privileges only as root")


@pytest.fixture()
def shared() -> Iterator[Path]:
    """A directory every user can reach and write (the checker user writes its markers)."""
    with shared_dir() as d:
        yield d


def write_conf(d: Path, sections: dict[str, dict[str, str]]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (name, kv) in enumerate(sections.items(), 1):
        lines += [f"[{name}]", f"key_id = {KEY % i}", "secret = cGdw"]
        lines += [f"{k} = {v}" for k, v in kv.items()]
    conf = d / "clients.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o600)
    return d


def setup(base: Path, sections: dict[str, dict[str, str]]
          ) -> tuple[Path, SQLiteStore, dict[str, Client]]:
    conf = write_conf(base / "conf", sections)
    clients = load_clients(conf / "clients.conf", conf)
    store = SQLiteStore(base / "state", durable=False)
    store.sync_clients(clients.values(), time.time())
    return conf, store, clients




def test_background_child_neither_stalls_the_pass_nor_outlives_the_checker(
        tmp_path: Path, shared: Path) -> None:
    fifo, ready, marker, pgid_file = (shared / n for n in ("fifo", "ready", "marker", "pgid"))
    os.mkfifo(fifo, 0o666)
    fifo.chmod(0o666)
    # The child opens the FIFO (read-write: never blocks), says so, then waits on it for
    # ever with the checker's stderr open; the checker waits until the child is ready,
    # then exits 0 at once.
    script = (f"echo $$ > {pgid_file}; "
              f"( exec 3<>{fifo}; touch {ready}; read x <&3; touch {marker} ) & "
              f"while [ ! -e {ready} ]; do sleep 0.01; done; exit 0")
    conf, store, clients = setup(tmp_path, {"bg": {"checker": f"sh -c '{script}'",
                                                   "interval": "2s"}})
    result: list[checker.PassReport] = []
    t = threading.Thread(target=lambda: result.append(run_pass(store, clients, conf)),
                         daemon=True)
    t.start()
    t.join(60)  # a guard against a hang, not a timing: the fixed pass ends in ~interval
    try:
        assert not t.is_alive(), "the pass waited for the checker's background child"
        report = result[0]
        st = store.get("bg")
        assert st is not None and st.last_checker_status == 0, report.summary()
        assert ready.exists()
        pgid = int(pgid_file.read_text())
        assert group_gone(pgid), "the checker's process group outlived it"
        assert no_fifo_reader(fifo), "the checker's background child is still running"
        assert not marker.exists()
    finally:
        if t.is_alive():  # release the old code's stuck child so the thread can end
            with open(fifo, "w") as f:
                f.write("go\n")
            t.join(30)
        store.close()


@needs_root
def test_child_that_escapes_into_its_own_session_dies_with_the_pass(
        tmp_path: Path, shared: Path) -> None:
    fifo, ready, marker = (shared / n for n in ("fifo", "ready", "marker"))
    os.mkfifo(fifo)
    fifo.chmod(0o666)
    # setsid: out of the checker's process group, as a daemon would leave it
    script = (f'setsid sh -c "exec 3<>{fifo}; touch {ready}; read x <&3; touch {marker}" & '
              f"while [ ! -e {ready} ]; do sleep 0.01; done; exit 0")
    conf, store, clients = setup(tmp_path, {"esc": {"checker": f"sh -c '{script}'",
                                                    "interval": "2s"}})
    try:
        run_pass(store, clients, conf)
        st = store.get("esc")
        assert st is not None and st.last_checker_status == 0
        assert ready.exists()
        assert no_fifo_reader(fifo), "a checker's escaped child outlived the pass"
        assert not marker.exists()
    finally:
        if not no_fifo_reader(fifo):  # release it so that it ends
            with open(fifo, "w") as f:
                f.write("go\n")
        store.close()


@needs_root
def test_checker_cannot_rewrite_the_state_or_read_clients_conf(shared: Path) -> None:
    base = shared / "site"
    base.mkdir()
    base.chmod(0o755)  # reachable by anyone: only the state's and conf's own modes protect them
    db = base / "state" / "clients.sqlite"
    attack = ("import sqlite3, sys; d = sqlite3.connect(sys.argv[1]); "
              "d.execute('UPDATE clients SET enabled = 1, deadline = 1e12'); d.commit()")
    conf, store, clients = setup(base, {
        "victim": {"checker": "false"},
        "db": {"checker": f"/usr/bin/python3 -c \"{attack}\" {db}"},
        "conf": {"checker": f"cat {base}/conf/clients.conf"},
    })
    store.update("victim", enabled=False)
    run_pass(store, clients, conf)
    victim, db_st, conf_st = (store.get(n) for n in ("victim", "db", "conf"))
    assert victim is not None and db_st is not None and conf_st is not None
    assert not victim.enabled, "a checker re-enabled a disabled client through the state DB"
    assert db_st.last_checker_status not in (0, None), "the state DB was writable by a checker"
    assert conf_st.last_checker_status not in (0, None), "clients.conf was readable by a checker"
    store.close()


@needs_root
def test_checker_runs_unprivileged_with_only_net_raw(tmp_path: Path, shared: Path) -> None:
    out = shared / "creds"
    probe = ("import os; s = dict(l.split(':', 1) for l in open('/proc/self/status')); "
             f"open('{out}', 'w').write(repr((os.getuid(), os.geteuid(), os.getgroups(), "
             "s['CapEff'].strip(), s['CapPrm'].strip(), s['CapBnd'].strip(), "
             "s['NoNewPrivs'].strip())))")
    conf, store, clients = setup(tmp_path, {"who": {"checker": f"/usr/bin/python3 -c \"{probe}\""}})
    run_pass(store, clients, conf)
    st = store.get("who")
    assert st is not None and st.last_checker_status == 0
    uid, euid, groups, eff, prm, bnd, nnp = eval(out.read_text())  # noqa: S307 - our own repr
    assert uid != 0 and euid != 0 and groups == []
    assert int(eff, 16) & ~(1 << 13) == 0 and int(prm, 16) & ~(1 << 13) == 0
    assert int(bnd, 16) == 1 << 13
    assert nnp == "1"
    store.close()


def _unit_capabilities() -> list[str]:
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read(ROOT / "units" / "mandosd-checker.service")
    return p["Service"]["CapabilityBoundingSet"].split()


@needs_root
@pytest.mark.skipif(not have("fping"), reason="fping not installed")
def test_pass_works_within_the_units_bounding_set(tmp_path: Path) -> None:
    caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in _unit_capabilities())
    conf = write_conf(tmp_path / "conf", {
        "lo": {"host": "127.0.0.1"},
        "hang": {"checker": "sleep 31.7", "interval": "1s"},
    })
    statedir = tmp_path / "state"
    # systemd starts the root service with this bounding set and no_new_privs
    p = subprocess.run(["setpriv", f"--bounding-set=-all,{caps}", "--no-new-privs", "--",
                        sys.executable, "-m", "mandosd", "--run-checkers", "--configdir",
                        str(conf), "--statedir", str(statedir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    store = SQLiteStore(statedir, durable=False)
    lo, hang = store.get("lo"), store.get("hang")
    assert lo is not None and lo.last_checker_status == 0, p.stderr[-2000:]
    # killing the unprivileged checker at its interval needs CAP_KILL
    assert hang is not None and hang.last_checker_status == checker.KILLED
    assert subprocess.run(["pgrep", "-f", "^sleep 31.7$"], capture_output=True).returncode == 1
    assert stat.S_IMODE(statedir.stat().st_mode) == 0o700
    store.close()
