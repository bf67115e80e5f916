"""Process hardening every program here applies first thing: no core dumps.

The agent and ``mandos-client`` hold the plaintext passphrase, ``luks-passphrase``
a volume key, ``mandosd`` and ``mandos-keygen`` private keys.  A core dump would
write them to disk (``/var/lib/systemd/coredump``, or ``core`` in the working
directory), so :func:`disable_core_dumps` sets ``RLIMIT_CORE`` to 0 (soft and
hard: the process cannot raise it again) and marks the process not dumpable
(``PR_SET_DUMPABLE`` 0), which also stops other processes of the same user
from attaching with ptrace or reading its ``/proc/PID/mem``.  The units say
``LimitCORE=0`` as well.

Standard library only (the initrd imports it).  It must never fail a program:
where a call is refused it is skipped.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource

PR_SET_DUMPABLE = 4


def disable_core_dumps() -> None:
    """No core file, not dumpable, not ptrace-able by the same user: call first in main()."""
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
