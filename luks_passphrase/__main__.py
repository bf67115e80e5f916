"""``luks-passphrase``: change a LUKS passphrase safely, recover with an escrowed backup.

The one boundary of the tool: typed errors from the core become a one-line
message and an exit code (tracebacks only with ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mandos_core import escrow_packet
from mandos_core import log as plog
from mandos_core.hardening import disable_core_dumps
from mandos_core.run import CommandError
from mandos_core.secret import Secret

from . import dialogue, pkexec
from .backend import open_volume
from .flows import FlowError, Outcome, RecoveryNotConfirmed, Refused, Tool
from .libcryptsetup import LuksError, NotLuks, WrongPassphrase
from .messages import plain
from .prompt import InputError, Interrupted, Mismatch, Prompter
from .state import DEFAULT_STATE_DIR, StateError, StateStore
from .volumes import DEFAULT_CRYPTTAB, UnknownVolume, Volume, find, list_volumes

log = logging.getLogger("luks_passphrase")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_WRONG_PASSPHRASE = 3
EXIT_REFUSED = 4
EXIT_NOT_CONFIRMED = 5
EXIT_RECOVERY = 6
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Change the passphrase of a LUKS volume safely, and recover a forgotten one
with a backup passphrase that the helpdesk reads from escrow.

  change   prompts for the current passphrase and learns its key slot.
           Your own passphrase: asks for the new one twice, adds it to a free
           slot, checks that it opens, then removes the old slot.
           The backup passphrase (recovery): clears every slot but the backup
           slot, sets your new passphrase, makes a new random backup
           passphrase in another slot and queues its escrow packet; the used
           backup passphrase is removed only after sync has the escrow
           server's confirmation.
           The new backup passphrase, while pending: refused.
  sync     sends queued escrow packets to the escrow server (over TLS with
           this machine's Mandos key) and, once the server confirms, removes
           the old backup passphrase.
  import   records which slot holds the backup passphrase, from the escrow
           packets the installer left (volume_key format 3).
  resume   finishes or rolls back an operation that was interrupted.
  status   shows the volumes, their key slots and what the tool knows.
  gui      a small window for change.
"""

EPILOG = f"""\
passphrases:
  On a terminal the tool prompts without echo.  Otherwise it reads them
  from standard input, one per line, in the order of the prompts:
  change reads the current passphrase, then the new one twice.
  Passphrases never appear in arguments, logs or files; only the escrow
  packet holds the backup passphrase, encrypted to the escrow certificate.

safety:
  A slot is never overwritten; the last working slot is never removed; the
  LUKS header is backed up to STATE_DIR/header-backups before a multi-step
  change (and removed when it is complete); every step is journaled, and
  the next run on the volume finishes or rolls back an interrupted one.

pkexec:
  Started through pkexec (the GUI's polkit action), the tool accepts only
  "change [--recovery] VOLUME", VOLUME from /etc/crypttab or an active
  dm-crypt mapping, no other option; the state directory must be root's
  alone (mode 0700).

exit status:
  {EXIT_OK} success, {EXIT_ERROR} error, {EXIT_USAGE} usage,
  {EXIT_WRONG_PASSPHRASE} wrong passphrase, {EXIT_REFUSED} refused (nothing changed),
  {EXIT_NOT_CONFIRMED} sync: a packet was not confirmed by any escrow server,
  {EXIT_RECOVERY} change: the backup passphrase was given without --recovery and
    without a terminal to confirm the recovery on (nothing changed),
  {EXIT_INTERRUPTED} interrupted (Ctrl-C).

files:
  {DEFAULT_STATE_DIR}/UUID.json       state per volume (0600, directory 0700)
  {DEFAULT_STATE_DIR}/escrow-cert.pem the escrow certificate (RSA, X.509)
  {DEFAULT_STATE_DIR}/escrow-servers  escrow servers, HOST:PORT one per line
  /etc/keys/mandos/tls-*.pem          this machine's Mandos TLS key (sync)

See docs/passphrase-tool.md.
"""


