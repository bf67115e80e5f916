"""Decrypting the secret with the client's own OpenPGP key (gpg via python-gnupg).

The keys are imported into a private, temporary GNUPGHOME (0700) that is
removed, with its gpg-agent, when the :class:`Decryptor` is closed.  The
plaintext only ever exists in memory, wrapped in a :class:`Secret`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import gnupg

from .run import CommandError, run
from .secret import Secret

log = logging.getLogger(__name__)


class GpgError(Exception):
    pass


def _runtime_dir() -> str | None:
    for d in (os.environ.get("RUNTIME_DIRECTORY"), os.environ.get("XDG_RUNTIME_DIR"), "/run"):
        if d and os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return None


class Decryptor:
    """A throw-away GnuPG home holding the client's key pair."""

    def __init__(self, seckey: Path, pubkey: Path | None = None) -> None:
        self.home = tempfile.mkdtemp(prefix="mandos-gpg-", dir=_runtime_dir())
        os.chmod(self.home, 0o700)
        try:
            self.gpg = gnupg.GPG(gnupghome=self.home, gpgbinary="gpg",
                                 options=["--no-options", "--no-autostart"][:1])
            self.gpg.encoding = "latin-1"
            for path in (pubkey, seckey):
                if path is None:
                    continue
                try:
                    data = path.read_bytes()
                except OSError as e:
                    raise GpgError(f"{path}: {e.strerror}") from None
                result = self.gpg.import_keys(data)
                if not result.count:
                    raise GpgError(f"{path}: no OpenPGP key could be imported")
        except BaseException:
            self.close()
            raise

    def decrypt(self, message: bytes) -> Secret:
        result = self.gpg.decrypt(message, always_trust=True)
        if not result.ok:
            # result.status is gpg's own one-line status ("decryption failed", "no secret key")
            raise GpgError(f"cannot decrypt the secret: {result.status or 'gpg failed'}")
        secret = Secret(result.data)
        result.data = b""
        return secret

    def close(self) -> None:
        if not os.path.isdir(self.home):
            return
        try:
            run(["gpgconf", "--kill", "gpg-agent"], env={"GNUPGHOME": self.home}, timeout=5)
        except CommandError as e:
            log.debug("stopping gpg-agent: %s", e)
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Decryptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
