"""Client side of the Mandos protocol: the ask-password agent and ``mandos-client``.

This package runs in the initrd, so it imports only the standard library and
python-gnupg.  It must never import :mod:`mandosd`.
"""

from pathlib import Path

#: Where the client's keys live, with Mandos's file names.
DEFAULT_KEYDIR = Path("/etc/keys/mandos")