_RAW = argparse.RawDescriptionHelpFormatter
_SUB = {
    "change": """\
Prompt for the current passphrase of VOLUME and learn which key slot it opens.
  your own passphrase  ask for the new one twice, add it to a free slot, check
                       that it opens, remove the old slot;
  the backup one       recovery: remove every other slot and any pending backup,
                       set the new passphrase, make a new random backup
                       passphrase in another slot, queue its escrow packet
                       (the used backup slot goes after sync);
  the pending backup   refused (exit status 4).
On a terminal: three tries for the current passphrase; the new one is checked
(length, strength) before it is asked again; a recovery is said and confirmed
first.  Without a terminal, reads the current passphrase, then the new one
twice, one per line from stdin, and refuses a recovery (exit status 6,
nothing changed) unless --recovery confirms it in advance.""",
    "resume": """\
Finish or roll back an operation a previous run left unfinished (any command
does this first).  If a new backup passphrase still has to be made, asks for
your passphrase (one line on stdin without a terminal).""",
    "status": "Show each volume's LUKS type, active key slots, current and pending backup\n"
              "slot, whether an escrow packet is queued, and unfinished work.",
    "import": """\
Read volume_key escrow packets (format 3, asymmetric_wrap_secret_only, the
default of "volume_key --save -c CERT --create-random-passphrase") and record
the key slot they name as the volume's current backup slot.  The volume is
found by the packet's UUID (crypttab, dmsetup, /dev/disk/by-uuid, the packet's
path) unless --volume names it.""",
    "sync": """\
Send every queued escrow packet to the escrow server (mandosd; "escrow 1" over
TLS 1.3, identified by this machine's Mandos TLS key).  For each packet the
server confirms by SHA-256, destroy the old backup slot and make the pending
one current.  Unconfirmed packets stay queued (exit status 5).""",
    "gui": """\
A small window for change.  As root it runs the core itself; as a user it
runs "pkexec luks-passphrase change VOLUME" (see docs/passphrase-tool.md for the
polkit action).""",
}


class _Parser(argparse.ArgumentParser):
    """The command line; started by pkexec, only ``change VOLUME`` (see :mod:`.pkexec`).

    The check runs on the raw arguments, before argparse (which would accept
    abbreviations such as ``--state`` and act on ``--help``), and sets
    ``args.pkexec``, which makes the state directory strict and the volume one
    the machine lists.
    """

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        restricted = pkexec.started_by_pkexec(os.environ, os.getuid(), os.geteuid())
        if restricted:
            try:
                argv = pkexec.allowed_change(argv)
            except pkexec.NotAllowed as e:
                self.exit(EXIT_USAGE, f"luks-passphrase: {e}\n")
        ns = super().parse_args(argv, namespace)
        ns.pkexec = restricted
        return ns


def _version() -> str:
    """This project's version: one place, ``mandos_core.__version__`` (setup.cfg reads it)."""
    from mandos_core import __version__

    return __version__


def _global_options(p: argparse.ArgumentParser, after_command: bool) -> None:
    """The options every command takes, before the command or after it.

    After the command their defaults are SUPPRESS, so that a value given
    before the command is not overwritten by the subcommand's default.
    """
    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    p.add_argument("--state-dir", "--statedir", dest="state_dir", type=Path,
                   default=default(DEFAULT_STATE_DIR), metavar="DIR",
                   help=f"root-only state directory (default {DEFAULT_STATE_DIR}); "
                        "--statedir is the same option, spelt as in mandosd and mandos-ctl")
    p.add_argument("--crypttab", type=Path, default=default(DEFAULT_CRYPTTAB), metavar="FILE",
                   help=f"crypttab to list volumes from (default {DEFAULT_CRYPTTAB})")
    p.add_argument("--dmsetup-table", type=Path, default=default(None), metavar="FILE",
                   help="read the output of 'dmsetup table' from FILE instead of running "
                        "dmsetup")
    p.add_argument("--certificate", type=Path, default=default(None), metavar="PEM",
                   help="escrow certificate (default STATE_DIR/escrow-cert.pem)")
    p.add_argument("--keep-header-backups", action="store_true", default=default(False),
                   help="keep header backups after success (they still open with the old "
                        "passphrases)")
    p.add_argument("--debug", action="store_true", default=default(False),
                   help="log lines on the terminal too (they always go to the journal), "
                        "tracebacks")


