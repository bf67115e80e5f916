"""``mandos-ctl log`` and ``mandos-ctl migrate-state``: a pool's audit table and its start.

    mandos-ctl log [CLIENT] [--limit N] [--state-url URL]
    mandos-ctl migrate-state [--statedir DIR] [--state-url URL]

``log`` answers "who got what, when, from which server" across the pool (each
server still writes its own journal too).  ``migrate-state`` copies a single
server's SQLite state (every client, with its enabled flag, deadline, history,
``mandos-ctl`` overrides and added clients, and every escrow packet with its
sequence number) into an empty pool database, all in one transaction; the
SQLite files are left as they were.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mandos_core import log as logsetup
from mandos_core.text import printable

from . import config as configmod
from .escrow import DB_NAME, EscrowError, EscrowStore, StoredPacket
from .state import SQLiteStore, StateError
from .stores import state_url_from


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--configdir", type=Path, default=None,
                        help=f"directory with mandos.conf (default: "
                        f"{configmod.DEFAULT_CONFIGDIR})")
    common.add_argument("--state-url", metavar="URL", default=None,
                        help="the pool's PostgreSQL (default: state_url= from mandos.conf)")
    common.add_argument("--debug", action="store_true", help="verbose logs")
    p = argparse.ArgumentParser(prog="mandos-ctl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lg = sub.add_parser("log", parents=[common], help="the pool's audit trail, oldest first")
    lg.add_argument("client", nargs="?", help="only this client")
    lg.add_argument("-n", "--limit", type=int, default=100,
                    help="the newest N entries (default: %(default)s)")
    mg = sub.add_parser("migrate-state", parents=[common], help="copy STATEDIR/clients.sqlite into the pool")
    mg.add_argument("--statedir", type=Path, default=None,
                    help="the single server's state directory (default: as mandosd)")
    return p


def _escrow_packets(statedir: Path) -> list[StoredPacket]:
    """Every packet of ``STATEDIR/escrow.sqlite`` (none if no machine escrowed yet)."""
    if not (statedir / DB_NAME).exists():
        return []
    old = EscrowStore(statedir)
    try:
        return old.list(history=True)
    finally:
        old.close()


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(" ".join(f"{c:{w}}" for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    logsetup.setup("mandos-ctl", args.debug)
    configdir = configmod.configdir_from(args.configdir)
    try:
        cfg = configmod.load_server_config(configdir / "mandos.conf")
        url = state_url_from(args.state_url, cfg)
        if not url:
            print("mandos-ctl: no pool configured: give --state-url or state_url= in "
                  f"{configdir / 'mandos.conf'}", file=sys.stderr)
            return 1
        from .pgescrow import import_packets
        from .pgstate import PostgresStore

        store = PostgresStore(url)
        try:
            if args.command == "log":
                rows = store.audit_log(args.client, max(1, args.limit))
                out = [("When", "Server", "Outcome", "Client", "Peer", "Reason")]
                # a reason may quote a machine (a checker's last line: its SSH banner)
                out += [(r["at"].strftime("%Y-%m-%d %H:%M:%S%z"), *(printable(r[k] or "") for k
                         in ("server", "outcome", "client", "peer", "reason"))) for r in rows]
                print(_table(out))
                return 0
            statedir = configmod.statedir_from(args.statedir, cfg)
            if not (statedir / "clients.sqlite").exists():
                print(f"mandos-ctl: {statedir / 'clients.sqlite'}: no such file",
                      file=sys.stderr)
                return 1
            old = SQLiteStore(statedir)
            try:
                states = old.all()
            finally:
                old.close()
            packets = _escrow_packets(statedir)
            count = store.import_states(states, also=lambda conn: import_packets(
                conn, store.where, packets))
            print(f"mandos-ctl: copied {count} clients and {len(packets)} escrow packets "
                  f"from {statedir} into {store.where}")
            return 0
        finally:
            store.close()
    except (configmod.ConfigError, StateError, EscrowError) as e:
        print(f"mandos-ctl: {e}", file=sys.stderr)
        return 1
    except ImportError:
        print("mandos-ctl: the pool needs psycopg 3 (Debian: python3-psycopg)",
              file=sys.stderr)
        return 1
