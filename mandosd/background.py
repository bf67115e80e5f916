"""Work a standalone server does in-process that systemd timers do otherwise.

Under systemd, ``mandosd-checker.timer`` runs ``mandosd --run-checkers`` and
the socket-activated server may exit when idle, so it runs no checkers itself.
Started standalone (``--listen``), the server runs the same checker pass on a
schedule beside the exchange: after each pass it sleeps until the next check
is due (at least :data:`MIN_SLEEP`, at most :data:`MAX_SLEEP` seconds).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import KeyServer

log = logging.getLogger("mandosd.background")

MIN_SLEEP = 0.5
MAX_SLEEP = 30.0


def standalone_jobs(server: KeyServer, *, socket_activated: bool) -> list[Callable[[], Any]]:
    """Coroutine factories to run beside the server (the checker schedule when standalone)."""
    if socket_activated:
        return []
    return [lambda: checker_schedule(server)]


async def checker_schedule(server: KeyServer) -> None:
    """Run checker passes for as long as the server runs."""
    from .checker import CheckerPass
    from .checker_run import adopting_escapees
    from .state import StateError
    from .stores import open_store

    # its own connection: the server's store belongs to the server's database thread
    store = await asyncio.to_thread(open_store, getattr(server, "state_url", None),
                                    server.statedir, durable=True,
                                    name=getattr(server, "server_name", None), lazy=True)
    try:
        while True:
            try:
                config = await server.current_config()
                with adopting_escapees():
                    report = await CheckerPass(store, config.clients, server.configdir,
                                               clock=server.clock).run()
                if report.checked or report.disabled:
                    log.info("checker pass: %s", report.summary())
                now = server.clock()
                wait = (report.next_due - now) if report.next_due is not None else MAX_SLEEP
            except StateError as e:
                log.error("checker pass: state store: %s", e)
                wait = MAX_SLEEP
            await asyncio.sleep(min(MAX_SLEEP, max(MIN_SLEEP, wait)))
    finally:
        await asyncio.to_thread(store.close)