_VOLUME_HELP = "crypttab name, UUID=..., device or image path (default: the only volume)"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="luks-passphrase", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version",
                   version=f"luks-passphrase (mandos-nbde) {_version()}")
    _global_options(p, after_command=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="what to do (COMMAND --help tells more)")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=summary, description=_SUB[name], formatter_class=_RAW)
        _global_options(c, after_command=True)
        return c

    c = command("change", "change your passphrase, or recover with the backup one")
    c.add_argument("volume", nargs="?", metavar="VOLUME", help=_VOLUME_HELP)
    c.add_argument("--recovery", action="store_true",
                   help="confirm in advance that the current passphrase may be the backup "
                   "one, and a recovery may run (on a terminal the question is then not "
                   "asked; the warning is still shown)")
    r = command("resume", "finish an interrupted operation")
    r.add_argument("volume", nargs="?", metavar="VOLUME", help=_VOLUME_HELP)
    s = command("status", "volumes, key slots, backup slots, queue")
    s.add_argument("volume", nargs="?", metavar="VOLUME",
                   help="crypttab name, UUID=..., device or image path (default: every volume "
                        "in crypttab and dmsetup)")
    i = command("import", "learn the backup slot from volume_key packets")
    i.add_argument("packets", nargs="*", metavar="PACKET",
                   help=f"volume_key packets (default: {INSTALLER_PACKETS})")
    i.add_argument("--volume", metavar="VOLUME",
                   help="the volume (default: found by the packet's UUID or path)")
    y = command("sync", "send queued escrow packets, finish on confirmation")
    y.add_argument("--server", action="append", default=[], metavar="HOST:PORT",
                   help="escrow (mandosd) server; repeat for several "
                        "(default: STATE_DIR/escrow-servers)")
    y.add_argument("--keydir", type=Path, default=Path("/etc/keys/mandos"), metavar="DIR",
                   help="this machine's Mandos TLS key (default /etc/keys/mandos)")
    g = command("gui", "a small window for change")
    g.add_argument("volume", nargs="?", metavar="VOLUME", help=_VOLUME_HELP)
    return p


#: Where installers (anaconda) leave their escrow packets.
INSTALLER_PACKETS = "/root/*-escrow-backup-passphrase"
class Context:
    def __init__(self, args: argparse.Namespace, prompter: Prompter) -> None:
        self.args = args
        self.prompter = prompter
        self.pkexec: bool = args.pkexec
        self.store = StateStore(args.state_dir, strict=self.pkexec)
        if self.pkexec:
            self.store.ensure()  # refuse a state directory that is not root's alone, first
        cert_path = args.certificate or args.state_dir / "escrow-cert.pem"
        try:
            cert = cert_path.read_bytes()
        except (FileNotFoundError, PermissionError) as e:
            # the default lives in the root-only state directory: a user's GUI has no access
            if args.certificate:
                raise StateError(f"{cert_path}: {e.strerror}") from None
            cert = None
        except OSError as e:
            raise StateError(f"{cert_path}: {e.strerror}") from None
        self.tool = Tool(self.store, certificate=cert,
                         keep_header_backups=args.keep_header_backups,
                         progress=prompter.say)

    def volumes(self) -> list[Volume]:
        return list_volumes(self.args.crypttab, self.args.dmsetup_table)

    def volume(self, arg: str | None) -> Volume:
        vols = self.volumes()
        if arg:
            vol = find(arg, vols)
            if self.pkexec and vol.source == "path":
                raise UnknownVolume(f"{pkexec.shown(arg)}: not a volume of this machine; under "
                                    f"pkexec only volumes in {DEFAULT_CRYPTTAB} or active "
                                    "dm-crypt mappings can be changed")
            return vol
        if not vols:
            raise UnknownVolume(_NO_VOLUMES.format(crypttab=self.args.crypttab,
                                                   command=self.args.command))
        if len(vols) == 1:
            return vols[0]
        if not (self.prompter.interactive and sys.stdin.isatty()):
            raise UnknownVolume("several encrypted volumes: name one ("
                                + ", ".join(v.name for v in vols) + ")")
        return vols[self.prompter.choose("Which volume?", [str(v) for v in vols])]


_NO_VOLUMES = ("no encrypted volumes in {crypttab} or among the active dm-crypt mappings; "
               "name the encrypted partition: luks-passphrase {command} /dev/DEVICE")


def cmd_change(ctx: Context) -> Outcome:
    vol = ctx.volume(ctx.args.volume)
    p = ctx.prompter
    recovery = bool(ctx.args.recovery)
    if not p.interactive:  # scripted: three lines, the flow checks them
        current = p.ask(f"Current passphrase for {vol}: ")
        get_new: Callable[[], Secret] = p.ask_new
    else:  # a recovery is said and confirmed on the terminal
        current, role = dialogue.ask_current(p, ctx.store, vol)
        get_new = dialogue.new_passphrase(p, role, current, confirmed=recovery)
        recovery = True
    try:
        out = ctx.tool.change(vol.device, current, get_new, recovery=recovery)
    finally:
        current.wipe()
    return Outcome(out.kind, plain(out), out.header_backup)


def cmd_resume(ctx: Context) -> Outcome:
    vol = ctx.volume(ctx.args.volume)
    unlock = None
    if ctx.tool.needs_passphrase_to_resume(vol.device):
        unlock = ctx.prompter.ask(f"Passphrase for {vol} (to finish the backup passphrase): ")
    return ctx.tool.resume(vol.device, unlock)


