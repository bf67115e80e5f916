"""``mandos-ctl``: Mandos's control program, acting on the state store.

Same options and meanings as Mandos 1.8's ``mandos-ctl``; instead of D-Bus it
opens the server's SQLite state store, which ``mandosd`` reads on every
request, so a change takes effect for the next request whether or not the
socket-activated server is running, and an approve/deny reaches a request
that is waiting right now.  Every change is audited (journald when present).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mandos_core import log as logsetup
from mandos_core.cli import add_version, unreachable
from mandos_core.durations import DurationError, parse_duration
from mandos_core.text import printable

from . import added, policy
from . import config as configmod
from .audit import Kind, audit
from .config import Client
from .state import ClientState, SQLiteStore, StateError, StateStore, known_clients

log = logging.getLogger("mandos-ctl")


class CtlError(Exception):
    """A user-facing failure: one line, exit status 1."""


# -- options (Mandos's, in Mandos's order) ----------------------------------

@dataclass(frozen=True)
class Action:
    kind: str
    value: Any = None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except DurationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _const(p: argparse._ActionsContainer, *flags: str, kind: str, help: str) -> None:
    p.add_argument(*flags, dest="actions", action="append_const", const=Action(kind),
                   default=[], help=help)


def _valued(p: argparse._ActionsContainer, *flags: str, kind: str, metavar: str,
            conv: Callable[[str], Any], help: str) -> None:
    p.add_argument(*flags, dest="actions", action="append", metavar=metavar, default=[],
                   type=lambda v: Action(kind, conv(v)), help=help)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mandos-ctl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Control the Mandos key server's clients: list them, enable or "
        "disable them, change their settings, approve or deny a waiting request.\n"
        "Acts on the state store that mandosd reads on every request, so changes take "
        "effect for the next request, whether or not the server is running.",
        epilog="""\
With no action, prints a table of the named clients (all if none are named):
Name, Enabled, Timeout, Last Successful Check (local time with its zone, and how
long ago), and Approval Is Pending when a request waits for --approve/--deny.
--verbose prints every field: one per line on a terminal, else one wide table
row per client.  --dump-json is for scripts: its fields and formats stay as
Mandos's D-Bus properties (UTC timestamps, durations in milliseconds).

A pool of servers sharing PostgreSQL (--state-url, or state_url= in mandos.conf):
  mandos-ctl log [CLIENT]             the pool's audit table: who got what, when, where
  mandos-ctl migrate-state --state-url URL   copy STATEDIR/clients.sqlite into it

Escrowed backup passphrases (sent by luks-passphrase sync):
  mandos-ctl escrow list [--history]  packets stored, per machine and volume
  mandos-ctl escrow export CLIENT UUID > packet
  mandos-ctl escrow secrets PACKET --key escrow-key.pem

Examples (as in Mandos):
  mandos-ctl                          list all clients
  mandos-ctl --verbose web1 web2      every field of two clients
  mandos-ctl --enable --all           enable every client
  mandos-ctl --timeout=PT5M --interval=PT1M web1
  mandos-ctl --approve --all          approve every waiting request
  mandos-keygen --password | mandos-ctl --add -
                                      add the printed client section

TIME is ISO 8601 (PT5M, P1DT2H) or Mandos's old form (5m, 1h30m).

Settings changed here override clients.conf until changed again, here or in
clients.conf (a value changed in the file wins); they are kept in
STATEDIR/clients.sqlite.  --remove of a client that clients.conf defines hides it
(requests are refused as unknown) until its section is removed from clients.conf
and added again; it then comes back disabled.  --add takes only key_id,
fingerprint, host and secret (an encrypted OpenPGP message) from the section; the
rest comes from clients.conf [DEFAULT].

Every change is one journal entry (MESSAGE_ID per kind, MANDOS_CLIENT=,
MANDOS_ADMIN=); see "journalctl -x MANDOS_OUTCOME=admin-changed".

