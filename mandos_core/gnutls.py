"""A small, typed ctypes binding to the few GnuTLS calls protocol 1 needs.

Why GnuTLS: Mandos 1.8 clients present an RFC 7250 raw public key
(``CTYPE-RAWPK``), which Python's ``ssl`` (OpenSSL 3.0) cannot negotiate.
libgnutls30 is on every Debian system and is what Mandos itself uses.  No
maintained Python binding supports raw public keys and non-blocking use, so
this module binds the ~25 functions needed, nothing more.

Rules this module keeps:

- Every GnuTLS object has one Python owner with an idempotent ``close()`` (also
  run by ``__del__`` as a last resort), so no path leaks a session or a
  credential.
- Sessions are always non-blocking (``GNUTLS_NONBLOCK``): callers wait for the
  socket themselves (``poll`` in the client, the asyncio loop in the server),
  so a stalled peer can never block a thread or the loop.
- Errors are :class:`GnuTLSError` with GnuTLS's own code and name
  (``GNUTLS_E_PK_SIG_VERIFY_FAILED``), which the server's audit reasons use.

Standard library only: the initrd agent imports this module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

# gnutls/gnutls.h
SERVER = 1
CLIENT = 1 << 1
NONBLOCK = 1 << 3
NO_SIGNAL = 1 << 6
NO_TICKETS = 1 << 10
KEY_SHARE_TOP = 1 << 11
ENABLE_RAWPK = 1 << 18

CRD_CERTIFICATE = 1
X509_FMT_PEM = 1
CERT_REQUEST = 1
CERTIFICATE_SKIP_KEY_CERT_MATCH = 1
SHUT_RDWR = 0
SHUT_WR = 1

CRT_X509 = 1
CRT_RAWPK = 3
CTYPE_PEERS = 3

TLS1_3 = 5  # gnutls_protocol_t

E_AGAIN = -28
E_INTERRUPTED = -52
E_PREMATURE_TERMINATION = -110

#: The oldest GnuTLS with raw public keys (RFC 7250).
RAWPK_VERSION = b"3.6.6"


class GnuTLSError(Exception):
    """A GnuTLS call failed.  ``code`` is GnuTLS's, ``name`` its symbolic name."""

    def __init__(self, code: int, where: str = "") -> None:
        self.code = code
        self.name = error_name(code)
        self.where = where
        text = strerror(code)
        super().__init__(f"{where}: {text}" if where else text)

    @property
    def reason(self) -> str:
        """A short, stable token for audit logs: ``pk-sig-verify-failed``."""
        return self.name.removeprefix("GNUTLS_E_").lower().replace("_", "-")


class _Datum(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_uint)]


_session_t = ctypes.c_void_p
_cred_t = ctypes.c_void_p


def _load() -> ctypes.CDLL:
    for name in ("libgnutls.so.30", ctypes.util.find_library("gnutls")):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise ImportError("libgnutls.so.30 not found (install libgnutls30)")


_lib = _load()


def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_check_version = _fn("gnutls_check_version", ctypes.c_char_p, ctypes.c_char_p)
_strerror = _fn("gnutls_strerror", ctypes.c_char_p, ctypes.c_int)
_strerror_name = _fn("gnutls_strerror_name", ctypes.c_char_p, ctypes.c_int)
_cert_alloc = _fn("gnutls_certificate_allocate_credentials", ctypes.c_int,
                  ctypes.POINTER(_cred_t))
_cert_free = _fn("gnutls_certificate_free_credentials", None, _cred_t)
_cert_set_flags = _fn("gnutls_certificate_set_flags", None, _cred_t, ctypes.c_uint)
_set_rawpk = _fn("gnutls_certificate_set_rawpk_key_mem", ctypes.c_int, _cred_t,
                 ctypes.POINTER(_Datum), ctypes.POINTER(_Datum), ctypes.c_int,
                 ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
_set_x509 = _fn("gnutls_certificate_set_x509_key_mem", ctypes.c_int, _cred_t,
                ctypes.POINTER(_Datum), ctypes.POINTER(_Datum), ctypes.c_int)
_init = _fn("gnutls_init", ctypes.c_int, ctypes.POINTER(_session_t), ctypes.c_uint)
_deinit = _fn("gnutls_deinit", None, _session_t)
_priority_set_direct = _fn("gnutls_priority_set_direct", ctypes.c_int, _session_t,
                           ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p))
_priority_t = ctypes.c_void_p
_priority_init = _fn("gnutls_priority_init", ctypes.c_int, ctypes.POINTER(_priority_t),
                     ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p))
