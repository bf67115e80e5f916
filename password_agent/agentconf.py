"""The agent's settings: one table drives the command line, the environment and the options file.

Every setting can be given, from weakest to strongest, as

1. its default,
2. a line ``MANDOS_AGENT_X=value`` in the options file (``--config``; default
   ``/etc/mandos/password-agent.conf`` when it exists) — the syntax of systemd's
   ``EnvironmentFile=``, so the same file also works there,
3. the environment variable ``MANDOS_AGENT_X``,
4. the command-line option.

Lists (``--connect``, ``--id-prefix``) are separated by white space or commas
in the file and the environment.  The result is one frozen :class:`AgentConfig`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mandos_core.cli import add_version
from mandos_core.durations import DurationError, parse_seconds
from mandos_core.keyfiles import DEFAULT_KEYDIR

from .client import Server, parse_server

DEFAULT_ASK_DIR = Path("/run/systemd/ask-password")
DEFAULT_CONFIG = Path("/etc/mandos/password-agent.conf")
ENV_PREFIX = "MANDOS_AGENT_"

Kind = Literal["path", "str", "list", "servers", "bool", "seconds"]


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Setting:
    name: str
    option: str
    kind: Kind
    default: object
    metavar: str | None
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("connect", "--connect", "servers", (), "HOST:PORT",
            "a key server to ask; repeat for several (all are asked at once). IPv6 as "
            "[ADDRESS]:PORT, link-local with its interface as [fe80::1%%eth0]:PORT"),
    Setting("zeroconf", "--no-zeroconf", "bool", True, None,
            "do not look for servers announced as _mandos._tcp with mDNS/DNS-SD "
            "(only used when python-zeroconf is installed)"),
    Setting("keydir", "--keydir", "path", DEFAULT_KEYDIR, "DIR",
            "the client's key files: tls-privkey.pem, tls-pubkey.pem, tls-cert.pem, "
            "seckey.txt, pubkey.txt (default: %(default)s)"),
    Setting("ask_dir", "--ask-dir", "path", DEFAULT_ASK_DIR, "DIR",
            "the directory where askers put their ask.* files (default: %(default)s)"),
    Setting("id_prefix", "--id-prefix", "list", ("cryptsetup:",), "PREFIX",
            "answer only questions whose Id= starts with PREFIX; repeat for several; "
            "an empty PREFIX answers every question (default: cryptsetup:)"),
    Setting("once", "--once", "bool", False, None,
            "exit after the first question answered"),
    Setting("exit_when_idle", "--exit-when-idle", "bool", False, None,
            "answer the questions present and those that arrive meanwhile, then exit as "
            "soon as no question this agent can answer is left (for a .path-activated "
            "service); exits at once when there is nothing to answer"),
    Setting("connect_timeout", "--connect-timeout", "seconds", 3.0, "SECONDS",
            "give up connecting to one server after this long (default: %(default)s)"),
    Setting("timeout", "--timeout", "seconds", 10.0, "SECONDS",
            "give up on one exchange after this long once connected, so a server that "
            "accepts and stays silent cannot hold the agent (default: %(default)s)"),
    Setting("retry_max", "--retry-max", "seconds", 5.0, "SECONDS",
            "longest pause before asking a failed server again; pauses start at 0.25 s "
            "and double (default: %(default)s)"),
    Setting("debug", "--debug", "bool", False, None,
            "log every step (SYSTEMD_LOG_LEVEL=debug does the same)"),
)


@dataclass(frozen=True)
class AgentConfig:
    connect: tuple[Server, ...] = ()
    zeroconf: bool = True
    keydir: Path = DEFAULT_KEYDIR
    ask_dir: Path = DEFAULT_ASK_DIR
    id_prefix: tuple[str, ...] = ("cryptsetup:",)
    once: bool = False
    exit_when_idle: bool = False
    connect_timeout: float = 3.0
    timeout: float = 10.0
    retry_max: float = 5.0
    debug: bool = False


_TRUE = {"1", "yes", "y", "true", "on"}
_FALSE = {"0", "no", "n", "false", "off"}


def _convert(s: Setting, raw: str | Sequence[str], where: str) -> object:
    """Turn a raw value (a string, or a list from repeated options) into the setting's type."""
    try:
        if s.kind in ("list", "servers"):
            items: list[str]
            if isinstance(raw, str):
                items = raw.replace(",", " ").split()
                if s.kind == "list" and raw.strip() in ("", '""', "''"):
                    items = []
            else:
                items = list(raw)
            if s.kind == "servers":
                return tuple(parse_server(i) for i in items)
            return tuple(i for i in items if i)
        assert isinstance(raw, str)
        if s.kind == "bool":
            v = raw.strip().lower()
            if v in _TRUE:
                return True
            if v in _FALSE:
                return False
            raise ValueError("expected yes or no")
        if s.kind == "seconds":
            f = parse_seconds(raw)
            if not 0 < f <= 3600:
                raise ValueError("must be more than 0 and at most 3600 seconds (1h)")
            return f
        if s.kind == "path":
            if not raw:
                raise ValueError("empty path")
            return Path(raw)
        return raw
    except (ValueError, DurationError) as e:
        shown = raw if isinstance(raw, str) else " ".join(raw)
        if where == "command line":
            raise ConfigError(f"{s.option}={shown}: {e}") from None
        raise ConfigError(f"{where}: {s.env}={shown}: {e}") from None


