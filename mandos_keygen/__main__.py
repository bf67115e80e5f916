"""``mandos-keygen``: command line."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from mandos_core import log as logsetup
from mandos_core.cli import add_version, oserror_line
from mandos_core.hardening import disable_core_dumps
from mandos_core.keyfiles import DEFAULT_KEYDIR, KeyError_, KeyFiles, read_pins
from mandos_core.run import CommandError
from mandos_core.secret import Secret

from .keys import (
    DEFAULT_CHECKER,
    KeygenError,
    client_section,
    default_name,
    encrypt_secret,
    generate,
    identity,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mandos-keygen",
        description="Make a Mandos client's keys, or enroll its LUKS passphrase: print the "
        "clients.conf section that the key server needs.",
        epilog="Without --password/--passfile: make the keys in DIR, with Mandos's file names "
        "(tls-privkey.pem Ed25519 PKCS#8, tls-pubkey.pem, tls-cert.pem, seckey.txt, pubkey.txt; "
        "files 0600, directory 0700).  With --password or --passfile: encrypt the passphrase to "
        "the client's OpenPGP key and print the section for the server's clients.conf on stdout. "
        "The passphrase is read from the terminal or FILE and passed to gpg on stdin; it never "
        "touches disk or argv.  Keys made by Debian's mandos-keygen work too.",
    )
    add_version(p)
    p.add_argument("-d", "--dir", "--keydir", type=Path, default=DEFAULT_KEYDIR, metavar="DIR",
                   help="key directory (default: %(default)s)")
    p.add_argument("-n", "--name", default=None,
                   help="client name: section name and key user id (default: the host name)")
    p.add_argument("--host", default=None,
                   help="host name or address for the checker (default: the name)")
    p.add_argument("-f", "--force", action="store_true", help="replace existing keys")
    p.add_argument("-t", "--type", dest="key_type", choices=("ecc", "rsa"), default="ecc",
                   help="OpenPGP key type: ecc (Curve25519, default, fast) or rsa (RSA-4096 "
                   "as Debian's mandos-keygen makes)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-p", "--password", action="store_true",
                   help="ask for the passphrase twice on the terminal and print the section")
    g.add_argument("-F", "--passfile", type=Path,
                   help="read the passphrase from FILE (all of it, byte for byte) and print "
                   "the section")
    p.add_argument("--checker", default=DEFAULT_CHECKER,
                   help="checker line for the section (default: %(default)s)")
    g.add_argument("--pin", metavar="KEY_ID", action="append",
                   help="trust the key server with this identity (the key_id that "
                   "\"mandos-ctl identity\" prints on it): added to DIR/server-pins.  A pinned client "
                   "fetches secrets only from a server that proves a pinned key, and "
                   "luks-passphrase destroys an old backup slot only on an escrow "
                   "acknowledgement from one (repeatable)")
    p.add_argument("--debug", action="store_true", help="show each command run")
    return p


def add_pins(keydir: Path, pins: list[str]) -> Path:
    """Append *pins* to KEYDIR/server-pins (0600), keeping the ones already there."""
    from mandos_core.keyfiles import PINS_FILE, read_pins
    from mandos_core.protocol import KeyIdError, normalize_key_id

    try:
        new = [normalize_key_id(p) for p in pins]
    except KeyIdError as e:
        raise KeygenError(f"--pin: {e}") from None
    if not keydir.is_dir():
        raise KeygenError(f"{keydir}: directory not found")
    have = read_pins(keydir)
    path = keydir / PINS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a") as f:
        for kid in new:
            if kid not in have:
                f.write(kid + "\n")
    os.chmod(path, 0o600)
    return path


def _read_password(args: argparse.Namespace) -> Secret:
    if args.passfile is not None:
        try:
            data = args.passfile.read_bytes()
        except OSError as e:
            raise KeygenError(oserror_line(e, args.passfile)) from None
        if not data:
            raise KeygenError(f"{args.passfile}: empty; the passphrase must be in it")
        if data.endswith(b"\n"):
            print(f"mandos-keygen: warning: the passphrase in {args.passfile} ends in a "
                  "newline, which is part of it; to leave it out: printf %s 'PASSPHRASE' "
                  "> FILE", file=sys.stderr)
        return Secret(data)
    if not sys.stdin.isatty():
        raise KeygenError("--password needs a terminal; use --passfile FILE for scripts")
    for _ in range(3):
        first = getpass.getpass("Enter passphrase: ")
        second = getpass.getpass("Repeat passphrase: ")
        if first == second and first:
            return Secret(first.encode())
        print("Passphrases do not match (or are empty); try again." if first else
              "Empty passphrase; try again.", file=sys.stderr)
    raise KeygenError("no passphrase entered")


def main(argv: list[str] | None = None) -> int:
    disable_core_dumps()  # first: no core file may hold a key
    args = _parser().parse_args(argv)
    logsetup.setup("mandos-keygen", args.debug)
    name = args.name or default_name()
    try:
        if args.pin:
            path = add_pins(args.dir, args.pin)
            print(f"mandos-keygen: {path} pins {len(read_pins(args.dir))} key server(s)",
                  file=sys.stderr)
            return 0
        if not (args.password or args.passfile):
            generate(args.dir, name, force=args.force, key_type=args.key_type)
            keys = KeyFiles.from_dir(args.dir)
            print(f"mandos-keygen: made keys in {args.dir} (key_id {keys.key_id()})",
                  file=sys.stderr)
            return 0
        keys = KeyFiles.from_dir(args.dir)
        if not keys.tls_pubkey.exists() or not keys.pubkey.exists():
            raise KeygenError(f"{args.dir}: no keys; run 'mandos-keygen --dir {args.dir}' first")
        ident = identity(keys)
        with _read_password(args) as secret:
            message = encrypt_secret(keys, secret)
        sys.stdout.write(client_section(name, args.host or name, ident, message, args.checker))
        return 0
    except (KeygenError, KeyError_, CommandError) as e:
        print(f"mandos-keygen: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a key directory this user may not read or write
        print(f"mandos-keygen: {oserror_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
