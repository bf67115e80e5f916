"""Text from peers, made safe for a terminal.  Stdlib only.

A host name in an escrow packet, a client name in a section made on the
client: whatever a machine chose reaches an operator's terminal.  Terminal
escapes (``\\x1b[2K``), carriage returns and bidirectional overrides could
rewrite what the operator sees, so every such field is printed through
:func:`printable`, which shows each non-printable character as a Python-style
escape and doubles backslashes, so the escaped form cannot be forged either.
"""

from __future__ import annotations

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    if c == " " or c.isprintable():
        return c
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def printable(value: object) -> str:
    """*value* as text with every non-printable character (and ``\\``) escaped."""
    text = str(value)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(c) for c in text)
