"""Test-only entry point: ``luks-passphrase`` that SIGKILLs itself right after one step.

    python tests/crashpoint_runner.py STEP [luks-passphrase arguments...]

It installs a hook on the flows' step announcements (``luks_passphrase.flows.
step_hooks``) and then runs the real program's ``main()``.  The production
program has no such switch and reads none from the environment; only this
file, which is never installed, can make it die mid-change.  Exit status: the
program's, or death by SIGKILL at STEP; 99 if STEP was never reached.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from luks_passphrase import flows  # noqa: E402
from luks_passphrase.__main__ import main  # noqa: E402

STEP_NOT_REACHED = 99


def run(step: str, argv: list[str]) -> int:
    def kill_at(name: str) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    flows.step_hooks.append(kill_at)
    rc = main(argv)
    return STEP_NOT_REACHED if rc == 0 else rc


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
