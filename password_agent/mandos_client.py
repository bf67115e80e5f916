"""``mandos-client``: fetch, decrypt and print this machine's passphrase.

Start-up order matters for latency: the OpenPGP key import (and with it
gpg-agent) starts before the TLS stack is even imported, so both run in
parallel; the secret is printed as soon as it is decrypted, and clean-up
(stopping gpg-agent, removing the temporary GNUPGHOME) happens after.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from mandos_core.keyfiles import DEFAULT_KEYDIR

from .gpg import Decryptor, GpgError

EXIT_OK = 0
EXIT_NO_SECRET = 1
EXIT_USAGE = 2
EXIT_KEYS = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mandos-client",
        description="Fetch this machine's LUKS passphrase from a Mandos key server, "
        "decrypt it with the machine's OpenPGP key and print it on stdout (no newline).",
        epilog="Exit status: 0 the passphrase was printed; 1 no server gave a secret "
        "(refused, unreachable or timed out); 2 usage error; 3 key files or gpg failed. "
        "The server never says why it refuses; its audit log does.  For unlocking at boot "
        "use mandos-password-agent, which answers systemd's passphrase questions.",
    )
    p.add_argument("--connect", metavar="HOST:PORT", action="append", required=True,
                   help="key server to ask; repeat to ask several at once "
                   "(IPv6 as [ADDRESS]:PORT, link-local as [fe80::1%%eth0]:PORT)")
    p.add_argument("--keydir", type=Path, default=DEFAULT_KEYDIR,
                   help="directory with the key files (default: %(default)s)")
    for opt, dest, name in (("--pubkey", "pubkey", "pubkey.txt"),
                            ("--seckey", "seckey", "seckey.txt"),
                            ("--tls-pubkey", "tls_pubkey", "tls-pubkey.pem"),
                            ("--tls-privkey", "tls_privkey", "tls-privkey.pem")):
        p.add_argument(opt, dest=dest, type=Path, metavar="FILE",
                       help=f"use FILE instead of KEYDIR/{name}")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="give up after this long (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="log every step to stderr")
    return p


def _fail(message: object, code: int) -> int:
    print(f"mandos-client: {message}", file=sys.stderr)
    return code


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally below: gpg is cleaned up


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    args = _parser().parse_args(argv)
    try:
        # start gpg in the background first: it imports the key while we load TLS
        decryptor = Decryptor(args.seckey or args.keydir / "seckey.txt")
    except GpgError as e:
        return _fail(e, EXIT_KEYS)
    try:
        from mandos_core import log as logsetup
        from mandos_core.keyfiles import KeyError_, KeyFiles, server_context

        from .client import FetchError, fetch_any, parse_server

        keys = KeyFiles.from_dir(args.keydir, pubkey=args.pubkey, seckey=args.seckey,
                                 tls_pubkey=args.tls_pubkey, tls_privkey=args.tls_privkey)

        logsetup.setup("mandos-client", args.debug)
        try:
            servers = [parse_server(s) for s in args.connect]
        except ValueError as e:
            return _fail(f"--connect {e}", EXIT_USAGE)
        try:
            ctx = server_context(keys)
            _, message = fetch_any(servers, ctx, timeout=args.timeout,
                                   connect_timeout=min(5.0, args.timeout))
        except KeyError_ as e:
            return _fail(e, EXIT_KEYS)
        except FetchError as e:
            return _fail(e, EXIT_NO_SECRET)
        try:
            secret = decryptor.decrypt(message)
        except GpgError as e:
            return _fail(e, EXIT_KEYS)
        with secret:
            sys.stdout.buffer.write(secret.reveal())
            sys.stdout.buffer.flush()
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    finally:
        decryptor.close()


if __name__ == "__main__":
    sys.exit(main())
