"""``mandos-ctl escrow``: list the escrow packets mandosd holds, export one, read one.

    mandos-ctl escrow list [--history]
    mandos-ctl escrow export CLIENT VOLUME_UUID [-o FILE]     (or --sequence N)
    mandos-ctl escrow secrets PACKET --key ESCROW-KEY.pem

``export`` writes the volume_key packet as it was received; the helpdesk reads
the passphrase with ``volume_key --secrets -d NSSDB PACKET`` or with
``secrets`` and the escrow private key as a PEM file.  The key server itself
never holds that key.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path

from mandos_core import escrow_packet
from mandos_core.text import printable

from .config import DEFAULT_STATEDIR
from .escrow import EscrowError, EscrowStore


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mandos-ctl escrow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--statedir", type=Path, default=DEFAULT_STATEDIR, metavar="DIR",
                   help=f"mandosd's state directory (default {DEFAULT_STATEDIR})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = sub.add_parser("list", help="the current packet per machine and volume")
    ls.add_argument("--history", action="store_true", help="every packet ever received")
    ex = sub.add_parser("export", help="write one packet (for volume_key --secrets)")
    ex.add_argument("client", nargs="?", help="client name or key_id")
    ex.add_argument("volume_uuid", nargs="?", metavar="VOLUME_UUID")
    ex.add_argument("--sequence", type=int, help="a packet by its sequence number instead")
    ex.add_argument("-o", "--output", type=Path, help="output file (default: standard output)")
    se = sub.add_parser("secrets", help="show the passphrase in a packet (needs the escrow key)")
    se.add_argument("packet", type=Path)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        store = EscrowStore(args.statedir)
        if args.command == "list":
            rows = store.list(history=args.history)
            print(f"{'SEQ':>4}  {'CLIENT':<16} {'VOLUME UUID':<36}  SLOT  RECEIVED"
                  "              HOST")
            for r in rows:
                # every field but the numbers and times came from a machine: escaped
                print(f"{r.sequence:>4}  {printable(r.client_name):<16} "
                      f"{printable(r.volume_uuid):<36}  "
                      f"{r.slot if r.slot is not None else '-':>4}  {_when(r.received)}  "
                      f"{printable(r.host_name)}")
            return 0
        if args.sequence is not None:
            found = store.get(args.sequence)
        elif args.client and args.volume_uuid:
            found = store.find(args.client, args.volume_uuid)
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
    except (OSError, EscrowError, escrow_packet.PacketError) as e:
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"mandos-ctl escrow: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
