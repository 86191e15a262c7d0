"""Named fault points: a test arms one by name and the process SIGKILLs itself right there.

`HIBERNATE_FAULTS=agent.after-lock,operator.mid-propagate` arms points. Nothing happens when the
variable is unset, so the calls cost one dict lookup in production. Deterministic crash tests need
this: a kill "somewhere around" a step, timed by sleeps, tests luck rather than recovery.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "HIBERNATE_FAULTS"


def armed() -> set[str]:
    return {name.strip() for name in os.environ.get(ENV, "").split(",") if name.strip()}


def fault_point(name: str) -> None:
    """Die here, without any cleanup, if the point `name` is armed."""
    if name in armed():
        print(f"fault point {name} armed: SIGKILL", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
