"""The client side of the Mandos protocol: the ask-password agent and ``mandos-client``.

This package runs in the initrd, so it imports only the standard library, the
shared core (:mod:`mandos_core`) and the ``gpg`` binary.  It must never import
:mod:`mandosd` or ``cryptography``.
"""
