from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Mandosd, enroll, make_keys

PASSWORD = b"correct horse battery staple \xc3\xa9 !"


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
