"""A container for secrets that cannot be printed by accident."""

from __future__ import annotations


class Secret:
    """Bytes that never show up in ``repr``, ``str`` or f-strings.

    The value lives in a :class:`bytearray` so :meth:`wipe` can overwrite it.
    Python may still hold copies elsewhere (sockets, gpg output); wiping is
    best effort, as far as the language allows.
    """

    __slots__ = ("_buf",)

    def __init__(self, value: bytes | bytearray) -> None:
        self._buf = bytearray(value)

    def reveal(self) -> bytes:
        """Return the plaintext.  Call sites of this are the audit surface."""
        return bytes(self._buf)

    def prefixed(self, prefix: bytes) -> bytearray:
        """A new bytearray *prefix* + plaintext (for wire formats); the caller wipes it."""
        out = bytearray(prefix)
        out += self._buf
        return out

    def __len__(self) -> int:
        return len(self._buf)

    def __bool__(self) -> bool:
        return bool(self._buf)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        import hmac

        return hmac.compare_digest(bytes(self._buf), bytes(other._buf))

    __hash__ = None  # type: ignore[assignment]

    def wipe(self) -> None:
        for i in range(len(self._buf)):
            self._buf[i] = 0
        self._buf.clear()

    def __repr__(self) -> str:
        return f"<Secret: {len(self._buf)} bytes>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __enter__(self) -> Secret:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()
