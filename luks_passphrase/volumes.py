"""Which encrypted volumes this machine has: /etc/crypttab and ``dmsetup table``.

A volume can be named by its crypttab/device-mapper name, by ``UUID=…``, or
by a device or image path given directly.  Both sources can be pointed
elsewhere (``--crypttab FILE``, ``--dmsetup-table FILE``) for tests.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from mandos_core.run import CommandError, run

log = logging.getLogger("luks_passphrase.volumes")

DEFAULT_CRYPTTAB = Path("/etc/crypttab")
_TAGS = {"UUID": "by-uuid", "PARTUUID": "by-partuuid", "LABEL": "by-label",
         "PARTLABEL": "by-partlabel"}


class UnknownVolume(Exception):
    pass


@dataclass(frozen=True)
class Volume:
    name: str
    device: str
    source: str  # "crypttab", "dmsetup" or "path"

    def __str__(self) -> str:
        return f"{self.name} ({self.device})" if self.name != self.device else self.device


def _resolve_spec(spec: str) -> str:
    tag, sep, value = spec.partition("=")
    if sep and tag in _TAGS:
        return str(Path("/dev/disk") / _TAGS[tag] / value)
    return spec


def parse_crypttab(text: str) -> list[Volume]:
    out: list[Volume] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            continue
        opts = fields[3].split(",") if len(fields) > 3 else []
        if any(o in ("plain", "tcrypt", "bitlk", "swap", "tmp") or o.startswith("tmp=")
               for o in opts):
            continue  # not LUKS, or made fresh at every boot
        out.append(Volume(fields[0], _resolve_spec(fields[1]), "crypttab"))
    return out


def parse_dmsetup_table(text: str) -> list[Volume]:
    """``dmsetup table`` lines ``NAME: START LEN crypt CIPHER KEY IVOFF DEV OFF ...``."""
    out: list[Volume] = []
    for line in text.splitlines():
        name, sep, rest = line.partition(": ")
        fields = rest.split()
        if not sep or len(fields) < 7 or fields[2] != "crypt":
            continue
        dev = fields[6]
        if ":" in dev and dev.replace(":", "").isdigit():
            sysdev = Path("/sys/dev/block") / dev
            dev = f"/dev/{os.path.basename(os.path.realpath(sysdev))}" if sysdev.exists() else dev
        out.append(Volume(name, dev, "dmsetup"))
    return out


def list_volumes(crypttab: Path = DEFAULT_CRYPTTAB, dmsetup_table: Path | None = None) -> list[Volume]:
    """crypttab entries first, then active crypt mappings not in crypttab."""
    vols: list[Volume] = []
    try:
        vols += parse_crypttab(crypttab.read_text())
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("%s: %s", crypttab, e.strerror)
    if dmsetup_table is not None:
        try:
            table = dmsetup_table.read_text()
        except OSError as e:
            log.warning("%s: %s", dmsetup_table, e.strerror)
            table = ""
    else:
        try:
            table = run(["dmsetup", "table", "--target", "crypt"], timeout=10).stdout.decode()
        except CommandError as e:
            log.debug("dmsetup: %s", e)
            table = ""
    known = {os.path.realpath(v.device) for v in vols} | {v.name for v in vols}
    for v in parse_dmsetup_table(table):
        if v.name not in known and os.path.realpath(v.device) not in known:
            vols.append(v)
    return vols


def find(arg: str, volumes: list[Volume]) -> Volume:
    """The volume *arg* names: a listed name, ``UUID=…``, or a path."""
    for v in volumes:
        if arg == v.name:
            return v
    spec = _resolve_spec(arg)
    if os.path.exists(spec):
        real = os.path.realpath(spec)
        for v in volumes:
            if os.path.exists(v.device) and os.path.realpath(v.device) == real:
                return v
        return Volume(arg, spec, "path")
    names = ", ".join(v.name for v in volumes) or "none listed"
    raise UnknownVolume(f"{arg}: no such volume or device (known volumes: {names})")