Exit status: 0 success (with --is-enabled: the client is enabled); 1 the client
is disabled (--is-enabled), a client was not found, or the state could not be
changed; 2 usage error.""")
    add_version(p)
    p.add_argument("-a", "--all", action="store_true", help="select all clients")
    p.add_argument("-v", "--verbose", action="store_true", help="print all fields")
    _const(p, "-j", "--dump-json", kind="json", help="dump client data in JSON format")
    g = p.add_mutually_exclusive_group()
    _const(g, "-e", "--enable", kind="enable", help="enable client (and restart its "
           "timeout and checker)")
    _const(g, "-d", "--disable", kind="disable", help="disable client: its requests are "
           "refused until enabled")
    _const(p, "-b", "--bump-timeout", kind="bump", help="bump timeout for client, as if "
           "its checker had just succeeded")
    g = p.add_mutually_exclusive_group()
    _const(g, "--start-checker", kind="start-checker", help="run the client's checker "
           "now (waits for it, at most its interval) and record the result")
    _const(g, "--stop-checker", kind="stop-checker", help="stop a running checker for "
           "client (its result is discarded) and postpone the next one by an interval")
    _const(p, "-V", "--is-enabled", kind="is-enabled", help="check if client is enabled "
           "(exit status 0 if so, 1 if not)")
    _const(p, "-r", "--remove", kind="remove", help="remove client")
    _valued(p, "-c", "--checker", kind="checker", metavar="COMMAND", conv=str,
            help="set checker command for client (split into words like a shell would, "
            "%%(host)s etc. substituted per word, never run through a shell)")
    _valued(p, "-t", "--timeout", kind="timeout", metavar="TIME", conv=_duration,
            help="set timeout for client")
    _valued(p, "--extended-timeout", kind="extended_timeout", metavar="TIME",
            conv=_duration, help="set extended timeout for client")
    _valued(p, "-i", "--interval", kind="interval", metavar="TIME", conv=_duration,
            help="set checker interval for client")
    g = p.add_mutually_exclusive_group()
    _const(g, "--approve-by-default", kind="approve-by-default",
           help="set client to be approved by default")
    _const(g, "--deny-by-default", kind="deny-by-default",
           help="set client to be denied by default")
    _valued(p, "--approval-delay", kind="approval_delay", metavar="TIME", conv=_duration,
            help="set delay before client approve/deny")
    _valued(p, "--approval-duration", kind="approval_duration", metavar="TIME",
            conv=_duration, help="set duration of one client approval")
    _valued(p, "-H", "--host", kind="host", metavar="STRING", conv=str,
            help="set host for client")
    _valued(p, "-s", "--secret", kind="secret", metavar="FILENAME", conv=str,
            help="set password blob (file) for client: the encrypted OpenPGP message")
    g = p.add_mutually_exclusive_group()
    _const(g, "-A", "--approve", kind="approve", help="approve any current client "
           "request (and the next ones for approval_duration)")
    _const(g, "-D", "--deny", kind="deny", help="deny any current client request (and "
           "the next ones for approval_duration)")
    p.add_argument("--add", metavar="FILE", help="add a client from a clients.conf section "
                   "(what mandos-keygen --password prints); - reads standard input")
    p.add_argument("--configdir", "--config-dir", type=Path, default=None, metavar="DIR",
                   help=f"directory with mandos.conf and clients.conf (default: "
                   f"{configmod.DEFAULT_CONFIGDIR})")
    p.add_argument("--statedir", "--state-dir", type=Path, default=None, metavar="DIR",
                   help="state directory (default: as mandosd: $STATE_DIRECTORY, else "
                   f"statedir= from mandos.conf, else {configmod.DEFAULT_STATEDIR})")
    p.add_argument("--state-url", metavar="URL", default=None,
                   help="a pool's PostgreSQL database (as mandosd --state-url; default: "
                   "state_url= from mandos.conf, else SQLite in the state directory)")
    p.add_argument("--debug", action="store_true", help="verbose logs")
    p.add_argument("client", nargs="*", help="client name")
    return p


CHANGING = {"enable", "disable", "bump", "start-checker", "stop-checker", "is-enabled",
            "remove", "checker", "timeout", "extended_timeout", "interval",
            "approve-by-default", "deny-by-default", "approval_delay", "approval_duration",
            "host", "secret", "approve", "deny"}


def check_syntax(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Mandos's rules that argparse cannot express."""
    kinds = [a.kind for a in args.actions]
    changing = [k for k in kinds if k in CHANGING]
    if args.add is not None:
        if kinds or args.client or args.all or args.verbose:
            p.error("--add can only be used alone")
        return
    if changing and not (args.client or args.all):
        p.error("Options require clients names or --all.")
    if args.verbose and changing:
        p.error("--verbose can only be used alone.")
    if "json" in kinds and (args.verbose or len(kinds) > 1):
        p.error("--dump-json can only be used alone.")
    if args.all and not changing:
        p.error("--all requires an action.")
    if "is-enabled" in kinds and len(args.client) != 1:
        p.error("--is-enabled requires exactly one client")
    if "remove" in kinds and len(kinds) > 1 and set(kinds) - {"remove", "deny"}:
        p.error("--remove can only be combined with --deny")


