"""Real checker processes through the real pass and the real SQLite store.

``true``, ``false``, a hanging checker killed at its interval, ``fping``
against 127.0.0.1 (up) and against a host in a network namespace that the test
creates and then takes down (down), and a ``%(host)s`` holding spaces and
quotes that must arrive as one argument (no shell).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mandosd import checker
from mandosd.checker import CheckerError, Limits, checker_argv, run_pass
from mandosd.config import load_clients
from mandosd.state import SQLiteStore
from tests.helpers import group_gone, have, no_fifo_reader, shared_dir, veth_netns

KEY = "%064X"


def write_conf(d: Path, sections: dict[str, dict[str, str]]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (name, kv) in enumerate(sections.items(), 1):
        lines += [f"[{name}]", f"key_id = {KEY % i}", "secret = cGdw"]
        lines += [f"{k} = {v}" for k, v in kv.items()]
    (d / "clients.conf").write_text("\n".join(lines) + "\n")
    os.chmod(d / "clients.conf", 0o600)  # refused if others can read it
    return d


def pass_(tmp_path: Path, sections: dict[str, dict[str, str]], **kw: object
          ) -> tuple[checker.PassReport, SQLiteStore]:
    conf = write_conf(tmp_path / "conf", sections)
    clients = load_clients(conf / "clients.conf", conf)
    store = SQLiteStore(tmp_path / "state", durable=False)
    store.sync_clients(clients.values(), time.time())
    report = run_pass(store, clients, conf, **kw)  # type: ignore[arg-type]
    return report, store


def test_argv_substitution_is_per_word() -> None:
    attrs = {"host": "a b 'c\" ; rm -rf /", "name": "n"}
    assert checker_argv("fping -q -- %(host)s", attrs) == ["fping", "-q", "--", attrs["host"]]
    assert checker_argv("ssh-keyscan -t ed25519 -p 22 '%(host)s'", attrs)[-1] == attrs["host"]
    assert checker_argv("x --to=%(name)s@%(host)s 100%%", attrs) == [
        "x", f"--to=n@{attrs['host']}", "100%"]
    with pytest.raises(CheckerError, match="unknown attribute"):
        checker_argv("ping %(nosuch)s", attrs)
    with pytest.raises(CheckerError):
        checker_argv("ping 'unbalanced", attrs)
    with pytest.raises(CheckerError):
        checker_argv("", attrs)


def test_true_false_and_missing(tmp_path: Path) -> None:
    report, store = pass_(tmp_path, {"up": {"checker": "true"}, "down": {"checker": "false"},
                                     "gone": {"checker": "/nonexistent/checker"}})
    assert (report.checked, report.succeeded, report.failed) == (3, 1, 2)
    up, down, gone = store.get("up"), store.get("down"), store.get("gone")
    assert up and down and gone
    assert up.last_checker_status == 0 and up.last_checked_ok is not None
    assert up.deadline is not None and up.deadline >= up.last_checker_time + 300 - 1e-6
    assert down.last_checker_status == 1 and down.last_checked_ok is None
    assert gone.last_checker_status == 127
    assert all(s.checker_started is None for s in (up, down, gone))
    # nothing is due again before the interval
    again = run_pass(store, load_clients(tmp_path / "conf" / "clients.conf", tmp_path),
                     tmp_path / "conf")
    assert again.checked == 0
    store.close()


def test_hanging_checker_is_killed_at_its_interval(tmp_path: Path) -> None:
    with shared_dir() as d:
        fifo, ready, marker, pgid_file = (d / n for n in ("fifo", "ready", "marker", "pgid"))
        os.mkfifo(fifo)
        fifo.chmod(0o666)
        # The checker forks a child that holds a FIFO open and blocks on it, then hangs
        # itself: at the interval its whole process group must go, the child included.
        script = (f"echo $$ > {pgid_file}; "
                  f"( exec 3<>{fifo}; touch {ready}; read x <&3; touch {marker} ) & "
                  f"while [ ! -e {ready} ]; do sleep 0.01; done; sleep 30; touch {marker}")
        report, store = pass_(tmp_path, {"hang": {"checker": f"sh -c '{script}'",
                                                  "interval": "1s"}})
        assert report.killed == 1, report.summary()
        st = store.get("hang")
        assert st is not None and st.last_checker_status == checker.KILLED
        assert ready.exists()  # the child did start, and could write here
        assert group_gone(int(pgid_file.read_text())), "part of the checker outlived it"
        assert no_fifo_reader(fifo), "the checker's child outlived it"
        assert not marker.exists()
        store.close()


def test_host_with_spaces_and_quotes_is_one_argument(tmp_path: Path) -> None:
    host = """a "b c" 'd; $(touch /tmp/pwned) `id` | x"""
    with shared_dir() as d:
        probe = d / "probe.py"
        out = d / "argv.json"
        probe.write_text("import json, sys\n"
                         f"open({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
        probe.chmod(0o644)
        report, store = pass_(tmp_path, {"odd": {
            "host": host, "checker": f"/usr/bin/python3 {probe} --host=%%(host)s %%(host)s"}})
        st = store.get("odd")
        assert st is not None and st.last_checker_status == 0, report.summary()
        assert json.loads(out.read_text()) == [f"--host={host}", host]
    assert not Path("/tmp/pwned").exists()
    store.close()


@pytest.mark.skipif(not have("fping"), reason="fping not installed")
def test_fping_localhost_is_up_in_a_batch(tmp_path: Path) -> None:
    report, store = pass_(tmp_path, {"lo1": {"host": "127.0.0.1"},
                                     "lo2": {"host": "127.0.0.2"},
                                     "lo6": {"host": "::1"},
                                     "bad": {"host": "no-such-host.invalid"}})
    assert report.fping_processes == 1 and report.other_processes == 0
    for name in ("lo1", "lo2", "lo6"):
        st = store.get(name)
        assert st is not None and st.last_checker_status == 0, name
    bad = store.get("bad")
    assert bad is not None and bad.last_checker_status not in (0, None)
    store.close()


@pytest.fixture()
def netns_host() -> Iterator[tuple[str, str]]:
    """A host in a network namespace: (netns name, its address)."""
    if os.geteuid() != 0 or not have("ip"):
        pytest.skip("needs root and iproute2 for a network namespace")
    with veth_netns() as (ns, addr):
        yield ns, addr


@pytest.mark.skipif(not have("fping"), reason="fping not installed")
def test_fping_namespace_host_up_then_down(tmp_path: Path,
                                           netns_host: tuple[str, str]) -> None:
    ns, addr = netns_host
    conf = write_conf(tmp_path / "conf", {"nshost": {"host": addr, "interval": "10s"}})
    clients = load_clients(conf / "clients.conf", conf)
    store = SQLiteStore(tmp_path / "state", durable=False)
    store.sync_clients(clients.values(), time.time())
    up = run_pass(store, clients, conf)
    assert up.succeeded == 1, up.summary()
    ok_deadline = store.get("nshost").deadline  # type: ignore[union-attr]
    # take the host down: its interface in the namespace goes away
    links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True,
                           text=True).stdout
    for line in links.splitlines():
        dev = line.split(":")[1].strip().split("@")[0]
        subprocess.run(["ip", "-n", ns, "link", "set", "dev", dev, "down"], check=True)
    down = run_pass(store, clients, conf, force=True, only=["nshost"])
    st = store.get("nshost")
    assert down.failed == 1 and st is not None and st.last_checker_status == 1, down.summary()
    assert st.deadline == ok_deadline  # a failure does not move the deadline
    store.close()


