"""``mandos-client``: fetch, decrypt and print this machine's passphrase.

Start-up order matters for latency: the OpenPGP key import (and with it
gpg-agent) starts before the TLS stack is even imported, so both run in
parallel; the secret is printed as soon as it is decrypted, and clean-up
(stopping gpg-agent, removing the temporary GNUPGHOME) happens after.  SIGTERM,
SIGINT and SIGHUP at any point still run the clean-up, then exit 128+signal.
A server whose message was not encrypted to our key (a rogue one) is skipped
and the others are asked.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from mandos_core.cli import add_version, oserror_line
from mandos_core.durations import DurationError, parse_seconds
from mandos_core.hardening import disable_core_dumps
from mandos_core.keyfiles import DEFAULT_KEYDIR, KeyError_, KeyFiles, check_private_keys

from .gpg import Decryptor, GpgError, NotForUs

EXIT_OK = 0
EXIT_NO_SECRET = 1
EXIT_USAGE = 2
EXIT_KEYS = 3


def _timeout(text: str) -> float:
    try:
        seconds = parse_seconds(text)
    except DurationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 and at most "
                                         "3600 seconds (1h)")
    return seconds


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mandos-client",
        description="Fetch this machine's LUKS passphrase from a Mandos key server, "
        "decrypt it with the machine's OpenPGP key and print it on stdout (no newline).",
        epilog="Exit status: 0 the passphrase was printed; 1 no server gave a secret "
        "(refused, unreachable, timed out, or not encrypted to our key); 2 usage error; "
        "3 key files or gpg failed (missing key directory, a private key others can read); "
        "128+N stopped by signal N (after its clean-up). "
        "The server never says why it refuses; its audit log does.  For unlocking at boot "
        "use mandos-password-agent, which answers systemd's passphrase questions.",
    )
    p.add_argument("--connect", metavar="HOST:PORT", action="append", required=True,
                   help="key server to ask; repeat to ask several at once "
                   "(IPv6 as [ADDRESS]:PORT, link-local as [fe80::1%%eth0]:PORT)")
    add_version(p)
    p.add_argument("--keydir", "--dir", type=Path, default=DEFAULT_KEYDIR, metavar="DIR",
                   help="directory with the key files (default: %(default)s)")
    for opt, dest, name in (("--pubkey", "pubkey", "pubkey.txt"),
                            ("--seckey", "seckey", "seckey.txt"),
                            ("--tls-pubkey", "tls_pubkey", "tls-pubkey.pem"),
                            ("--tls-privkey", "tls_privkey", "tls-privkey.pem")):
        p.add_argument(opt, dest=dest, type=Path, metavar="FILE",
                       help=f"use FILE instead of KEYDIR/{name}")
    p.add_argument("--timeout", type=_timeout, default=10.0, metavar="SECONDS",
                   help="give up after this long: seconds, or a duration such as 10s or "
                   "PT1M (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="log every step to stderr")
    return p


def _fail(message: object, code: int) -> int:
    print(f"mandos-client: {message}", file=sys.stderr)
    return code


#: The signals that end mandos-client early: each makes it clean up, then exit 128+signal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(argv: list[str] | None = None) -> int:
    disable_core_dumps()
    # A signal only takes note and cancels the wait for servers: it never raises, so it
    # cannot cut the clean-up (gpg-agent, the GNUPGHOME with the private key) short.
    stop = threading.Event()
    caught: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        caught.append(signum)
        stop.set()

    for s in STOP_SIGNALS:
        signal.signal(s, on_signal)
    code = _main(argv, stop)
    return 128 + caught[0] if caught else code


def _main(argv: list[str] | None, stop: threading.Event) -> int:
    args = _parser().parse_args(argv)
    try:
        keys = KeyFiles.from_dir(args.keydir, pubkey=args.pubkey, seckey=args.seckey,
                                 tls_pubkey=args.tls_pubkey, tls_privkey=args.tls_privkey)
        check_private_keys(args.keydir if None in (args.pubkey, args.seckey, args.tls_pubkey,
                                                   args.tls_privkey) else None, keys)
        # start gpg in the background first: it imports the key while we load TLS
        decryptor = Decryptor(keys.seckey)
    except (KeyError_, GpgError) as e:
        return _fail(e, EXIT_KEYS)
    except OSError as e:  # a key file this user may not read
        return _fail(oserror_line(e), EXIT_KEYS)
    try:
        if stop.is_set():
            return EXIT_NO_SECRET
        from mandos_core import log as logsetup
        from mandos_core.keyfiles import server_context

        from .client import FetchError, fetch_any, parse_server

        logsetup.setup("mandos-client", args.debug)
        try:
            servers = [parse_server(s) for s in args.connect]
        except ValueError as e:
            return _fail(f"--connect {e}", EXIT_USAGE)
        try:
            ctx = server_context(keys)
        except KeyError_ as e:
            return _fail(e, EXIT_KEYS)
        while True:
            try:
                server, message = fetch_any(servers, ctx, timeout=args.timeout,
                                            connect_timeout=min(5.0, args.timeout),
                                            cancel=stop)
            except FetchError as e:
                return _fail(e, EXIT_NO_SECRET)
            if stop.is_set():
                return EXIT_NO_SECRET
            try:
                secret = decryptor.decrypt(message)
            except NotForUs as e:  # a rogue server: ask the others
                servers = [s for s in servers if s != server]
                if not servers:
                    return _fail(f"{server}: {e}", EXIT_NO_SECRET)
                print(f"mandos-client: {server}: {e}; asking the other servers",
                      file=sys.stderr)
                continue
            except GpgError as e:
                return _fail(e, EXIT_KEYS)
            break
        if stop.is_set():
            secret.wipe()
            return EXIT_NO_SECRET
        with secret:
            sys.stdout.buffer.write(secret.reveal())
            sys.stdout.buffer.flush()
        return EXIT_OK
    finally:
        decryptor.close()


if __name__ == "__main__":
    sys.exit(main())
