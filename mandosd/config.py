"""``mandos.conf`` and ``clients.conf`` in Mandos's formats, parsed into frozen records.

Each setting is one row of a table (name, type, default); the table drives
parsing, validation and defaults.  Unknown keys warn with file and line; bad
values raise :class:`ConfigError` as ``file: [section] key=value: reason``.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import logging
import os
import re
import shlex
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mandos_core.durations import DurationError, parse_duration
from mandos_core.protocol import KeyIdError, normalize_key_id

log = logging.getLogger("mandosd.config")

DEFAULT_CONFIGDIR = Path("/etc/mandos")
DEFAULT_STATEDIR = Path("/var/lib/mandosd")


class ConfigError(Exception):
    pass


def _bool(v: str) -> bool:
    t = v.strip().lower()
    if t in ("1", "yes", "true", "on"):
        return True
    if t in ("0", "no", "false", "off"):
        return False
    raise ValueError("not a boolean (use true or false)")


def _port(v: str) -> int | None:
    if not v.strip():
        return None
    if not v.strip().isdigit():
        raise ValueError("not a port number (use 1 to 65535, or 0 for any free port)")
    p = int(v)
    if not 0 <= p < 65536:
        raise ValueError("port out of range (use 1 to 65535, or 0 for any free port)")
    return p


def _duration(v: str) -> float:
    try:
        return parse_duration(v)
    except DurationError as e:
        raise ValueError(str(e)) from None


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(v: str) -> int:
    """A byte count: ``1048576``, ``512K``, ``64M``, ``1G`` (also ``KiB``, ``MB``: powers of 2)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", v, re.IGNORECASE)
    if not m:
        raise ValueError("not a size (use bytes, or a number with K, M or G)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def _count(v: str) -> int:
    if not v.strip().lstrip("-").isdigit():
        raise ValueError("not a whole number")
    n = int(v)
    if n < 0:
        raise ValueError("must not be negative")
    return n


def _str(v: str) -> str:
    return v.strip()


def _optstr(v: str) -> str | None:
    return v.strip() or None


@dataclass(frozen=True)
class Setting:
    key: str
    parse: Callable[[str], Any]
    default: str


#: mandos.conf [DEFAULT]; what Mandos accepts, with Mandos's defaults.
SERVER_SETTINGS = (
    Setting("interface", _optstr, ""),
    Setting("address", _optstr, ""),
    Setting("port", _port, ""),
    Setting("debug", _bool, "False"),
    Setting("priority", _str, ""),
    Setting("servicename", _str, "Mandos"),
    Setting("use_dbus", _bool, "True"),
    Setting("use_ipv6", _bool, "True"),
    Setting("restore", _bool, "True"),
    Setting("statedir", _optstr, ""),
    Setting("state_url", _optstr, ""),
    Setting("foreground", _bool, "False"),
    Setting("socket", _optstr, ""),
    Setting("zeroconf", _bool, "True"),
    Setting("debuglevel", _str, ""),
    # not Mandos's: escrow is refused while the state file system has less free space
    Setting("escrow_reserve", _size, "64M"),
)

#: clients.conf; the defaults of Mandos 1.8.
CLIENT_SETTINGS = (
    Setting("timeout", _duration, "PT5M"),
    Setting("interval", _duration, "PT2M"),
    Setting("extended_timeout", _duration, "PT15M"),
    Setting("checker", _str, "fping -q -- %%(host)s"),
    Setting("approved_by_default", _bool, "True"),
    Setting("approval_delay", _duration, "PT0S"),
    Setting("approval_duration", _duration, "PT1S"),
    Setting("enabled", _bool, "True"),
    Setting("host", _str, ""),
    # not Mandos's: what one client may keep on the escrow endpoint (mandosd/escrow_policy.py)
    Setting("escrow_max_packets", _count, "16"),
    Setting("escrow_max_bytes", _size, "1M"),
    Setting("escrow_uploads_per_hour", _count, "32"),
)
#: Keys that are read specially, or that Mandos knows and we accept silently.
CLIENT_SPECIAL = {"key_id", "fingerprint", "secret", "secfile"}


@dataclass(frozen=True)
class ServerConfig:
    interface: str | None = None
    address: str | None = None
    port: int | None = None
    debug: bool = False
    priority: str = ""
    servicename: str = "Mandos"
    use_dbus: bool = True
    use_ipv6: bool = True
    restore: bool = True
    statedir: str | None = None
    #: a pool's PostgreSQL (libpq connection string); None: SQLite in statedir
    state_url: str | None = None
    foreground: bool = False
    socket: str | None = None
    zeroconf: bool = True
    debuglevel: str = ""
    escrow_reserve: int = 64 << 20


@dataclass(frozen=True)
class Client:
    name: str
    key_id: str | None
    fingerprint: str
    secret: bytes = field(repr=False)
    host: str
    checker: str
    timeout: float
    interval: float
    extended_timeout: float
    approval_delay: float
    approval_duration: float
    approved_by_default: bool
    enabled: bool
    escrow_max_packets: int = 16
    escrow_max_bytes: int = 1 << 20
    escrow_uploads_per_hour: int = 32
    #: every key=value of the section (after interpolation), for %(name)s in checkers
    attributes: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)