# -- what mandos-ctl shows ----------------------------------------------------

ALL_KEYWORDS = ("Name", "Enabled", "Timeout", "LastCheckedOK", "Created", "Interval",
                "Host", "KeyID", "Fingerprint", "CheckerRunning", "LastEnabled",
                "ApprovalPending", "ApprovedByDefault", "LastApprovalRequest",
                "ApprovalDelay", "ApprovalDuration", "Checker", "ExtendedTimeout",
                "Expires", "LastCheckerStatus")
DEFAULT_KEYWORDS = ("Name", "Enabled", "Timeout", "LastCheckedOK")
HEADERS = {
    "Name": "Name", "Enabled": "Enabled", "Timeout": "Timeout",
    "LastCheckedOK": "Last Successful Check", "LastApprovalRequest": "Last Approval Request",
    "Created": "Created", "Interval": "Interval", "Host": "Host",
    "Fingerprint": "Fingerprint", "KeyID": "Key ID", "CheckerRunning": "Check Is Running",
    "LastEnabled": "Last Enabled", "ApprovalPending": "Approval Is Pending",
    "ApprovedByDefault": "Approved By Default", "ApprovalDelay": "Approval Delay",
    "ApprovalDuration": "Approval Duration", "Checker": "Checker",
    "ExtendedTimeout": "Extended Timeout", "Expires": "Expires",
    "LastCheckerStatus": "Last Checker Status",
}
DURATIONS = {"Timeout", "Interval", "ApprovalDelay", "ApprovalDuration", "ExtendedTimeout"}


def _when(t: float | None) -> str:
    """Mandos's D-Bus timestamps: UTC, ISO 8601, empty when never."""
    if t is None:
        return ""
    return (datetime.datetime.fromtimestamp(t, datetime.UTC).replace(tzinfo=None)
            .isoformat(timespec="milliseconds"))


def properties(c: Client, st: ClientState, now: float) -> dict[str, Any]:
    """The client as Mandos's D-Bus properties (durations in milliseconds)."""
    running = st.checker_started is not None and now < st.checker_started + 2 * c.interval
    return {
        "Name": c.name, "Enabled": st.enabled, "Timeout": round(c.timeout * 1000),
        "LastCheckedOK": _when(st.last_checked_ok), "Created": _when(st.created),
        "Interval": round(c.interval * 1000), "Host": c.host, "KeyID": c.key_id or "",
        "Fingerprint": c.fingerprint, "CheckerRunning": running,
        "LastEnabled": _when(st.last_enabled),
        "ApprovalPending": policy.approval_pending(st, now),
        "ApprovedByDefault": c.approved_by_default,
        "LastApprovalRequest": _when(st.last_approval_request),
        "ApprovalDelay": round(c.approval_delay * 1000),
        "ApprovalDuration": round(c.approval_duration * 1000), "Checker": c.checker,
        "ExtendedTimeout": round(c.extended_timeout * 1000),
        "Expires": _when(st.deadline) if st.enabled else "",
        "LastCheckerStatus": st.last_checker_status if st.last_checker_status is not None
        else -2,
    }


def _ms_to_string(ms: int) -> str:
    td = datetime.timedelta(milliseconds=ms)
    days = f"{td.days}T" if td.days else ""
    return (f"{days}{td.seconds // 3600:02}:{(td.seconds % 3600) // 60:02}:"
            f"{td.seconds % 60:02}")


TIMES = {"LastCheckedOK", "Created", "LastEnabled", "LastApprovalRequest", "Expires"}


