"""The shared core at the bottom of the house.

The wire protocol and ``key_id`` (:mod:`.protocol`), the TLS layer over GnuTLS
(:mod:`.gnutls`, :mod:`.tls`), the client's key files (:mod:`.keyfiles`), server
addresses (:mod:`.address`), the :class:`~.secret.Secret` type, logging and the
one subprocess helper (:mod:`.log`, :mod:`.run`), and the escrow wire and packet
formats.  The agent, the server and the tools stand on it; it imports none of them.

The initrd imports parts of this package: apart from :mod:`.escrow_packet`
(which the initrd never loads) it is standard library only, plus libgnutls
through ctypes.  It must never import ``mandosd`` or ``cryptography``.
"""

#: This project's version, in one place (setup.cfg reads it: ``attr: mandos_core.__version__``).
__version__ = "0.1.0"
