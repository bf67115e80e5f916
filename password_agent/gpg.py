"""Decrypting the secret with the client's own OpenPGP key, and nothing else.

The key is imported into a private, temporary GNUPGHOME (0700) that is removed,
with its gpg-agent, when the :class:`Decryptor` is closed
(:func:`mandos_core.gpghome.remove`).  The import starts in the background as
soon as the object exists, so gpg-agent is up by the time the secret arrives.
The plaintext only ever exists in memory (a pipe from gpg), wrapped in a
:class:`Secret`.

gpg "decrypts" more than encrypted messages: a bare literal data packet (what
``gpg --store`` makes, and any rogue key server can send) comes out with exit
code 0.  So gpg reports what it did on a status pipe (``--status-fd``), and
:func:`refusal` (a pure function of those lines) accepts only a message that
was decrypted with our own key: ``DECRYPTION_KEY`` naming our key,
``DECRYPTION_OKAY``, and exactly one literal packet, inside the encryption.
Anything else raises :class:`NotForUs`.

We drive the ``gpg`` binary directly rather than through python-gnupg: its
import and its ``gpg --version`` probe cost ~15 ms per fetch, a quarter of the
whole budget, and one file less in the initrd.  README says more.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path

from mandos_core import gpghome
from mandos_core.secret import Secret

GPG = "gpg"
#: No pinentry ever: our key has no passphrase, and a symmetric-only message must
#: fail at once rather than wait for someone to type one.
_BASE = ["--batch", "--no-tty", "--quiet", "--no-auto-check-trustdb", "--pinentry-mode",
         "error"]
#: gpg's status output for one message is a few hundred bytes; keep at most this much.
MAX_STATUS = 256 * 1024
DECRYPT_TIMEOUT = 60.0


class GpgError(Exception):
    pass


class NotForUs(GpgError):
    """gpg output data, but the message was not one encrypted to our key."""


def _runtime_dir() -> str | None:
    for d in (os.environ.get("RUNTIME_DIRECTORY"), os.environ.get("XDG_RUNTIME_DIR"), "/run"):
        if d and os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return None


def _last_line(data: bytes) -> str:
    lines = [ln for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def status_lines(status: bytes) -> list[list[str]]:
    """``[GNUPG:] KEYWORD ARGS...`` lines -> ``[[KEYWORD, ARG, ...], ...]``."""
    out = []
    for line in status.decode("ascii", errors="replace").splitlines():
        if line.startswith("[GNUPG:] "):
            out.append(line[9:].split())
    return [w for w in out if w]


def imported_fingerprints(status: bytes) -> frozenset[str]:
    """The primary fingerprints an import reported (``IMPORT_OK <flags> <fpr>``)."""
    return frozenset(w[2].upper() for w in status_lines(status)
                     if w[0] == "IMPORT_OK" and len(w) > 2)


def refusal(status: bytes, ours: Iterable[str]) -> str | None:
    """Why a decryption's status lines show a message not encrypted to our key; None if fine."""
    ours = {f.upper() for f in ours}
    words = status_lines(status)
    keywords = [w[0] for w in words]
    if "BEGIN_DECRYPTION" not in keywords:
        if "PLAINTEXT" in keywords:
            return "the message is not encrypted (bare literal data, as gpg --store makes)"
        return "the message is not an encrypted OpenPGP message"
    used = [w for w in words if w[0] == "DECRYPTION_KEY"]
    if not used:
        if "NEED_PASSPHRASE_SYM" in keywords or "ENC_TO" not in keywords:
            return "the message is encrypted with a passphrase, not to our key"
        return "the message is not encrypted to our key"
    if not any({x.upper() for x in w[1:3]} & ours for w in used):
        return "the message was decrypted with a key that is not ours"
    if "DECRYPTION_FAILED" in keywords or "DECRYPTION_OKAY" not in keywords:
        return "decryption failed (damaged or tampered message)"
    if keywords.count("PLAINTEXT") != 1 or (
            keywords.index("PLAINTEXT") < keywords.index("BEGIN_DECRYPTION")):
        return "the message carries literal data outside its encrypted part"
    end = keywords.index("END_DECRYPTION") if "END_DECRYPTION" in keywords else len(keywords)
    if keywords.index("PLAINTEXT") > end:
        return "the message carries literal data outside its encrypted part"
    return None