def test_expired_client_is_disabled_by_the_pass(tmp_path: Path) -> None:
    now = [time.time()]
    conf = write_conf(tmp_path / "conf", {"late": {"checker": "false", "timeout": "1m",
                                                   "interval": "20s"}})
    clients = load_clients(conf / "clients.conf", conf)
    store = SQLiteStore(tmp_path / "state", durable=False)
    store.sync_clients(clients.values(), now[0])
    r1 = run_pass(store, clients, conf, clock=lambda: now[0])
    assert r1.failed == 1 and r1.disabled == []
    now[0] += 61  # the clock passes the deadline: no sleeping
    r2 = run_pass(store, clients, conf, clock=lambda: now[0])
    assert r2.disabled == ["late"] and r2.checked == 0
    st = store.get("late")
    assert st is not None and not st.enabled
    store.close()


def test_concurrency_is_bounded(tmp_path: Path) -> None:
    with shared_dir() as d:
        log = d / "running"
        log.mkdir(mode=0o777)
        log.chmod(0o777)
        script = (f"touch {log}/$$; n=$(ls {log} | wc -l); sleep 0.2; rm {log}/$$; "
                  f"echo $n >> {log}.max")
        sections = {f"c{i}": {"checker": f"sh -c '{script}'"} for i in range(12)}
        report, store = pass_(tmp_path, sections, limits=Limits(concurrency=3))
        assert report.succeeded == 12, report.summary()
        peak = max(int(x) for x in (d / "running.max").read_text().split())
        assert peak <= 3
        store.close()