_priority_deinit = _fn("gnutls_priority_deinit", None, _priority_t)
_priority_set = _fn("gnutls_priority_set", ctypes.c_int, _session_t, _priority_t)
_credentials_set = _fn("gnutls_credentials_set", ctypes.c_int, _session_t, ctypes.c_int,
                       _cred_t)
_transport_set_int2 = _fn("gnutls_transport_set_int2", None, _session_t, ctypes.c_int,
                          ctypes.c_int)
_handshake = _fn("gnutls_handshake", ctypes.c_int, _session_t)
_record_send = _fn("gnutls_record_send", ctypes.c_ssize_t, _session_t, ctypes.c_char_p,
                   ctypes.c_size_t)
_record_recv = _fn("gnutls_record_recv", ctypes.c_ssize_t, _session_t, ctypes.c_void_p,
                   ctypes.c_size_t)
_record_get_direction = _fn("gnutls_record_get_direction", ctypes.c_int, _session_t)
_bye = _fn("gnutls_bye", ctypes.c_int, _session_t, ctypes.c_int)
_ctype_get2 = _fn("gnutls_certificate_type_get2", ctypes.c_int, _session_t, ctypes.c_int)
_get_peers = _fn("gnutls_certificate_get_peers", ctypes.POINTER(_Datum), _session_t,
                 ctypes.POINTER(ctypes.c_uint))
_protocol_get_version = _fn("gnutls_protocol_get_version", ctypes.c_int, _session_t)
_server_set_request = _fn("gnutls_certificate_server_set_request", None, _session_t,
                          ctypes.c_int)

if not _check_version(RAWPK_VERSION):
    raise ImportError(f"GnuTLS {RAWPK_VERSION.decode()} or later is needed for raw public keys")


def version() -> str:
    v = _check_version(None)
    return v.decode() if v else "?"


def strerror(code: int) -> str:
    s = _strerror(code)
    return s.decode("utf-8", "replace") if s else f"GnuTLS error {code}"


def error_name(code: int) -> str:
    s = _strerror_name(code)
    return s.decode("ascii", "replace") if s else f"GNUTLS_E_{-code}"


def _check(code: int, where: str) -> int:
    if code < 0:
        raise GnuTLSError(code, where)
    return code


def _datum(data: bytes) -> tuple[_Datum, Any]:
    buf = ctypes.create_string_buffer(data, len(data))
    return _Datum(ctypes.cast(buf, ctypes.c_void_p), len(data)), buf