def ago(seconds: float) -> str:
    """A relative age: ``just now``, ``40 s ago``, ``2 min ago``, ``in 3 h``."""
    n = abs(seconds)
    if n < 1:
        return "just now"
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if n >= size:
            amount = f"{int(n // size)} {unit}"
            break
    else:
        amount = f"{int(n)} s"
    if amount == "1 days":
        amount = "1 day"
    return f"{amount} ago" if seconds >= 0 else f"in {amount}"


def human_time(iso: str, now: float) -> str:
    """One of Mandos's UTC timestamps as a person reads it: local time with its zone,
    and how long ago (``2026-12-02 05:20:13 UTC (2 min ago)``); ``never`` when empty."""
    if not iso:
        return "never"
    t = datetime.datetime.fromisoformat(iso).replace(tzinfo=datetime.UTC)
    local = t.astimezone()
    return f"{local:%Y-%m-%d %H:%M:%S} {local.tzname()} ({ago(now - t.timestamp())})"


def _cell(value: Any, key: str, now: float) -> str:
    if key == "Expires" and not value:
        return "-"  # disabled: nothing to expire (Expires is empty only then)
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if key in DURATIONS:
        return _ms_to_string(value)
    if key in TIMES:
        return human_time(value, now)
    if key == "LastCheckerStatus" and value == -2:
        return "never run"
    return printable(value)  # names and hosts may come from a section made on the client


def table(rows: Sequence[Mapping[str, Any]], keywords: tuple[str, ...], now: float) -> str:
    """Mandos's table: left-aligned columns, one space apart (no trailing spaces)."""
    widths = {k: max([len(HEADERS[k]), *(len(_cell(r[k], k, now)) for r in rows)])
              for k in keywords}
    lines = [" ".join(f"{HEADERS[k]:{widths[k]}}" for k in keywords).rstrip()]
    lines += [" ".join(f"{_cell(r[k], k, now):{widths[k]}}" for k in keywords).rstrip()
              for r in rows]
    return "\n".join(lines)


def fields(rows: Sequence[Mapping[str, Any]], keywords: tuple[str, ...], now: float) -> str:
    """``--verbose`` on a terminal: one field per line, a blank line between clients."""
    width = max(len(HEADERS[k]) for k in keywords) + 1
    blocks = ["\n".join(f"{HEADERS[k] + ':':{width}} {_cell(r[k], k, now)}".rstrip()
                        for k in keywords) for r in rows]
    return "\n\n".join(blocks)


def listing(rows: Sequence[Mapping[str, Any]], verbose: bool, now: float,
            terminal: bool) -> str:
    """What mandos-ctl prints without an action.  The default columns, plus "Approval Is
    Pending" whenever a request waits; --verbose: every field, one per line on a terminal
    (else Mandos's wide table)."""
    if verbose:
        return (fields if terminal else table)(rows, ALL_KEYWORDS, now)
    keywords: tuple[str, ...] = DEFAULT_KEYWORDS
    if any(r["ApprovalPending"] for r in rows):
        keywords += ("ApprovalPending",)
    return table(rows, keywords, now)


# -- acting on the store -------------------------------------------------------

def _admin() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


