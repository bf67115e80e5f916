"""``mandosd``: the key server's command line and its one error boundary."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from mandos_core import log as logsetup
from mandos_core.cli import add_version, unreachable
from mandos_core.hardening import disable_core_dumps

from . import config as configmod
from . import listen
from .audit import Kind, audit
from .state import StateError

log = logging.getLogger("mandosd")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mandosd",
        description="Mandos-compatible key server: hands each known, enabled, reachable "
        "client its encrypted LUKS passphrase over TLS 1.3, and refuses everyone else "
        "(refusals look identical on the wire; the reason goes to the audit log).",
        epilog="Listening: under systemd, mandosd.socket passes the sockets (LISTEN_FDS); "
        "otherwise --listen, else address/port from mandos.conf.  The server never "
        "daemonizes.  Config: CONFIGDIR/mandos.conf and CONFIGDIR/clients.conf in Mandos's "
        "formats.  State: STATEDIR/clients.sqlite.  Exit status: 0 stopped normally, "
        "1 configuration or state error, 2 usage error.",
    )
    add_version(p)
    p.add_argument("--configdir", "--config-dir", type=Path, default=None, metavar="DIR",
                   help=f"directory with mandos.conf and clients.conf "
                   f"(default: {configmod.DEFAULT_CONFIGDIR})")
    p.add_argument("--statedir", "--state-dir", type=Path, default=None, metavar="DIR",
                   help="state directory (default: $STATE_DIRECTORY, else statedir= from "
                   f"mandos.conf, else {configmod.DEFAULT_STATEDIR})")
    p.add_argument("--state-url", metavar="URL", default=None,
                   help="share state with a pool of servers in this PostgreSQL database "
                   "(libpq connection string, e.g. postgresql:///mandos?host=/run/postgresql; "
                   "default: state_url= from mandos.conf, else SQLite in the state directory)")
    p.add_argument("--server-name", metavar="NAME", default=None,
                   help="this server's name in the pool's audit table (default: host name)")
    p.add_argument("--listen", metavar="ADDR:PORT", action="append", default=[],
                   help="listen here instead of on systemd's sockets (repeatable; "
                   "[::1]:PORT for IPv6; port 0 picks a free port and logs it)")
    p.add_argument("-i", "--interface", help="accepted for Mandos compatibility: with "
                   "--address/--port, bind to this interface")
    p.add_argument("-a", "--address", help="address to listen on if no --listen "
                   "(overrides mandos.conf)")
    p.add_argument("-p", "--port", type=int, help="port to listen on if no --listen "
                   "(overrides mandos.conf)")
    p.add_argument("--idle-timeout", type=float, metavar="SECONDS", default=None,
                   help="exit after this long without connections (for socket activation; "
                   "default: never)")
    p.add_argument("--peer-timeout", type=float, metavar="SECONDS", default=10.0,
                   help="time a peer gets for its version line, and again for the TLS "
                   "handshake; slower peers are dropped (default: %(default)s)")
    p.add_argument("--check-config", "--check", action="store_true",
                   help="load the configuration, report problems and exit")
    p.add_argument("--run-checkers", action="store_true",
                   help="run the checkers that are due once (batched fping, others with "
                   "bounded concurrency), record the results in the state store, disable "
                   "clients whose timeout has passed, and exit; what mandosd-checker.timer "
                   "runs.  Exit status 0 even when checkers fail (that is a result, audited)")
    p.add_argument("--checker-concurrency", type=int, metavar="N", default=None,
                   help="with --run-checkers: at most N non-fping checkers at a time "
                   "(default: 64)")
    p.add_argument("--foreground", action="store_true",
                   help="accepted for Mandos compatibility (mandosd never daemonizes)")
    p.add_argument("--no-dbus", action="store_true", help="accepted for compatibility")
    p.add_argument("--no-ipv6", action="store_true", help="accepted for compatibility")
    p.add_argument("--no-restore", action="store_true",
                   help="accepted for compatibility (state is always kept)")
    p.add_argument("--no-zeroconf", action="store_true",
                   help="accepted for compatibility (announcing is Avahi's job; see README)")
    p.add_argument("--debug", action="store_true", help="verbose logs")
    return p


def _sockets(args: argparse.Namespace, cfg: configmod.Config) -> tuple[list[socket.socket], bool]:
    """The sockets to serve on, and whether systemd passed them (then timers run checkers)."""
    if args.listen:
        return [listen.bind(spec) for spec in args.listen], False
    socks = listen.systemd_sockets()
    if socks:
        return socks, True
    if cfg.server.socket:
        return [socket.socket(fileno=int(cfg.server.socket))], False
    port = args.port if args.port is not None else cfg.server.port
    if port is None:
        raise listen.ListenError(
            "nothing to listen on: start mandosd.socket, give --listen ADDR:PORT, "
            "or set port= in mandos.conf")
    address = args.address or cfg.server.address or ("::" if cfg.server.use_ipv6 else "0.0.0.0")
    spec = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return [listen.bind(spec)], False


def _notify(message: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    import sdnotify

    sdnotify.SystemdNotifier().notify(message)


def _run_checkers(args: argparse.Namespace, configdir: Path, statedir: Path,
                  cfg: configmod.Config) -> int:
    """One checker pass (``mandosd-checker.service``)."""
    import time

    from .checker import Limits, run_pass
    from .stores import copy_audit, open_store, state_url_from

    limits = Limits()
    if args.checker_concurrency is not None:
        limits = Limits(concurrency=max(1, args.checker_concurrency))
    state_url = state_url_from(args.state_url, cfg.server)
    store = open_store(state_url, statedir, name=args.server_name)
    close_audit = copy_audit(state_url, args.server_name)  # checker results: the pool's too
    try:
        store.sync_clients(cfg.clients.values(), time.time())
        report = run_pass(store, cfg.clients, configdir, limits=limits)
    finally:
        close_audit()
        store.close()
    log.info("checker pass: %s", report.summary())
    _notify(f"STATUS=Checker pass: {report.summary()}")
    return 0


def _check_priority(configdir: Path, cfg: configmod.Config) -> None:
    """mandos.conf's ``priority =`` is a GnuTLS priority string: GnuTLS must accept it."""
    from mandos_core import gnutls, tls

    try:
        tls.check_priority(cfg.server.priority)
    except gnutls.PriorityError as e:
        raise configmod.ConfigError(f"{configdir / 'mandos.conf'}: [DEFAULT] "
                                    f"priority={cfg.server.priority}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    disable_core_dumps()  # first: no core file may hold a key
    args = _parser().parse_args(argv)
    logsetup.setup("mandosd", args.debug)
    configdir = configmod.configdir_from(args.configdir)
    try:
        cfg = configmod.load(configdir)
        _check_priority(configdir, cfg)
        if args.check_config:
            from .checker import report_unsupported

            report_unsupported(cfg.clients.values(), None)  # checkers that would not run
            print(f"mandosd: {configdir}: configuration is valid "
                  f"({len(cfg.clients)} clients)")
            return 0
        if cfg.server.debug and not args.debug:
            logsetup.setup("mandosd", True)
        statedir = configmod.statedir_from(args.statedir, cfg.server)
        problem = unreachable(statedir / "clients.sqlite", create=True)
        if problem:
            raise StateError(problem)
        if args.run_checkers:
            return _run_checkers(args, configdir, statedir, cfg)
        from .server import KeyServer, Limits

        socks, from_systemd = _sockets(args, cfg)
        limits = Limits(version_timeout=args.peer_timeout,
                        handshake_timeout=args.peer_timeout)
        from .stores import copy_audit, state_url_from

        state_url = state_url_from(args.state_url, cfg.server)
        server = KeyServer(configdir, statedir, limits=limits, state_url=state_url,
                           server_name=args.server_name)
        close_audit = copy_audit(state_url, args.server_name)
    except (configmod.ConfigError, StateError, listen.ListenError) as e:
        print(f"mandosd: {e}", file=sys.stderr)
        return 1
    where = ", ".join(listen.describe(s) for s in socks)
    audit(Kind.SERVER_STARTED, f"serving {len(server.config.clients)} clients on {where}",
          listen=where)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        from .background import standalone_jobs

        jobs = standalone_jobs(server, socket_activated=from_systemd)
        await server.serve(
            socks, idle_timeout=args.idle_timeout, background=jobs,
            on_ready=lambda: _notify(f"READY=1\nSTATUS=Serving {len(server.config.clients)} "
                                     f"clients on {where}"))

    try:
        asyncio.run(run())
    except (asyncio.CancelledError, KeyboardInterrupt):
        pass
    finally:
        _notify("STOPPING=1")
        server.close()
        close_audit()
        log.debug("stopped after serving %d secrets", server.served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
