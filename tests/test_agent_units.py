"""The agent's systemd units for the booted system: valid, hardened, wired like systemd's agents."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

UNITS = ROOT / "units"
PATH_UNIT = UNITS / "mandos-password-agent.path"
SERVICE = UNITS / "mandos-password-agent.service"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def unit(path: Path) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(path)
    return cp


@needs_analyze
def test_units_verify() -> None:
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(PATH_UNIT), str(SERVICE)],
                       capture_output=True, text=True)
    # The program is not installed on the test machine; everything else must be clean.
    problems = [ln for ln in (p.stdout + p.stderr).splitlines()
                if ln.strip() and "is not executable" not in ln]
    assert problems == []


@needs_analyze
def test_service_is_hardened() -> None:
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=25",
                        str(SERVICE)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:]
    assert "Overall exposure level" in p.stdout


def test_path_unit_watches_the_ask_directory() -> None:
    path = unit(PATH_UNIT)
    assert path.get("Path", "PathChanged") == "/run/systemd/ask-password"
    assert path.get("Path", "MakeDirectory") == "yes"
    wanted = path.get("Install", "WantedBy").split()
    assert {"cryptsetup.target", "remote-cryptsetup.target"} <= set(wanted)
    assert "cryptsetup.target" in path.get("Unit", "Before")
    assert path.get("Unit", "DefaultDependencies") == "no"


def test_service_runs_the_per_question_mode_as_root() -> None:
    svc = unit(SERVICE)
    assert svc.get("Service", "ExecStart").split() == [
        "/usr/bin/mandos-password-agent", "--exit-when-idle"]
    assert svc.get("Service", "User") == "root"  # askers accept answers from uid 0 only
    assert not svc.has_option("Service", "PrivateNetwork")
    assert "network-online.target" not in svc.get("Unit", "After", fallback="")
