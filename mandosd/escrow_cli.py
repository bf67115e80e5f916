"""mandos-ctl escrow: list the escrow packets mandosd holds, export one, read one.

    mandos-ctl escrow list [--history]
    mandos-ctl escrow export CLIENT VOLUME_UUID [-o FILE]     (or --sequence N)
    mandos-ctl escrow secrets PACKET --key ESCROW-KEY.pem

In a pool of key servers (--state-url, or state_url= in mandos.conf) the packets
are in the pool's PostgreSQL, whichever server received them; otherwise in the
state directory's escrow.sqlite.

"export" writes the volume_key packet as it was received; the helpdesk reads
the passphrase with "volume_key --secrets -d NSSDB PACKET" or with
"secrets" and the escrow private key as a PEM file.  The key server itself
never holds that key.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mandos_core import escrow_packet
from mandos_core.cli import oserror_line
from mandos_core.text import printable

from .escrow import DB_NAME, EscrowError, EscrowStore, Store
from .state import StateError

Opened = tuple["Store | None", Callable[[], None]]


def _parser() -> argparse.ArgumentParser:
    from .ctl import global_options

    p = argparse.ArgumentParser(prog="mandos-ctl escrow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[global_options()])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="list, export or secrets")
    ls = sub.add_parser("list", help="the current packet per machine and volume")
    ls.add_argument("--history", action="store_true", help="every packet ever received")
    ex = sub.add_parser("export", help="write one packet (for volume_key --secrets)")
    ex.add_argument("client", nargs="?", help="client name or key_id")
    ex.add_argument("volume_uuid", nargs="?", metavar="VOLUME_UUID",
                    help="the LUKS volume's UUID (as \"escrow list\" shows it)")
    ex.add_argument("--sequence", type=int, help="a packet by its sequence number instead")
    ex.add_argument("-o", "--output", type=Path, help="output file (default: standard output)")
    se = sub.add_parser("secrets", help="show the passphrase in a packet (needs the escrow key)")
    se.add_argument("packet", type=Path, help="a packet file (from \"escrow export\")")
    se.add_argument("--key", type=Path, required=True, metavar="PEM",
                    help="the escrow private key (PEM, unencrypted)")
    return p


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _write_passphrase(raw: bytes) -> None:
    """The passphrase as it is when printable; escaped (and said so) when it is not."""
    text = raw.decode("utf-8", "surrogateescape")
    if text.isprintable():
        sys.stdout.buffer.write(b"Passphrase:\t" + raw + b"\n")
        return
    sys.stdout.write(f"Passphrase:\t{printable(text)}\n")
    print("mandos-ctl escrow: the passphrase holds non-printable characters, shown "
          "escaped (\\xNN, \\\\ for a backslash)", file=sys.stderr)


def _pool_store(url: str) -> Opened:
    """The pool's escrow table (PostgreSQL), and how to close it."""
    try:
        from .pgescrow import PostgresEscrowStore
        from .pgstate import PostgresStore
    except ImportError:
        raise EscrowError("the pool needs psycopg 3 (Debian: python3-psycopg)") from None
    from .stores import server_name

    try:
        state = PostgresStore(url, server_name=f"mandos-ctl@{server_name()}")
    except StateError as e:
        raise EscrowError(str(e)) from None
    return PostgresEscrowStore(state), state.close


def _store(common: argparse.Namespace) -> Opened:
    """The escrow store, opened only when it is there: a wrong --statedir says so, and
    creates nothing.  None: the key server's state is there, but no packet came yet."""
    from . import config as configmod
    from .config import ConfigError
    from .stores import state_url_from

    try:
        cfg = configmod.load_server_config(
            configmod.configdir_from(common.configdir) / "mandos.conf")
        url = state_url_from(common.state_url, cfg)
        if url:
            return _pool_store(url)
        statedir = configmod.statedir_from(common.statedir, cfg)
    except ConfigError as e:
        raise EscrowError(str(e)) from None
    path = statedir / DB_NAME
    try:
        os.stat(path)
    except FileNotFoundError:
        if (statedir / "clients.sqlite").exists():
            return None, lambda: None  # mandosd's state, and no packet yet
        raise EscrowError(f"{statedir}: no key server state here (wrong --statedir?)") from None
    except OSError as e:
        raise EscrowError(oserror_line(e, path)) from None
    sqlite = EscrowStore(statedir)
    return sqlite, sqlite.close


def _query(store: Store | None, args: argparse.Namespace) -> int:
    """list / export on an open store (None: a server's state, no packet yet)."""
    if args.command == "list":
        rows = store.list(history=args.history) if store else []
        print(f"{'SEQ':>4}  {'CLIENT':<16} {'VOLUME UUID':<36}  SLOT  RECEIVED"
              "              HOST")
        for r in rows:
            # every field but the numbers and times came from a machine: escaped
            print(f"{r.sequence:>4}  {printable(r.client_name):<16} "
                  f"{printable(r.volume_uuid):<36}  "
                  f"{r.slot if r.slot is not None else '-':>4}  {_when(r.received)}  "
                  f"{printable(r.host_name)}".rstrip())
        if not rows:
            print("mandos-ctl escrow: no packet stored yet", file=sys.stderr)
        return 0
    if args.sequence is not None:
        found = store.get(args.sequence) if store else None
    elif args.client and args.volume_uuid:
        found = store.find(args.client, args.volume_uuid) if store else None
    else:
        print("mandos-ctl escrow export: give CLIENT VOLUME_UUID or --sequence N",
              file=sys.stderr)
        return 2
    if found is None:
        print("mandos-ctl escrow: no such packet", file=sys.stderr)
        return 1
    if args.output:
        args.output.write_bytes(found.packet)
    else:
        sys.stdout.buffer.write(found.packet)
    return 0


def main(argv: Sequence[str] | None = None, common: argparse.Namespace | None = None) -> int:
    args = _parser().parse_args(argv)
    if common is not None:  # given before "escrow" (mandos-ctl --statedir X escrow list)
        for key in ("configdir", "statedir", "state_url"):
            if getattr(args, key) is None:
                setattr(args, key, getattr(common, key))
        args.debug = args.debug or common.debug
    try:
        if args.command == "secrets":
            pkt = escrow_packet.parse(args.packet.read_bytes())
            secret = escrow_packet.unwrap(pkt, args.key.read_bytes())
            m = pkt.metadata
            print(f"Volume UUID:\t{printable(m.volume_uuid)}\nHost name:\t"
                  f"{printable(m.host_name)}\nPassphrase slot:\t{m.passphrase_slot}")
            sys.stdout.flush()
            _write_passphrase(secret.reveal())
            secret.wipe()
            return 0
        store, close = _store(args)
        try:
            return _query(store, args)
        finally:
            close()
    except (OSError, EscrowError, escrow_packet.PacketError) as e:
        msg = oserror_line(e) if isinstance(e, OSError) else str(e)
        print(f"mandos-ctl escrow: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