class Credentials:
    """Certificate credentials: our raw public key (or X.509 certificate) and its key.

    Without a key, the credentials only let the session accept a peer's key.
    """

    def __init__(self) -> None:
        self._ptr = _cred_t()
        _check(_cert_alloc(ctypes.byref(self._ptr)), "allocating credentials")

    @property
    def ptr(self) -> _cred_t:
        if not self._ptr:
            raise ValueError("credentials already freed")
        return self._ptr

    def set_rawpk(self, spki_pem: bytes, key_pem: bytes, *, skip_match: bool = False) -> None:
        """Present *spki_pem* (``PUBLIC KEY`` PEM) as our raw public key, signing with *key_pem*.

        *skip_match* exists for attack tests only: present one key, sign with another.
        """
        if skip_match:
            _cert_set_flags(self.ptr, CERTIFICATE_SKIP_KEY_CERT_MATCH)
        spki, b1 = _datum(spki_pem)
        key, b2 = _datum(key_pem)
        try:
            _check(_set_rawpk(self.ptr, ctypes.byref(spki), ctypes.byref(key), X509_FMT_PEM,
                              None, 0, None, 0, 0), "loading the raw public key")
        finally:
            ctypes.memset(b2, 0, len(b2))  # our copy of the private key
            del b1

    def set_x509(self, cert_pem: bytes, key_pem: bytes, *, skip_match: bool = False) -> None:
        """Present an X.509 certificate (legacy clients and attack tests)."""
        if skip_match:
            _cert_set_flags(self.ptr, CERTIFICATE_SKIP_KEY_CERT_MATCH)
        cert, b1 = _datum(cert_pem)
        key, b2 = _datum(key_pem)
        try:
            _check(_set_x509(self.ptr, ctypes.byref(cert), ctypes.byref(key), X509_FMT_PEM),
                   "loading the certificate")
        finally:
            ctypes.memset(b2, 0, len(b2))
            del b1

    def close(self) -> None:
        if self._ptr:
            _cert_free(self._ptr)
            self._ptr = _cred_t()

    def __enter__(self) -> Credentials:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Priority:
    """A priority string parsed once (``gnutls_priority_init``), for many sessions.

    A server that makes a session per connection sets this instead of the string,
    which GnuTLS would otherwise parse again for every session.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._ptr = _priority_t()
        err = ctypes.c_char_p()
        code = _priority_init(ctypes.byref(self._ptr), text.encode(), ctypes.byref(err))
        if code < 0:
            at = err.value.decode("ascii", "replace") if err.value else ""
            self._ptr = _priority_t()
            raise PriorityError(text, at, code)

    @property
    def ptr(self) -> _priority_t:
        if not self._ptr:
            raise ValueError("priority cache already freed")
        return self._ptr

    def close(self) -> None:
        if self._ptr:
            _priority_deinit(self._ptr)
            self._ptr = _priority_t()

    def __enter__(self) -> Priority:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Session:
    """One non-blocking TLS session on a socket's file descriptor.

    The caller owns the socket and waits on it: every method either completes
    or raises :class:`WouldBlock`, whose ``write`` says which way to wait.
    """

    def __init__(self, fd: int, *, server: bool, credentials: Credentials,
                 priority: str | Priority, request_peer_key: bool = False,
                 extra_flags: int = 0) -> None:
        """*priority*: a string, or a :class:`Priority` parsed once (kept alive here).
        *extra_flags*: more ``gnutls_init`` flags, such as :data:`KEY_SHARE_TOP`."""
        self._ptr = _session_t()
        flags = ((SERVER if server else CLIENT) | NONBLOCK | NO_SIGNAL | NO_TICKETS
                 | ENABLE_RAWPK | extra_flags)
        _check(_init(ctypes.byref(self._ptr), flags), "creating a TLS session")
        try:
            if isinstance(priority, Priority):
                _check(_priority_set(self._ptr, priority.ptr), "setting the priorities")
            else:
                err = ctypes.c_char_p()
                code = _priority_set_direct(self._ptr, priority.encode(), ctypes.byref(err))
                if code < 0:
                    at = err.value.decode("ascii", "replace") if err.value else ""
                    raise PriorityError(priority, at, code)
            _check(_credentials_set(self._ptr, CRD_CERTIFICATE, credentials.ptr),
                   "setting credentials")
            if server and request_peer_key:
                _server_set_request(self._ptr, CERT_REQUEST)
            _transport_set_int2(self._ptr, fd, fd)
        except BaseException:
            self.close()
            raise
        self._credentials = credentials  # keep alive as long as the session
        self._priority = priority

    @property
    def ptr(self) -> _session_t:
        if not self._ptr:
            raise ValueError("TLS session already closed")
        return self._ptr

    def _again(self, code: int, where: str) -> None:
        if code in (E_AGAIN, E_INTERRUPTED):
            raise WouldBlock(bool(_record_get_direction(self.ptr)))
        raise GnuTLSError(code, where)

    def handshake(self) -> None:
        code = _handshake(self.ptr)
        if code < 0:
            self._again(code, "TLS handshake")

    def send(self, data: bytes) -> int:
        n = _record_send(self.ptr, data, len(data))
        if n < 0:
            self._again(n, "TLS send")
        return n

    def recv(self, size: int = 16384) -> bytes:
        """Return up to *size* bytes; ``b""`` when the peer closed (cleanly or not)."""
        buf = ctypes.create_string_buffer(size)
        n = _record_recv(self.ptr, buf, size)
        if n == E_PREMATURE_TERMINATION:
            return b""
        if n < 0:
            self._again(n, "TLS receive")
        return buf.raw[:n]

    def bye(self) -> None:
        """Send close_notify (our side only; never wait for the peer's)."""
        code = _bye(self.ptr, SHUT_WR)
        if code < 0:
            self._again(code, "TLS close")

    def version_is_tls13(self) -> bool:
        return _protocol_get_version(self.ptr) == TLS1_3

    def peer_certificate_type(self) -> int:
        return int(_ctype_get2(self.ptr, CTYPE_PEERS))

    def peer_certificate(self) -> bytes | None:
        """The peer's first certificate as sent: DER X.509, or DER SPKI for a raw key."""
        n = ctypes.c_uint(0)
        lst = _get_peers(self.ptr, ctypes.byref(n))
        if not lst or n.value == 0:
            return None
        d = lst[0]
        if not d.data or d.size == 0:
            return None
        return ctypes.string_at(d.data, d.size)

    def close(self) -> None:
        if self._ptr:
            _deinit(self._ptr)
            self._ptr = _session_t()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class WouldBlock(Exception):
    """The call needs the socket to be readable (``write`` False) or writable."""

    def __init__(self, write: bool) -> None:
        super().__init__("would block")
        self.write = write


class PriorityError(ValueError):
    def __init__(self, priority: str, at: str, code: int) -> None:
        where = f" at {at!r}" if at else ""
        super().__init__(f"not a valid GnuTLS priority string{where}: {strerror(code)}")
        self.priority = priority
        self.code = code
