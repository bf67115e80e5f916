"""``mandos-ctl``, every option, against a real state store and a running mandosd."""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mandosd import config, policy
from mandosd.state import SQLiteStore
from tests.helpers import PASSWORD, Mandosd, ctl, enroll, fetch, make_keys, tool, wait_for


def props(srv: Mandosd, name: str = "client1") -> dict[str, object]:
    p = ctl(srv, "--dump-json", name)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)[name]


def test_table_verbose_and_json(mandosd: Mandosd) -> None:
    p = ctl(mandosd)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["Name", "Enabled", "Timeout", "Last", "Successful", "Check"]
    assert lines[1].split()[:3] == ["client1", "Yes", "00:05:00"]
    v = ctl(mandosd, "--verbose", "client1")
    assert "Approval Is Pending" in v.stdout and "Last Checker Status" in v.stdout
    data = json.loads(ctl(mandosd, "-j").stdout)
    c = data["client1"]
    assert (c["Enabled"], c["Timeout"], c["Interval"], c["ExtendedTimeout"]) == (
        True, 300000, 120000, 900000)
    assert c["Checker"] == "fping -q -- %(host)s" and c["Host"] == "127.0.0.1"
    # the standalone server runs its checker (fping 127.0.0.1) right away
    assert c["LastCheckerStatus"] in (-2, 0) and len(c["KeyID"]) == 64
    assert "Secret" not in c


def test_usage_errors_and_unknown_client(mandosd: Mandosd) -> None:
    assert ctl(mandosd, "--enable").returncode == 2          # needs names or --all
    assert ctl(mandosd, "--all").returncode == 2             # --all needs an action
    assert ctl(mandosd, "-v", "-e", "client1").returncode == 2
    assert ctl(mandosd, "-j", "-e", "client1").returncode == 2
    assert ctl(mandosd, "-e", "-d", "client1").returncode == 2
    assert ctl(mandosd, "-r", "-e", "client1").returncode == 2
    p = ctl(mandosd, "-e", "nosuch")
    assert p.returncode == 1 and "Client not found on server: 'nosuch'" in p.stderr
    assert "Traceback" not in p.stderr


def test_disable_enable_is_enabled_take_effect_without_restart(
        mandosd: Mandosd, client_keys: Path) -> None:
    assert ctl(mandosd, "-V", "client1").returncode == 0
    assert ctl(mandosd, "--disable", "client1").returncode == 0
    assert ctl(mandosd, "--is-enabled", "client1").returncode == 1
    assert fetch(client_keys, mandosd.address).stdout == b""
    assert "MANDOS_OUTCOME=refused-disabled" in mandosd.log()
    assert ctl(mandosd, "-e", "--all").returncode == 0
    assert ctl(mandosd, "-V", "client1").returncode == 0
    assert fetch(client_keys, mandosd.address).stdout == PASSWORD


def test_settings(mandosd: Mandosd) -> None:
    p = ctl(mandosd, "-t", "PT10M", "--extended-timeout", "1h", "-i", "30s",
            "-c", "ssh-keyscan -T 5 %(host)s", "-H", "192.0.2.7", "--approval-delay",
            "PT7S", "--approval-duration", "2m", "--deny-by-default", "client1")
    assert p.returncode == 0, p.stderr
    c = props(mandosd)
    assert (c["Timeout"], c["ExtendedTimeout"], c["Interval"], c["ApprovalDelay"],
            c["ApprovalDuration"]) == (600000, 3600000, 30000, 7000, 120000)
    assert (c["Checker"], c["Host"], c["ApprovedByDefault"]) == (
        "ssh-keyscan -T 5 %(host)s", "192.0.2.7", False)
    assert ctl(mandosd, "--approve-by-default", "client1").returncode == 0
    assert props(mandosd)["ApprovedByDefault"] is True
    # a short confirmation per change; the fields go to the journal (test_audit.py)
    assert "mandos-ctl: client1: timeout set by " in p.stderr and "MANDOS_" not in p.stderr
    assert ctl(mandosd, "-t", "bogus", "client1").returncode == 2


def test_shorter_timeout_that_has_passed_disables(mandosd: Mandosd) -> None:
    assert ctl(mandosd, "-c", "false", "client1").returncode == 0  # no bump from checkers
    store = SQLiteStore(mandosd.statedir)
    store.update("client1", deadline=time.time() + 100)  # as if timeout began 200 s ago
    store.close()
    assert ctl(mandosd, "--timeout", "PT1M", "client1").returncode == 0
    assert ctl(mandosd, "-V", "client1").returncode == 1


def test_bump_timeout(mandosd: Mandosd) -> None:
    store = SQLiteStore(mandosd.statedir)
    store.update("client1", deadline=time.time() + 5)
    t0 = time.time()
    assert ctl(mandosd, "--bump-timeout", "client1").returncode == 0
    st = store.get("client1")
    assert st is not None and st.deadline is not None and st.deadline >= t0 + 299
    assert st.last_checked_ok is not None and st.last_checked_ok >= t0
    store.close()


