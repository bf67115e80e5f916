"""Decrypting the secret with the client's own OpenPGP key.

The key is imported into a private, temporary GNUPGHOME (0700) that is removed,
with its gpg-agent, when the :class:`Decryptor` is closed.  The import starts
in the background as soon as the object exists, so gpg-agent is up by the time
the secret arrives.  The plaintext only ever exists in memory (a pipe from gpg),
wrapped in a :class:`Secret`.

We drive the ``gpg`` binary directly rather than through python-gnupg: its
import and its ``gpg --version`` probe cost ~15 ms per fetch, a quarter of the
whole budget, and one file less in the initrd.  README says more.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mandos_core.secret import Secret

GPG = "gpg"
_BASE = ["--batch", "--no-tty", "--quiet", "--no-permission-warning", "--no-auto-check-trustdb"]


class GpgError(Exception):
    pass


def _runtime_dir() -> str | None:
    for d in (os.environ.get("RUNTIME_DIRECTORY"), os.environ.get("XDG_RUNTIME_DIR"), "/run"):
        if d and os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return None


def _last_line(data: bytes) -> str:
    lines = [ln for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


class Decryptor:
    """A throw-away GnuPG home holding the client's secret key."""

    def __init__(self, seckey: Path, pubkey: Path | None = None) -> None:
        if not os.access(seckey, os.R_OK):
            raise GpgError(f"{seckey}: cannot read the OpenPGP secret key")
        self.seckey = seckey
        self.home = tempfile.mkdtemp(prefix="mandos-gpg-", dir=_runtime_dir())
        os.chmod(self.home, 0o700)
        self._env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
                     "GNUPGHOME": self.home}
        self._ready = False
        try:
            self._import: subprocess.Popen[bytes] | None = subprocess.Popen(  # noqa: S603
                [GPG, "--homedir", self.home, *_BASE, "--import", str(seckey)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env=self._env)
        except FileNotFoundError:
            self.close()
            raise GpgError("gpg: not installed (not found in PATH)") from None

    def wait_ready(self) -> None:
        """Wait for the key import; raise :class:`GpgError` if it failed."""
        if self._ready:
            return
        proc, self._import = self._import, None
        if proc is None:
            raise GpgError("the OpenPGP key was not imported")
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise GpgError(f"{self.seckey}: cannot import the OpenPGP key: {_last_line(err)}")
        self._ready = True

    def decrypt(self, message: bytes) -> Secret:
        self.wait_ready()
        try:
            proc = subprocess.run(  # noqa: S603
                [GPG, "--homedir", self.home, *_BASE, "--trust-model", "always", "--decrypt"],
                input=message, capture_output=True, env=self._env, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            raise GpgError("gpg timed out decrypting the secret") from None
        if proc.returncode != 0 or not proc.stdout:
            raise GpgError(f"cannot decrypt the secret: {_last_line(proc.stderr) or 'gpg failed'}")
        return Secret(proc.stdout)

    def close(self) -> None:
        if self._import is not None:
            self._import.kill()
            self._import.wait()
            self._import = None
        if not os.path.isdir(self.home):
            return
        from mandos_core.run import CommandError, run

        try:
            run(["gpgconf", "--kill", "gpg-agent"], env={"GNUPGHOME": self.home}, timeout=5,
                check=False)
        except CommandError:
            pass
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Decryptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