def read_options_file(path: Path) -> dict[str, tuple[str, int]]:
    """``KEY=value`` lines (``#`` comments, optional quotes) -> {KEY: (value, line)}."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    out: dict[str, tuple[str, int]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"{path}:{n}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = (value, n)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mandos-password-agent",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Answer systemd's password questions for encrypted volumes with a secret from
Mandos key servers.

The agent watches the ask-password directory with inotify.  For each question
whose Id= starts with "cryptsetup:" (and whose asker is alive and whose
NotAfter= has not passed) it asks every known key server at once over TLS,
decrypts the secret with this machine's OpenPGP key and sends it to the
asker's socket.  Servers that fail are asked again after a pause that grows
up to --retry-max; the agent keeps going until the question is answered,
answered by another agent (console, plymouth), withdrawn, or past its
deadline.  It must run as root: systemd's askers ignore replies from other
users.""",
        epilog=f"""\
settings from the environment or an options file:
  Every option has a variable {ENV_PREFIX}<NAME> (for example
  {ENV_PREFIX}CONNECT="10.0.0.1:4711 [fe80::1%eth0]:4711",
  {ENV_PREFIX}ZEROCONF=no, {ENV_PREFIX}EXIT_WHEN_IDLE=yes).  The same
  KEY=value lines may be put in the options file (--config, or
  {ENV_PREFIX}CONFIG; default {DEFAULT_CONFIG} when it exists).
  The command line beats the environment, which beats the file.
  SECONDS may also be written as a duration: 10s, PT10S, 1m.

exit status:
  0  stopped by SIGTERM/SIGINT, --once answered, or --exit-when-idle found
     nothing more to answer
  1  the ask-password directory cannot be watched
  2  usage or configuration error
  3  the key files cannot be used (TLS keys or OpenPGP keys, gpg)

files:
  /etc/keys/mandos/    the default --keydir
  /run/systemd/ask-password/ask.*   the questions (see systemd's
                       "Password Agents" specification)""",
    )
    add_version(p)
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=f"read KEY=value settings from FILE (default: {DEFAULT_CONFIG} "
                   "if it exists)")
    for s in SETTINGS:
        if s.kind == "bool":
            p.add_argument(s.option, dest=s.name, action="store_const",
                           const=not s.default, default=None, help=s.help)
        elif s.kind in ("list", "servers"):
            p.add_argument(s.option, dest=s.name, action="append", metavar=s.metavar,
                           default=None, help=s.help)
        else:
            p.add_argument(s.option, dest=s.name, metavar=s.metavar, default=None,
                           help=s.help % {"default": s.default})
    return p


def load(argv: Sequence[str] | None = None,
         environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Parse *argv* (default: sys.argv) with *environ* and the options file into a config."""
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict[str, object] = {s.name: s.default for s in SETTINGS}

    config_path: Path | None = args.config
    if config_path is None and env.get(ENV_PREFIX + "CONFIG"):
        config_path = Path(env[ENV_PREFIX + "CONFIG"])
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    known = {s.env: s for s in SETTINGS}
    if config_path is not None:
        for key, (raw, line) in read_options_file(config_path).items():
            s = known.get(key)
            if s is None:
                if key.startswith(ENV_PREFIX):
                    raise ConfigError(f"{config_path}:{line}: unknown setting {key}")
                continue  # other programs' variables in a shared environment file
            values[s.name] = _convert(s, raw, f"{config_path}:{line}")
    for s in SETTINGS:
        if s.env in env:
            values[s.name] = _convert(s, env[s.env], "environment")
    for s in SETTINGS:
        given = getattr(args, s.name)
        if given is None:
            continue
        values[s.name] = given if s.kind == "bool" else _convert(s, given, "command line")
    return AgentConfig(**values)  # type: ignore[arg-type]
