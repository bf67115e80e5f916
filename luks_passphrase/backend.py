"""Open a LUKS header with libcryptsetup, or with the cryptsetup program as a fallback.

``LUKS_PASSPHRASE_BACKEND=cryptsetup`` forces the program; otherwise the
library is used whenever it loads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .cryptsetup_cli import CryptsetupVolume
from .libcryptsetup import LibraryMissing, LuksVolume, load_library

log = logging.getLogger("luks_passphrase")

Luks = LuksVolume | CryptsetupVolume
BACKEND_ENV = "LUKS_PASSPHRASE_BACKEND"


def open_volume(path: str | Path) -> Luks:
    if os.environ.get(BACKEND_ENV, "") == "cryptsetup":
        return CryptsetupVolume(path)
    try:
        load_library()
    except LibraryMissing as e:
        log.warning("%s; falling back to the cryptsetup program", e)
        return CryptsetupVolume(path)
    return LuksVolume(path)
