"""Durations as Mandos writes them: ISO 8601 (``PT5M``, ``P1DT2H``) or ``5m``, ``1h30m``, ``1h 30m``.

Shared by the key server (clients.conf, ``mandos-ctl``) and the client side
(``mandos-password-agent``'s and ``mandos-client``'s timeouts, where a plain
number of seconds is accepted too): standard library only, initrd-safe.
"""

from __future__ import annotations

import datetime
import re

_ISO = re.compile(
    r"P(?:(?P<w>\d+(?:\.\d+)?)W)?(?:(?P<d>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?",
    re.IGNORECASE,
)
_UNIT = re.compile(r"(\d+(?:\.\d+)?)([smhdw])", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: Anything longer is a typo, and would overflow datetime arithmetic.
MAX_SECONDS = 100 * 365 * 86400


class DurationError(ValueError):
    pass


def parse_duration(text: str) -> float:
    """Return the duration in seconds; raise :class:`DurationError` if malformed."""
    s = text.strip()
    if not s:
        raise DurationError("empty duration")
    total: float
    m = _ISO.fullmatch(s)
    if m and s.upper() not in ("P", "PT") and not s.upper().endswith("T"):
        total = sum(float(v) * _SECONDS[k if k != "w" else "w"]
                    for k, v in m.groupdict().items() if v is not None)
    else:
        compact = "".join(s.split())
        parts = _UNIT.findall(compact)
        if not parts or "".join(n + u for n, u in parts) != compact:
            raise DurationError(f"not a duration: {text!r} (use e.g. PT5M, 5m, 1h30m)")
        total = sum(float(n) * _SECONDS[u.lower()] for n, u in parts)
    if total > MAX_SECONDS:
        raise DurationError(f"duration too long: {text!r}")
    return total


def parse_seconds(text: str) -> float:
    """A timeout as the client side takes it: seconds (``10``, ``2.5``) or a duration
    (``10s``, ``PT10S``, ``1m``).  Raise :class:`DurationError` if malformed."""
    try:
        total = float(text)
    except ValueError:
        try:
            return parse_duration(text)
        except DurationError:
            raise DurationError(f"not a duration: {text!r} (use seconds, or e.g. 10s, "
                                "PT10S, 1m)") from None
    if total != total or total in (float("inf"), float("-inf")):  # nan, inf
        raise DurationError(f"not a duration: {text!r} (use seconds, or e.g. 10s, PT10S, 1m)")
    return total


def format_duration(seconds: float) -> str:
    """ISO 8601, as Mandos prints durations (``PT5M``)."""
    td = datetime.timedelta(seconds=seconds)
    days, rest = td.days, td.seconds
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    out = "P" + (f"{days}D" if days else "")
    frac = td.microseconds / 1e6
    time = (f"{h}H" if h else "") + (f"{m}M" if m else "")
    if s or frac:
        time += f"{s + frac:g}S"
    if time:
        out += "T" + time
    return out if out != "P" else "PT0S"
