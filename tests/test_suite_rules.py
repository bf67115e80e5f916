"""The suite's own rules, checked: in CI nothing is skipped; test modules share one
helper library and never import each other; no fixed sleeps in tests."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

TESTS = ROOT / "tests"

SKIPPING = '''
import pytest

def test_passes():
    pass

def test_skips():
    pytest.skip("a tool is missing")
'''

SKIPPING_AT_IMPORT = '''
import pytest
pytest.skip("no qemu here", allow_module_level=True)

def test_never_collected():
    pass
'''

SKIPPING_IN_A_FIXTURE = '''
import pytest

@pytest.fixture()
def qemu():
    pytest.skip("no qemu here")

def test_boots(qemu):
    pass

@pytest.mark.skipif(True, reason="a marker")
def test_marked():
    pass
'''

XFAILING = '''
import pytest

@pytest.mark.xfail(reason="known broken")
def test_broken():
    assert False
'''

PASSING = '''
def test_passes():
    pass
'''


def run_pytest(tmp_path: Path, body: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    """pytest on one small file with the suite's conftest.py loaded, in a fresh process."""
    test = tmp_path / "test_probe.py"
    test.write_text(body)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "-p", "tests.conftest", "--rootdir", str(tmp_path), str(test)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("body", [SKIPPING, SKIPPING_AT_IMPORT, SKIPPING_IN_A_FIXTURE,
                                  XFAILING],
                         ids=["skip", "module-skip", "fixture-and-marker-skip", "xfail"])
def test_ci_fails_a_run_with_a_skip(tmp_path: Path, body: str) -> None:
    local = run_pytest(tmp_path, body, ci=None)
    # 5: "no tests ran", when the only module skipped itself
    assert local.returncode in (0, 5) and ("skipped" in local.stdout or "xfailed" in local.stdout), \
        local.stdout + local.stderr
    ci = run_pytest(tmp_path, body, ci="true")
    assert ci.returncode in (1, 2), ci.stdout + ci.stderr  # 2: a failed collection
    assert "in CI (CI=true fails every" in ci.stdout, ci.stdout


def test_ci_passes_a_run_without_skips(tmp_path: Path) -> None:
    p = run_pytest(tmp_path, PASSING, ci="true")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "CI=true: any skip or xfail fails the run" in p.stdout


def test_dev_sh_test_runs_pytest_with_the_suites_conftest() -> None:
    """``./dev.sh test`` and ``.ci/run`` reach the same pytest (and so the same hook)."""
    assert "-m pytest" in _dev_sh_arm("test")
    assert "./dev.sh test" in (ROOT / ".ci" / "run").read_text()


def modules() -> list[Path]:
    return sorted(TESTS.glob("test_*.py"))


#: test modules owned by other work in progress that still import a test module;
#: each entry names what replaces the import.  Empty this list, do not grow it.
CROSS_IMPORT_PENDING: dict[str, str] = {}


def test_no_test_module_imports_another() -> None:
    bad = []
    for path in modules():
        if path.name in CROSS_IMPORT_PENDING:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(re.match(r"tests\.(test_|conftest)", n) for n in names):
                bad.append(f"{path.name}:{getattr(node, 'lineno', 0)}")
    assert not bad, f"test modules import test modules (use tests/helpers.py): {bad}"


def test_one_definition_of_each_shared_helper() -> None:
    """``ctl``, ``secret_forms``, ``raw_fetch`` and ``wait_log`` live in tests/helpers.py."""
    shared = {"ctl", "secret_forms", "raw_fetch", "wait_log", "wait_for", "wait_port"}
    dupes = []
    for path in modules():
        if path.name in CROSS_IMPORT_PENDING:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name in shared:
                dupes.append(f"{path.name}: {node.name}")
    assert not dupes, dupes


#: a time.sleep( line that is not a wait says why on the same line
SLEEP_REASONS = ("not a wait", "sampling")


def test_no_fixed_sleeps() -> None:
    """Tests wait on events or conditions (``helpers.wait_for``), not on the clock."""
    bad = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name in CROSS_IMPORT_PENDING or path.name.startswith("test_checker") \
                or path.name == "helpers.py":
            continue
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "time.sleep":
                line = lines[node.lineno - 1]
                if not any(r in line for r in SLEEP_REASONS):
                    bad.append(f"{path.name}:{node.lineno}: {line.strip()}")
    assert not bad, bad


def test_no_assert_that_cannot_fail() -> None:
    """``assert sys.executable``, ``assert True``, ``assert "text"``: they pass whatever the
    code does."""
    modules = {"sys", "os", "pytest", "Path", "ROOT"}
    bad = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Assert):
                continue
            test = node.test
            if isinstance(test, ast.Constant) or (
                    isinstance(test, ast.Attribute) and isinstance(test.value, ast.Name)
                    and test.value.id in modules) or (
                    isinstance(test, ast.Name) and test.id in modules):
                bad.append(f"{path.name}:{node.lineno}: assert {ast.unparse(test)}")
    assert not bad, bad


def _packages(name: str) -> set[str]:
    lines = (ROOT / ".ci" / name).read_text().splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}


def _dev_sh_arm(word: str) -> str:
    m = re.search(rf"^    {word}\)(.*?);;", (ROOT / "dev.sh").read_text(), re.S | re.M)
    assert m, word
    return m.group(1)


def test_demo_installs_only_what_it_needs() -> None:
    """``./dev.sh demo`` installs the demo's short list; ``test`` (and so CI) everything."""
    demo, rest = _packages("apt-packages-demo"), _packages("apt-packages")
    assert {"gnupg", "python3", "python3-venv"} <= demo
    assert not demo & {"qemu-system-x86", "linux-image-amd64", "mandos", "tang", "xvfb",
                       "dracut"}
    assert {"qemu-system-x86", "linux-image-amd64", "mandos", "xvfb"} <= rest
    arm = _dev_sh_arm("demo")
    assert "$DEMO_PACKAGES" in arm and "$TEST_PACKAGES" not in arm and "[test]" not in arm
    for word in ("test", "install"):
        arm = _dev_sh_arm(word)
        assert "$DEMO_PACKAGES" in arm and "$TEST_PACKAGES" in arm and "'.[test]'" in arm
    run = (ROOT / ".ci" / "run").read_text()
    assert "exec ./dev.sh test" in run and 'CI="${CI:-true}"' in run