#: A file's identity and version, as :func:`config_stamp` compares them.
Stamp = tuple[int, int, int, int] | None


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    clients: Mapping[str, Client]
    by_key_id: Mapping[str, Client]
    #: clients.conf's [DEFAULT] (raw, with Mandos's defaults): what an added client gets
    defaults: Mapping[str, str] = field(default_factory=dict, compare=False)
    #: the secret files read (secfile=), whose changes a running server must notice
    secfiles: tuple[Path, ...] = ()


def _line_numbers(path: Path) -> dict[tuple[str, str], int]:
    """Map (section, key) to its line in *path*, for warnings."""
    lines: dict[tuple[str, str], int] = {}
    section = "DEFAULT"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return lines
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*\[([^]]+)\]", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"([^\s#;=:][^=:]*?)\s*[=:]", line)
        if m:
            lines.setdefault((section, m.group(1).strip().lower()), n)
    return lines


def check_private(path: Path, st: os.stat_result, label: str | None = None) -> None:
    """A file that holds secrets must be root's (or ours) and nobody else's to read.

    Raises :class:`ConfigError`: one line naming the file and the command that fixes it.
    """
    q = shlex.quote(str(path))
    label = str(path) if label is None else label
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{label}: owned by uid {st.st_uid}, not root: chown root: {q}")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"{label}: readable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); it holds secrets: chmod 600 {q}")


def _oserror(label: str | Path, e: OSError) -> ConfigError:
    hint = " (run as root)" if isinstance(e, PermissionError) and os.geteuid() != 0 else ""
    return ConfigError(f"{label}: {e.strerror}{hint}")


def read_private(path: Path, label: str | None = None) -> bytes:
    """Read a secret-bearing file, refusing one that others can read or that is not root's."""
    label = str(path) if label is None else label
    try:
        with path.open("rb") as f:
            check_private(path, os.fstat(f.fileno()), label)
            return f.read()
    except OSError as e:
        raise _oserror(label, e) from None


def _read(path: Path, defaults: Mapping[str, str], *,
          private: bool = False) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(defaults=dict(defaults), strict=True)
    try:
        with path.open(encoding="utf-8") as f:
            if private:
                check_private(path, os.fstat(f.fileno()))
            parser.read_file(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (wrong --configdir?)") from None
    except OSError as e:
        raise _oserror(path, e) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except configparser.Error as e:
        raise ConfigError(_syntax_error(path, e)) from None
    return parser


#: What a line of mandos.conf or clients.conf must look like.
LINE_FORMS = "a line must be '[section]', 'key = value', or a comment starting with # or ;"


def _syntax_error(path: Path, e: configparser.Error) -> str:
    """configparser's text as one sentence: file, line, what is wrong, what is right."""
    if isinstance(e, configparser.MissingSectionHeaderError):
        return (f"{path}:{e.lineno}: {e.line.strip()!r} comes before any [section] "
                "(start the file with [DEFAULT] or a client's [name])")
    if isinstance(e, configparser.ParsingError):
        lineno, line = e.errors[0]
        try:  # configparser keeps only the line's repr, newline and all
            line = repr(path.read_text(errors="replace").splitlines()[lineno - 1].strip())
        except (OSError, IndexError):
            pass
        more = f" (and {len(e.errors) - 1} more lines)" if len(e.errors) > 1 else ""
        return f"{path}:{lineno}: not understood: {line}{more}; {LINE_FORMS}"
    if isinstance(e, configparser.DuplicateSectionError):
        return (f"{path}:{e.lineno}: section [{e.section}] appears twice "
                "(merge the two, or rename one)")
    if isinstance(e, configparser.DuplicateOptionError):
        return (f"{path}:{e.lineno}: [{e.section}] {e.option} is set twice in the same "
                "section (keep one)")
    return f"{path}: {str(e).replace(chr(10), ' ').strip()}"


#: settings whose values never appear in a message (a URL may carry a password)
SECRET_VALUES = frozenset({"state_url"})


def _value(path: Path, parser: configparser.ConfigParser, section: str, key: str) -> str:
    try:
        return parser.get(section, key)
    except configparser.InterpolationError as e:
        # never the rest of a value that may hold a password (state_url)
        msg = ("a '%' must be followed by '%' or '('" if key in SECRET_VALUES
               else str(e).splitlines()[0])
        raise ConfigError(f"{path}: [{section}] {key}: bad %-interpolation: {msg} "
                          "(write %% for a literal %)") from None


def _parse_setting(path: Path, section: str, s: Setting, raw: str) -> Any:
    try:
        return s.parse(raw)
    except ValueError as e:
        raise ConfigError(f"{path}: [{section}] {s.key}={raw.strip()}: {e}") from None


def _warn_unknown(path: Path, parser: configparser.ConfigParser, section: str,
                  known: set[str], defaults: Mapping[str, str]) -> None:
    own = parser._sections.get(section, {}) if section != "DEFAULT" else parser.defaults()  # type: ignore[attr-defined]
    unknown = [key for key in own if key not in known]
    if not unknown:
        return  # re-reading the file per section made 10,000 clients take minutes
    lines = _line_numbers(path)
    for key in own:
        if key not in known:
            line = lines.get((section, key), 0)
            log.warning("%s:%d: [%s] unknown key '%s' ignored", path, line, section, key)


def load_server_config(path: Path) -> ServerConfig:
    if not path.exists():
        return ServerConfig()
    defaults = {s.key: s.default for s in SERVER_SETTINGS}
    parser = _read(path, defaults)
    _warn_unknown(path, parser, "DEFAULT", set(defaults), defaults)
    values = {s.key: _parse_setting(path, "DEFAULT", s, _value(path, parser, "DEFAULT", s.key))
              for s in SERVER_SETTINGS}
    return ServerConfig(**values)


def _secret(path: Path | str, configdir: Path, parser: configparser.ConfigParser, name: str,
            secfiles: list[Path]) -> bytes:
    sec = parser._sections[name]  # type: ignore[attr-defined]
    if "secret" in sec:
        raw = parser.get(name, "secret", raw=True)
        try:
            data = base64.b64decode("".join(raw.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{path}: [{name}] secret=…: not valid base64") from None
    elif "secfile" in sec:
        secfile = Path(_value(Path(path), parser, name, "secfile")).expanduser()
        if not secfile.is_absolute():
            secfile = configdir / secfile
        secfiles.append(secfile)
        data = read_private(secfile, f"{path}: [{name}] secfile={secfile}")
    else:
        raise ConfigError(f"{path}: [{name}]: missing secret (or secfile)")
    if not data:
        raise ConfigError(f"{path}: [{name}] secret: empty")
    return data


def _client(label: str, parser: configparser.ConfigParser, name: str, configdir: Path,
            secfiles: list[Path]) -> Client:
    """One section of *parser* as a :class:`Client`; *label* names its origin in errors."""
    path = Path(label)
    # every option interpolated once; checkers get them all as %(name)s
    attributes: dict[str, str] = {}
    broken: set[str] = set()
    for key in parser.options(name):
        if key == "secret":
            continue
        try:
            attributes[key] = parser.get(name, key)
        except configparser.InterpolationError:
            attributes[key] = parser.get(name, key, raw=True)
            broken.add(key)
    values = {s.key: _parse_setting(path, name, s, _value(path, parser, name, s.key)
                                    if s.key in broken else attributes[s.key])
              for s in CLIENT_SETTINGS}
    if not values["host"]:
        values["host"] = name
    if "key_id" not in attributes:
        raise ConfigError(f"{label}: [{name}]: no key_id (the client's key, 64 hex digits, "
                          "as mandos-keygen prints it); without it the client can never "
                          "be identified")
    raw = parser.get(name, "key_id", raw=True)
    try:
        kid = normalize_key_id(raw)
    except KeyIdError as e:
        raise ConfigError(f"{label}: [{name}] key_id={raw.strip()}: {e}") from None
    fpr = "".join(parser.get(name, "fingerprint", raw=True, fallback="").split()).upper()
    attributes["name"] = name
    attributes["host"] = values["host"]
    return Client(name=name, key_id=kid, fingerprint=fpr,
                  secret=_secret(label, configdir, parser, name, secfiles),
                  attributes=attributes, **values)


def client_defaults() -> dict[str, str]:
    """Mandos's defaults for a client, as clients.conf [DEFAULT] text values."""
    return {s.key: s.default for s in CLIENT_SETTINGS}


def _load_clients(path: Path, configdir: Path
                  ) -> tuple[dict[str, Client], dict[str, str], list[Path]]:
    defaults = client_defaults()
    parser = _read(path, defaults, private=True)
    known = set(defaults) | CLIENT_SPECIAL
    clients: dict[str, Client] = {}
    known |= set(parser.defaults())
    secfiles: list[Path] = []
    for name in parser.sections():
        _warn_unknown(path, parser, name, known, defaults)
        clients[name] = _client(str(path), parser, name, configdir, secfiles)
    seen: dict[str, str] = {}
    for c in clients.values():
        if c.key_id is None:
            continue
        if c.key_id in seen:
            raise ConfigError(f"{path}: [{c.name}] key_id={c.key_id}: "
                              f"same key_id as [{seen[c.key_id]}]")
        seen[c.key_id] = c.name
    return clients, dict(parser.defaults()), secfiles


def load_clients(path: Path, configdir: Path) -> dict[str, Client]:
    """Every client of *path*; a missing, unreadable or others-readable file is an error."""
    return _load_clients(path, configdir)[0]


def section_client(name: str, values: Mapping[str, str], defaults: Mapping[str, str],
                   label: str) -> Client:
    """A client from one section's raw *values* on top of *defaults* (clients.conf's
    [DEFAULT]), read from memory: for clients added with ``mandos-ctl --add``."""
    parser = configparser.ConfigParser(defaults=dict(defaults), strict=True)
    try:
        parser.read_dict({name: dict(values)})
    except (configparser.Error, ValueError) as e:
        raise ConfigError(f"{label}: {str(e).splitlines()[0]}") from None
    return _client(label, parser, name, Path("/"), [])


def load(configdir: Path) -> Config:
    server = load_server_config(configdir / "mandos.conf")
    clients, defaults, secfiles = _load_clients(configdir / "clients.conf", configdir)
    by_key = {c.key_id: c for c in clients.values() if c.key_id}
    return Config(server=server, clients=clients, by_key_id=by_key, defaults=defaults,
                  secfiles=tuple(secfiles))


def load_defaults(configdir: Path) -> dict[str, str]:
    """clients.conf's [DEFAULT] with Mandos's defaults, without loading the clients."""
    path = configdir / "clients.conf"
    parser = _read(path, client_defaults(), private=True)
    return dict(parser.defaults())


def configdir_from(arg: Path | None) -> Path:
    """--configdir, else systemd's $CONFIGURATION_DIRECTORY, else /etc/mandos."""
    if arg is not None:
        return arg
    env = os.environ.get("CONFIGURATION_DIRECTORY", "").split(":")[0]
    return Path(env) if env else DEFAULT_CONFIGDIR


def statedir_from(arg: Path | None, server: ServerConfig) -> Path:
    """--statedir, else $STATE_DIRECTORY, else statedir= from mandos.conf, else the default."""
    if arg is not None:
        return arg
    env = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if env:
        return Path(env)
    return Path(server.statedir) if server.statedir else DEFAULT_STATEDIR


def _stamp(path: Path) -> Stamp:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def config_stamp(configdir: Path, secfiles: Iterable[Path] = ()) -> tuple[Stamp, ...]:
    """Changes when a config file or a secret file changes (content, owner, mode, or
    replaced by rename), so that a long-running server re-reads them."""
    return tuple(_stamp(p) for p in (configdir / "mandos.conf", configdir / "clients.conf",
                                     *secfiles))