class Ctl:
    """*write*: merge clients.conf into the store first (before a change); without it
    (listings) the merge is only computed, and nothing is written."""

    def __init__(self, configdir: Path, store: StateStore, clock: Callable[[], float],
                 config: configmod.Config | None = None, *, write: bool = True) -> None:
        self.configdir = configdir
        self.store = store
        self.clock = clock
        self.write = write
        self.config = config or configmod.load(configdir)
        if write:
            self.store.sync_clients(self.config.clients.values(), clock())
        self.reload()

    def reload(self) -> None:
        states = (self.store.all() if self.write else
                  self.store.merged(self.config.clients.values(), self.clock()))
        self.states = {s.name: s for s in states if s.source not in ("removed", "gone")}
        self.clients = known_clients(self.config.clients, self.states.values(), self.configdir,
                                     self.config.defaults)

    def effective(self, name: str) -> Client:
        return policy.effective(self.clients[name], self.states[name])

    def select(self, names: list[str]) -> list[str]:
        known = [n for n in self.states if n in self.clients]
        if not names:
            return known
        for n in names:
            if n not in known:
                raise CtlError(f"Client not found on server: {n!r}")
        return list(dict.fromkeys(names))

    def _audit(self, kind: Kind, name: str, message: str, **fields: Any) -> None:
        st = self.states.get(name)
        audit(kind, message, client=name, key_id=st.key_id if st else None,
              admin=_admin(), **fields)

    def _override(self, name: str, key: str, value: Any) -> None:
        over = dict(self.states[name].overrides)
        over[key] = value
        self.store.update(name, overrides=over)

    def run(self, action: Action, names: list[str]) -> int | None:
        now = self.clock()
        kind = action.kind
        for name in names:
            st, c = self.states[name], self.effective(name)
            if kind == "enable":
                self.store.update(name, enabled=True, last_enabled=now,
                                  deadline=now + c.timeout, next_check=now)
                self._audit(Kind.ADMIN_ENABLED, name, f"{name} enabled by {_admin()}")
            elif kind == "disable":
                self.store.update(name, enabled=False)
                self._audit(Kind.ADMIN_DISABLED, name, f"{name} disabled by {_admin()}")
            elif kind == "bump":
                if st.enabled:
                    self.store.update(name, last_checked_ok=now, deadline=now + c.timeout)
                self._audit(Kind.ADMIN_CHANGED, name, f"{name}: timeout bumped by "
                            f"{_admin()}", change="bump-timeout")
            elif kind == "stop-checker":
                self.store.update(name, checker_stop_requested=now,
                                  next_check=now + c.interval)
                self._audit(Kind.ADMIN_CHANGED, name, f"{name}: checker stopped by "
                            f"{_admin()}", change="stop-checker")
            elif kind == "approve":
                self.store.update(name, approval_decision="approve", approval_decided_at=now,
                                  approved_until=now + c.approval_duration)
                self._audit(Kind.APPROVAL_GIVEN, name, f"{name}: approved by {_admin()}",
                            pending=policy.approval_pending(st, now))
            elif kind == "deny":
                self.store.update(name, approval_decision="deny", approval_decided_at=now,
                                  approved_until=None)
                self._audit(Kind.APPROVAL_DENIED, name, f"{name}: denied by {_admin()}",
                            pending=policy.approval_pending(st, now))
            elif kind == "remove":
                if st.source == "ctl":
                    self.store.remove(name)
                else:  # back with its clients.conf section only when that is re-added
                    self.store.update(name, source="removed", enabled=False)
                self._audit(Kind.ADMIN_CHANGED, name, f"{name} removed by {_admin()}",
                            change="remove")
            elif kind in ("approve-by-default", "deny-by-default"):
                value = kind == "approve-by-default"
                self._override(name, "approved_by_default", value)
                self._audit(Kind.ADMIN_CHANGED, name, f"{name}: approved_by_default="
                            f"{value} by {_admin()}", change="approved_by_default",
                            value=value)
            elif kind == "secret":
                self._set_secret(name, action.value)
            elif kind in policy.OVERRIDABLE:
                self._set(name, st, c, kind, action.value, now)
            self.states = {s.name: s for s in self.store.all() if s.source != "removed"}
        return None

    def _set(self, name: str, st: ClientState, c: Client, key: str, value: Any,
             now: float) -> None:
        self._override(name, key, value)
        if key == "timeout" and st.enabled and st.deadline is not None:
            # Mandos: the deadline moves by the change; if that puts it in the past,
            # the client is disabled now
            deadline = st.deadline + value - c.timeout
            if deadline <= now:
                self.store.update(name, deadline=deadline, enabled=False)
                self._audit(Kind.CLIENT_TIMED_OUT, name, f"{name}: new timeout has passed; "
                            "client disabled", reason="timeout shortened")
            else:
                self.store.update(name, deadline=deadline)
        if key == "interval" and st.next_check is not None and st.next_check > now + value:
            self.store.update(name, next_check=now + value)
        self._audit(Kind.ADMIN_CHANGED, name, f"{name}: {key} set by {_admin()}",
                    change=key, value=value)

    def _set_secret(self, name: str, path: str) -> None:
        try:
            data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        except OSError as e:
            raise CtlError(f"{path}: {e.strerror}") from None
        if not data:
            raise CtlError(f"{path}: empty")
        added.check_encrypted(data, f"{path}")
        self._override(name, "secret", base64.b64encode(data).decode())
        # never the value: only its size
        self._audit(Kind.ADMIN_CHANGED, name, f"{name}: secret replaced by {_admin()}",
                    change="secret", size=len(data))

    def add(self, source: str) -> str:
        """Add a client from a section made on the client (``mandos-keygen --password``).

        Only key_id, fingerprint, host and secret (an encrypted OpenPGP message) are
        taken from it; the rest is the admin's, from clients.conf [DEFAULT].
        """
        label = "standard input" if source == "-" else source
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text()
        except OSError as e:
            raise CtlError(f"{source}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise CtlError(f"{label}: not UTF-8 text") from None
        name, values = added.parse(text, self.config.defaults, label)
        section = added.canonical(name, values)
        c = added.client(section, self.config.defaults, label)
        if c.name in self.config.clients:
            raise CtlError(f"client {c.name} is already defined in "
                           f"{self.configdir / 'clients.conf'}")
        kept = self.store.add_client(c.name, c.key_id, section, self.clock(), c.timeout,
                                     c.enabled)
        self.reload()
        self._audit(Kind.ADMIN_CHANGED, c.name, f"{c.name} added by {_admin()}",
                    change="add")
        if kept is not None:
            state = "enabled" if kept else "disabled"
            self._audit(Kind.CLIENT_RETURNED, c.name, f"{c.name}: its key was known before; "
                        f"its stored state is kept: {state}", enabled=kept)
        return c.name


class _Confirmation(logging.Formatter):
    """An audit entry as the person at the terminal needs it: ``mandos-ctl: web2 disabled
    by root`` (the journal keeps the entry with all its fields)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"mandos-ctl: {printable(record.getMessage())}"


def _setup_logging(debug: bool) -> None:
    """Messages to stderr; audit entries to journald whenever it is there, and a short
    confirmation on stderr (the full entry, fields and all, with --debug)."""
    logsetup.setup("mandos-ctl", debug)
    auditlog = logging.getLogger("mandosd.audit")
    sock = os.environ.get("MANDOS_JOURNAL_SOCKET") or (
        logsetup.JOURNAL_SOCKET if os.path.exists(logsetup.JOURNAL_SOCKET) else None)
    if sock:
        auditlog.addHandler(logsetup.JournalHandler("mandos-ctl", sock))
    auditlog.propagate = debug
    if not debug:
        short = logging.StreamHandler(sys.stderr)
        short.setFormatter(_Confirmation())
        auditlog.addHandler(short)


def global_options() -> argparse.ArgumentParser:
    """The options that hold for every subcommand, before or after it
    (``mandos-ctl --statedir X escrow list`` = ``mandos-ctl escrow list --statedir X``)."""
    g = argparse.ArgumentParser(prog="mandos-ctl", add_help=False, allow_abbrev=False)
    g.add_argument("--configdir", "--config-dir", type=Path, default=None, metavar="DIR",
                   help=f"directory with mandos.conf (default: {configmod.DEFAULT_CONFIGDIR})")
    g.add_argument("--statedir", "--state-dir", type=Path, default=None, metavar="DIR",
                   help="mandosd's state directory (default: as mandosd: $STATE_DIRECTORY, "
                   f"else statedir= from mandos.conf, else {configmod.DEFAULT_STATEDIR})")
    g.add_argument("--state-url", metavar="URL", default=None,
                   help="a pool's PostgreSQL database (default: state_url= from mandos.conf, "
                   "else SQLite in the state directory)")
    g.add_argument("--debug", action="store_true", help="verbose logs")
    return g


def statedir_of(configdir: Path | None, statedir: Path | None) -> Path:
    """The state directory as mandosd finds it (raises ConfigError)."""
    cfg = configmod.load_server_config(configmod.configdir_from(configdir) / "mandos.conf")
    return configmod.statedir_from(statedir, cfg)


def reachable(path: Path, *, create: bool = False) -> None:
    """A directory this user cannot enter is said so (not "no store here")."""
    problem = unreachable(path, create=create)
    if problem:
        raise CtlError(problem)


def identity_main(argv: list[str], common: argparse.Namespace) -> int:
    """``mandos-ctl identity``: print the key server's key_id, for ``mandos-keygen --pin``."""
    from . import identity

    p = argparse.ArgumentParser(
        prog="mandos-ctl identity", parents=[global_options()],
        description="Print this key server's identity (the key_id of its own TLS key) for "
        "client machines to pin with \"mandos-keygen --pin KEY_ID\".  mandosd makes the key "
        "in its state directory on first start.")
    p.parse_args(argv)
    logsetup.setup("mandos-ctl", common.debug)
    try:
        statedir = statedir_of(common.configdir, common.statedir)
        reachable(statedir / identity.PRIVATE)
        print(identity.load(statedir).key_id)
    except (identity.IdentityError, configmod.ConfigError, CtlError) as e:
        print(f"mandos-ctl: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, *, clock: Callable[[], float] = time.time) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    common, rest = global_options().parse_known_args(args_in)
    if rest[:1] == ["escrow"]:  # the escrowed backup passphrases: list / export / secrets
        from . import escrow_cli

        return escrow_cli.main(rest[1:], common)
    if rest[:1] == ["identity"]:  # the key_id client machines pin
        return identity_main(rest[1:], common)
    if rest[:1] in (["log"], ["migrate-state"]):  # a pool's audit table; SQLite -> pool
        from . import pool_cli

        again = (["--configdir", str(common.configdir)] if common.configdir else []) + (
            ["--debug"] if common.debug else [])
        if rest[0] == "migrate-state" and common.statedir:
            again += ["--statedir", str(common.statedir)]
        if common.state_url:
            again += ["--state-url", common.state_url]
        return pool_cli.main(rest[:1] + again + rest[1:])
    p = parser()
    args = p.parse_args(argv)
    if args.actions is None:
        args.actions = []
    check_syntax(p, args)
    _setup_logging(args.debug)
    configdir = configmod.configdir_from(args.configdir)
    store: StateStore | None = None
    # listings (no action, -j, -v, -V) read only: they never create, migrate or merge
    write = args.add is not None or any(a.kind in CHANGING and a.kind != "is-enabled"
                                        for a in args.actions)
    close_audit: Callable[[], None] = lambda: None  # noqa: E731
    try:
        cfg = configmod.load(configdir)
        from .stores import copy_audit, open_store, server_name, state_url_from

        state_url = state_url_from(args.state_url, cfg.server)
        statedir = configmod.statedir_from(args.statedir, cfg.server)
        if state_url:
            store = open_store(state_url, statedir)
        else:
            reachable(statedir / "clients.sqlite", create=write)
            store = SQLiteStore(statedir, readonly=not write)
        close_audit = copy_audit(state_url, f"mandos-ctl@{server_name()}")
        ctl = Ctl(configdir, store, clock, cfg, write=write)
        if args.add is not None:
            ctl.add(args.add)
            return 0
        names = ctl.select(args.client)
        return _dispatch(ctl, args, names, clock)
    except (CtlError, configmod.ConfigError, StateError) as e:
        print(f"mandos-ctl: {e}", file=sys.stderr)
        return 1
    finally:
        close_audit()
        if store is not None:
            store.close()


def _dispatch(ctl: Ctl, args: argparse.Namespace, names: list[str],
              clock: Callable[[], float]) -> int:
    actions: list[Action] = list(args.actions)
    # as Mandos: a --deny goes before a --remove
    actions.sort(key=lambda a: 0 if a.kind == "deny" else 1 if a.kind == "remove" else 0)
    if not actions:
        now = clock()
        rows = [properties(ctl.effective(n), ctl.states[n], now) for n in names]
        print(listing(rows, args.verbose, now, sys.stdout.isatty()))
        return 0
    for action in actions:
        if action.kind == "json":
            now = clock()
            data = {n: properties(ctl.effective(n), ctl.states[n], now) for n in names}
            print(json.dumps(data, indent=4, separators=(",", ": ")))
        elif action.kind == "is-enabled":
            return 0 if ctl.states[names[0]].enabled else 1
        elif action.kind == "start-checker":
            _start_checkers(ctl, names, clock)
        else:
            ctl.run(action, names)
    return 0


def _start_checkers(ctl: Ctl, names: list[str], clock: Callable[[], float]) -> None:
    from .checker import run_pass

    for n in names:
        ctl._audit(Kind.ADMIN_CHANGED, n, f"{n}: checker started by {_admin()}",
                   change="start-checker")
    report = run_pass(ctl.store, ctl.config.clients, ctl.configdir, clock=clock,
                      only=names, force=True)
    log.debug("%s", report.summary())
    ctl.reload()


if __name__ == "__main__":
    sys.exit(main())
