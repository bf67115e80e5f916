"""The checker timer and service: valid, hardened, running the one-pass mode."""

from __future__ import annotations

import configparser
import subprocess
import sys

import pytest

from tests.helpers import ROOT, have

UNITS = ROOT / "units"


def read(name: str) -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read(UNITS / name)
    return p


def test_timer_triggers_the_one_pass_service() -> None:
    timer = read("mandosd-checker.timer")
    assert timer["Timer"]["OnUnitInactiveSec"]
    assert timer["Install"]["WantedBy"] == "timers.target"
    svc = read("mandosd-checker.service")
    assert svc["Service"]["Type"] == "oneshot"
    assert "--run-checkers" in svc["Service"]["ExecStart"]
    assert svc["Service"]["StateDirectory"] == "mandosd"


@pytest.mark.skipif(not have("systemd-analyze"), reason="systemd-analyze not installed")
def test_checker_service_is_hardened() -> None:
    # --threshold is in tenths: 30 = exposure 3.0
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=30",
                        str(UNITS / "mandosd-checker.service")], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    score = float(p.stdout.split("Overall exposure level for mandosd-checker.service:")[1]
                  .split()[0])
    assert score <= 3.0


def test_one_pass_help_is_documented() -> None:
    out = subprocess.run([sys.executable, "-m", "mandosd", "--help"], capture_output=True,
                         text=True, cwd=ROOT).stdout
    assert "--run-checkers" in out


def test_checker_unit_makes_the_checker_user_and_keeps_no_new_privileges() -> None:
    from mandosd.checker_user import CHECKER_USER

    svc = read("mandosd-checker.service")["Service"]
    assert svc["ExecStartPre"].startswith("+") and f"u {CHECKER_USER} " in svc["ExecStartPre"]
    assert svc["NoNewPrivileges"] == "yes"
    assert "User" not in svc and "DynamicUser" not in svc  # the pass is root; its commands not
    caps = set(svc["CapabilityBoundingSet"].split())
    assert caps == {"CAP_NET_RAW", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_KILL"}