def _drain(fd: int, into: bytearray) -> None:
    """Read *fd* to EOF, keeping the first MAX_STATUS bytes (so gpg never blocks on it)."""
    with open(fd, "rb", buffering=0, closefd=True) as f:
        while chunk := f.read(65536):
            if len(into) < MAX_STATUS:
                into += chunk[:MAX_STATUS - len(into)]


class Decryptor:
    """A throw-away GnuPG home holding the client's secret key."""

    def __init__(self, seckey: Path, pubkey: Path | None = None) -> None:
        if not os.access(seckey, os.R_OK):
            raise GpgError(f"{seckey}: cannot read the OpenPGP secret key")
        self.seckey = seckey
        self._lock = threading.Lock()
        self._closed = False
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._ready = False
        self.fingerprints: frozenset[str] = frozenset()
        self.home = gpghome.make("mandos-gpg-", _runtime_dir())
        self._env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
                     "GNUPGHOME": self.home}
        try:
            self._import: subprocess.Popen[bytes] | None = self._spawn(
                [GPG, "--homedir", self.home, *_BASE, "--status-fd", "1",
                 "--import", str(seckey)], stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            self.close()
            raise GpgError("gpg: not installed (not found in PATH)") from None

    def _spawn(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._closed:
                raise GpgError("the OpenPGP key is no longer loaded (stopping)")
            proc: subprocess.Popen[bytes] = subprocess.Popen(  # noqa: S603
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._env,
                **kw)  # type: ignore[call-overload]
            self._procs.add(proc)
            return proc

    def _reaped(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.discard(proc)

    def wait_ready(self) -> None:
        """Wait for the key import; raise :class:`GpgError` if it failed."""
        if self._ready:
            return
        proc, self._import = self._import, None
        if proc is None:
            raise GpgError("the OpenPGP key was not imported")
        try:
            out, err = proc.communicate()
        finally:
            self._reaped(proc)
        self.fingerprints = imported_fingerprints(out)
        if proc.returncode != 0 or not self.fingerprints:
            raise GpgError(f"{self.seckey}: cannot import the OpenPGP key: "
                           f"{_last_line(err) or 'no secret key in it'}")
        self._ready = True

    def decrypt(self, message: bytes) -> Secret:
        """The plaintext of *message*; :class:`NotForUs` unless it was encrypted to our key."""
        self.wait_ready()
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        status = bytearray()
        try:
            proc = self._spawn(
                [GPG, "--homedir", self.home, *_BASE, "--status-fd", str(status_w),
                 "--trust-model", "always", "--decrypt"],
                stdin=subprocess.PIPE, pass_fds=(status_w,))
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        reader = threading.Thread(target=_drain, args=(status_r, status), daemon=True,
                                  name="gpg status")
        reader.start()
        try:
            out, err = proc.communicate(message, timeout=DECRYPT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise GpgError("gpg timed out decrypting the secret") from None
        finally:
            self._reaped(proc)
            reader.join()
        why = refusal(bytes(status), self.fingerprints)
        if why is not None:
            raise NotForUs(f"refused the secret: {why}")
        if proc.returncode != 0 or not out:
            raise GpgError(f"cannot decrypt the secret: {_last_line(err) or 'gpg failed'}")
        return Secret(out)

    def close(self) -> None:
        """Stop our gpg processes and gpg-agent, remove the home.  Idempotent; never raises."""
        with self._lock:
            self._closed = True
            procs = list(self._procs)
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)
        self._import = None
        gpghome.remove(self.home)

    def __enter__(self) -> Decryptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
