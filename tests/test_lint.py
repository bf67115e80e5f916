"""Linters run as tests: ruff on the whole tree, mypy on the packages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import BIN, ROOT

PACKAGES = ["mandos_core", "password_agent", "mandosd", "mandos_keygen", "luks_passphrase"]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool
    if not exe.exists():
        pytest.skip(f"{tool} not installed in the venv")
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff() -> None:
    p = _run("ruff", "check", ".")
    assert p.returncode == 0, p.stdout + p.stderr


def test_mypy() -> None:
    p = _run("mypy", *PACKAGES)
    assert p.returncode == 0, p.stdout + p.stderr


def test_initrd_side_never_imports_the_server() -> None:
    """password_agent runs in the initrd: no mandosd, no cryptography at import time."""
    code = ("import sys, password_agent.agent, password_agent.mandos_client, "
            "password_agent.client; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('mandosd', 'cryptography', 'gnupg', 'asyncio')]; print(bad); sys.exit(bool(bad))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