def cmd_status(ctx: Context) -> Outcome:
    vols = [ctx.volume(ctx.args.volume)] if ctx.args.volume else ctx.volumes()
    if not vols:
        raise UnknownVolume(_NO_VOLUMES.format(crypttab=ctx.args.crypttab, command="status"))
    unreadable = []
    for v in vols:
        try:
            with open_volume(v.device) as lv:
                st = ctx.store.load(lv.uuid)
                print(f"{v}: {lv.type} UUID={lv.uuid} active slots {lv.active_slots()} "
                      f"of {lv.keyslot_max}")
        except NotLuks:
            unreadable.append(f"{v}: not a LUKS volume; name the encrypted partition itself "
                              "(the one 'cryptsetup isLuks' accepts), not the opened "
                              "/dev/mapper device")
            continue
        except LuksError as e:
            unreadable.append(f"{v}: {e}")
            continue
        cur, pend = st.current_backup, st.pending_backup
        print(f"  current backup slot: {cur.slot if cur else '-'}"
              f"  pending backup slot: {pend.slot if pend else '-'}"
              f"  queued packet: {'yes' if st.queue else 'no'}"
              + ("  backup passphrase needed" if st.backup_needed else "")
              + (f"  INTERRUPTED: {st.journal.get('op')}" if st.journal else ""))
    if unreadable:
        sys.stdout.flush()
        raise FlowError("\nluks-passphrase: ".join(unreadable))
    return Outcome("nothing", "")


def cmd_import(ctx: Context) -> Outcome:
    import glob

    messages = []
    names = ctx.args.packets or sorted(glob.glob(INSTALLER_PACKETS))
    if not names:
        raise FlowError(f"no packets given and none found as {INSTALLER_PACKETS}")
    for name in names:
        try:
            data = Path(name).read_bytes()
        except OSError as e:
            raise FlowError(f"{name}: {e.strerror}") from None
        try:
            pkt = escrow_packet.parse(data)
        except escrow_packet.PacketError as e:
            raise FlowError(f"{name}: {e}") from None
        meta = pkt.metadata
        if ctx.args.volume:
            vol = ctx.volume(ctx.args.volume)
        else:
            vol = _volume_for_uuid(ctx, meta.volume_uuid, meta.volume_path)
        messages.append(ctx.tool.import_packet(vol.device, pkt).message)
    return Outcome("imported", "\n".join(messages))


def _volume_for_uuid(ctx: Context, uuid: str, path_hint: str) -> Volume:
    candidates = ctx.volumes()
    by_uuid = f"/dev/disk/by-uuid/{uuid}"
    if os.path.exists(by_uuid):
        candidates.append(Volume(uuid, by_uuid, "path"))
    if path_hint and os.path.exists(path_hint):
        candidates.append(Volume(path_hint, path_hint, "path"))
    for v in candidates:
        try:
            with open_volume(v.device) as lv:
                if lv.uuid.lower() == uuid.lower():
                    return v
        except LuksError:
            continue
    raise UnknownVolume(f"no volume with UUID {uuid} here (name it with --volume)")