def test_secret_replaced(mandosd: Mandosd, client_keys: Path, tmp_path: Path) -> None:
    section = enroll(client_keys, b"a new passphrase", "client1")
    b64 = "".join(section.split("secret =")[1].split("checker")[0].split())
    blob = tmp_path / "secret.pgp"
    blob.write_bytes(base64.b64decode(b64))
    p = ctl(mandosd, "--secret", str(blob), "client1")
    assert p.returncode == 0, p.stderr
    assert b64[:32] not in p.stderr
    assert fetch(client_keys, mandosd.address).stdout == b"a new passphrase"


def test_start_and_stop_checker(mandosd: Mandosd) -> None:
    assert ctl(mandosd, "-c", "true", "client1").returncode == 0
    p = ctl(mandosd, "--start-checker", "client1")
    assert p.returncode == 0, p.stderr
    c = props(mandosd)
    assert c["LastCheckerStatus"] == 0 and c["LastCheckedOK"] != ""
    # a hanging checker in a timer pass, stopped by the admin long before its interval
    assert ctl(mandosd, "-c", "sleep 60", "-i", "PT1M", "client1").returncode == 0
    store = SQLiteStore(mandosd.statedir)
    store.update("client1", next_check=0)
    store.close()
    run = subprocess.Popen([sys.executable, "-m", "mandosd", "--configdir",
                            str(mandosd.configdir), "--statedir", str(mandosd.statedir),
                            "--run-checkers"], stderr=subprocess.PIPE)
    wait_for(lambda: props(mandosd)["CheckerRunning"], 30, "the checker to run", interval=0.1)
    assert ctl(mandosd, "--stop-checker", "client1").returncode == 0
    # the pass ends because of the stop (its message and status say so), not its interval
    assert run.wait(50) == 0
    c = props(mandosd)
    assert c["LastCheckerStatus"] == -1 and not c["CheckerRunning"]
    assert b"stopped by an administrator" in (run.stderr.read() if run.stderr else b"")


def test_remove(mandosd: Mandosd, client_keys: Path) -> None:
    p = ctl(mandosd, "--deny", "--remove", "client1")
    assert p.returncode == 0, p.stderr
    assert "client1" not in ctl(mandosd).stdout
    assert fetch(client_keys, mandosd.address).stdout == b""
    assert ctl(mandosd, "-e", "client1").returncode == 1


def test_add_section_from_keygen(mandosd: Mandosd, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys2", "client2")
    section = enroll(keys, b"second", "client2", host="127.0.0.1")
    p = ctl(mandosd, "--add", "-", input=section.encode())
    assert p.returncode == 0, p.stderr
    c = props(mandosd, "client2")
    assert c["Enabled"] is True and c["Host"] == "127.0.0.1"
    # the running server hands the added client its secret, no restart
    assert fetch(keys, mandosd.address).stdout == b"second"
    # kept across a config reload; adding twice fails
    assert "client2" in ctl(mandosd).stdout
    again = ctl(mandosd, "--add", "-", input=section.encode())
    assert again.returncode == 1 and "exists already" in again.stderr
    assert ctl(mandosd, "--add", "-", input=b"[broken]\nkey_id = 12\n").returncode == 1
    assert ctl(mandosd, "-r", "client2").returncode == 0
    assert "client2" not in ctl(mandosd).stdout


@pytest.mark.parametrize("opt", ["-A", "-D"])
def test_approve_deny_without_pending_request_holds_for_duration(mandosd: Mandosd,
                                                                 opt: str) -> None:
    """The decision holds for exactly approval_duration (1 h here), then no longer."""
    assert ctl(mandosd, "--approval-duration", "PT1H", opt, "client1").returncode == 0
    store = SQLiteStore(mandosd.statedir)
    st = store.get("client1")
    store.close()
    assert st is not None and st.approval_decided_at is not None
    assert st.approval_decision == ("approve" if opt == "-A" else "deny")
    client = policy.effective(config.load(mandosd.configdir).clients["client1"], st)
    assert client.approval_duration == 3600
    decided = st.approval_decided_at
    # judged alone: no deadline in the way, and a request would wait without the decision
    st = dataclasses.replace(st, deadline=None)
    client = dataclasses.replace(client, approval_delay=60.0, approved_by_default=False)
    holds = policy.Verdict.SEND if opt == "-A" else policy.Verdict.DENIED
    assert policy.decide(client, st, decided + 3599).verdict is holds
    assert policy.decide(client, st, decided + 3601).verdict is policy.Verdict.WAIT


def test_escrow_subcommand(mandosd: Mandosd) -> None:
    """``mandos-ctl escrow`` reaches the escrow store (empty here) with the same --statedir."""
    p = subprocess.run([tool("mandos-ctl"), "escrow", "--statedir", str(mandosd.statedir),
                        "list"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
