"""Work a standalone server does in-process that systemd timers do otherwise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def standalone_jobs(server: Any, *, socket_activated: bool) -> list[Callable[[], Any]]:
    """Coroutine factories to run beside the server (checkers come with their pass)."""
    return []