def cmd_sync(ctx: Context) -> Outcome:
    from mandos_core.address import parse_server
    from mandos_core.keyfiles import KeyFiles, read_pins, server_context
    from mandos_core.protocol import KeyIdError, normalize_key_id

    from .transport import Ack, TransportError, send

    servers_text = ctx.args.server
    extra_pins: set[str] = set()
    if not servers_text:
        f = ctx.args.state_dir / "escrow-servers"
        try:
            lines = [ln.split("#", 1)[0].split() for ln in f.read_text().splitlines()]
        except OSError:
            lines = []
        servers_text = [ln[0] for ln in lines if ln]
        for ln in lines:  # "HOST:PORT [KEY_ID]": the server's pinned identity
            if len(ln) > 1:
                try:
                    extra_pins.add(normalize_key_id(ln[1]))
                except KeyIdError as e:
                    raise FlowError(f"{f}: {ln[0]}: {e}") from None
    if not servers_text:
        raise FlowError("no escrow server: give --server HOST:PORT or list them in "
                        f"{ctx.args.state_dir / 'escrow-servers'}")
    try:
        servers = [parse_server(s) for s in servers_text]
    except ValueError as e:
        raise FlowError(str(e)) from None
    queued = []
    for uuid in ctx.store.uuids():
        st = ctx.store.load(uuid)
        if st.queue is not None:
            queued.append((uuid, st.queue))
    if not queued:
        return Outcome("nothing", "Nothing queued for escrow.")
    from mandos_core.keyfiles import KeyError_

    try:
        keydir = ctx.args.keydir
        pins = read_pins(keydir) | extra_pins
        tls = server_context(KeyFiles.from_dir(keydir), pins=frozenset(pins))
    except KeyError_ as e:
        raise FlowError(str(e)) from None
    acks: dict[str, Ack] = {}
    proved = False
    errors = []
    for server in servers:
        try:
            acks, proved = send(server, tls, queued)
            break
        except TransportError as e:
            errors.append(str(e))
    else:
        raise FlowError("; ".join(errors))
    messages = []
    unconfirmed = 0
    for uuid, q in queued:
        ack = acks.get(uuid)
        if ack is not None and ack.sha256 == q.sha256 and not proved:
            unconfirmed += 1
            messages.append(
                f"{uuid}: stored on the escrow server, but its identity is not pinned, so the "
                "old backup passphrase is kept (an unauthenticated acknowledgement could come "
                "from a fake server).  Pin the key server: on it run `mandos-ctl identity`, "
                f"then `mandos-keygen --dir {keydir} --pin KEY_ID` here, and sync again.")
            continue
        if ack is None or ack.sha256 != q.sha256:
            unconfirmed += 1
            messages.append(f"{uuid}: the escrow server did not confirm the queued packet; "
                            "kept queued")
            continue
        meta = escrow_packet.parse(q.packet).metadata
        vol = _volume_for_uuid(ctx, uuid, meta.volume_path)
        messages.append(f"{uuid}: " + ctx.tool.promote(vol.device, ack.sha256).message)
    if unconfirmed:
        raise _NotConfirmed("\n".join(messages))
    return Outcome("promoted", "\n".join(messages))


class _NotConfirmed(Exception):
    pass


def cmd_gui(ctx: Context) -> Outcome:
    from .gui import run_gui

    run_gui(ctx.tool, ctx.volumes(), ctx.args.volume)
    return Outcome("nothing", "")


COMMANDS = {"change": cmd_change, "resume": cmd_resume, "status": cmd_status,
            "import": cmd_import, "sync": cmd_sync, "gui": cmd_gui}


def _setup_logging(debug: bool) -> None:
    """Log lines go to the journal, and to the terminal only with --debug.

    Without a journal (a container, a rescue shell), warnings and errors still
    reach standard error; the rest is dropped rather than printed between the
    prompts.
    """
    plog.setup("luks-passphrase", debug)  # the level (SYSTEMD_LOG_LEVEL, --debug)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    journal: logging.Handler | None = plog.JournalHandler("luks-passphrase")
    assert isinstance(journal, plog.JournalHandler)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(journal.path)
    except OSError:
        journal.close()
        journal = None
    finally:
        probe.close()
    if journal is not None:
        root.addHandler(journal)
    if debug or journal is None:
        terminal = logging.StreamHandler(sys.stderr)
        terminal.setFormatter(plog.StderrFormatter())
        if not debug:
            terminal.setLevel(logging.WARNING)
        root.addHandler(terminal)


def main(argv: Sequence[str] | None = None, prompter: Prompter | None = None) -> int:
    disable_core_dumps()  # first: no core file may hold a key
    args = _parser().parse_args(argv)
    _setup_logging(args.debug)
    os.umask(0o077)
    try:
        ctx = Context(args, prompter or Prompter())
        outcome = COMMANDS[args.command](ctx)
    except WrongPassphrase as e:
        return _fail(args, e, EXIT_WRONG_PASSPHRASE)
    except RecoveryNotConfirmed as e:
        return _fail(args, e, EXIT_RECOVERY)
    except (Refused, Mismatch) as e:
        return _fail(args, e, EXIT_REFUSED)
    except _NotConfirmed as e:
        return _fail(args, e, EXIT_NOT_CONFIRMED)
    except Interrupted as e:
        return _fail(args, e, EXIT_INTERRUPTED)
    except (LuksError, FlowError, StateError, UnknownVolume, InputError, CommandError,
            escrow_packet.PacketError) as e:
        return _fail(args, e, EXIT_ERROR)
    except KeyboardInterrupt:  # (at a prompt it is Interrupted, and the line was ended)
        print("luks-passphrase: interrupted; run 'luks-passphrase resume' if a change was under "
              "way", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.message:
        print(outcome.message)
    return EXIT_OK


def _fail(args: argparse.Namespace, e: Exception, code: int) -> int:
    if args.debug:
        log.debug("traceback", exc_info=e)
    print(f"luks-passphrase: {e}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
