"""Shared fixtures, and the suite's one rule for CI: nothing is skipped.

With ``CI`` set to a true value in the environment (CI sets ``CI=true``), every
skipped test and every expected failure (``xfail``) is reported as a failure
and the run exits non-zero, however pytest was started (``./dev.sh test`` or
``pytest`` directly).  Locally a missing tool may skip, with its reason.  A
broken environment (a daemon that did not start, a namespace that could not be
made) is never a skip: tests call ``pytest.fail`` for it, everywhere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import pglib
from tests.helpers import PASSWORD, Mandosd, enroll, make_keys

__all__ = ["PASSWORD"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def _no_skips_in_ci(report: pytest.CollectReport | pytest.TestReport) -> None:
    """Turn a skip or an xfail into a failure when running in CI."""
    if not in_ci() or not report.skipped:
        return
    if hasattr(report, "wasxfail"):
        why = f"xfail in CI (CI=true fails every expected failure): {report.wasxfail}"
        del report.wasxfail  # else pytest still counts it as expected
    else:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        why = f"skipped in CI (CI=true fails every skip; install what is missing): {reason}"
    report.outcome = "failed"
    report.longrepr = why
    _CONVERTED.append(report.nodeid)


#: node ids whose skip or xfail was turned into a failure (the exit status checks it)
_CONVERTED: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _no_skips_in_ci(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _no_skips_in_ci(outcome.get_result())  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _CONVERTED and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_report_header(config: pytest.Config) -> str:
    return ("CI=true: any skip or xfail fails the run" if in_ci()
            else "not CI: a missing tool skips with a reason (CI=true makes skips fail)")


@pytest.fixture(scope="session")
def client_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One client's key set made by our mandos-keygen (shared: read-only use)."""
    return make_keys(tmp_path_factory.mktemp("keys") / "keys", "client1")


@pytest.fixture(scope="session")
def client_section(client_keys: Path) -> str:
    return enroll(client_keys, PASSWORD, "client1", host="127.0.0.1")


@pytest.fixture()
def mandosd(tmp_path: Path, client_section: str) -> Iterator[Mandosd]:
    """A running mandosd on 127.0.0.1 with client1 enrolled (password: PASSWORD)."""
    with Mandosd(tmp_path / "srv", sections=[client_section]) as server:
        yield server


@pytest.fixture(scope="module")
def pg() -> Iterator[pglib.Postgres]:
    """A real PostgreSQL 15 for one test module (its own: a module may stop it)."""
    why = pglib.available()
    if why:
        pytest.skip(why)
    server = pglib.Postgres().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture()
def url(pg: pglib.Postgres) -> str:
    """A fresh, empty database for one test (the cluster started again if a test before
    stopped it and failed before it could start it)."""
    if not pg.running:
        pg.start()
    return pg.create_database(f"t_{uuid.uuid4().hex[:12]}")
