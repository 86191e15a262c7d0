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

# Every named point, in the order a transition passes them. tests/test_faults.py checks that each
# name is used in the code and armed by the suite, and that the code uses no name missing here.
FAULT_POINTS: tuple[str, ...] = (
    # node agent (worker.py, levels.py, cuda.py, criu.py)
    "agent.after-start-report",  # Sleeping/Waking and the operation written, nothing done yet
    "agent.after-engine-sleep",  # levels 3-4: the engine slept (1 or 2), CUDA untouched
    "agent.cuda-after-lock",  # suspend_all: every process locked, none checkpointed
    "agent.after-cuda-suspend",  # every process checkpointed; level 4: criu not started
    "agent.criu-dump-running",  # criu dump started; the agent dies, criu goes on
    "agent.criu-after-dump",  # criu dump done: a complete image in the temporary directory
    "agent.zero-pages-after-rename",  # a page map rewritten without zero pages; the old pages file still there
    "agent.shrink-before-exchange",  # behind a Checkpoint sleep: the shrunk copy complete beside the image
    "agent.after-dump",  # the image renamed into place; the engine gone
    "agent.criu-restore-running",  # criu restore started; the agent dies, criu goes on
    "agent.after-restore",  # the engine restored, CUDA still checkpointed, image still there
    "agent.cuda-after-restore",  # resume_all: every process restored, none unlocked
    "agent.after-cuda-resume",  # CUDA running again; the engine still asleep
    "agent.before-report",  # the operation done, its result not written
    # node agent: a restore into a new pod from a snapshot (agent/snapshot.py; criu's own step is
    # agent.criu-restore-running above)
    "agent.snapshot-after-claim",  # the new pod's restore claimed (signed), nothing restored yet
    "agent.snapshot-before-tell",  # the engine restored and checked; the pod's init not told
    # node agent: a failed sleep's escalation (worker.py `_escalate`)
    "agent.before-escalation-step",  # a sleep failed and was not undone; the next step reported, not begun
    # node agent: the wake check (wakecheck.py), cold starts (coldstart.py), the image sweep (sweep.py)
    "agent.after-wake-reference",  # before a sleep at 3-4: the engine's answer recorded, the sleep not begun
    "agent.before-wake-check",  # woken from 3-4; the answer not yet compared with the one before the sleep
    "agent.discard-after-report",  # a cold start written as under way; the image and the engine untouched
    "agent.discard-after-image",  # the old engine ended and its image removed; the marker still holds the init
    "agent.sweep-after-remove",  # the sweep removed the images of one pod that is gone, not yet the others
    # operator (controller/reconcile.py)
    "operator.after-deployment",  # Deployment applied, Service not
    "operator.mid-propagate",  # the level written on one pod, not on the others
    "operator.before-status",  # pods done, status not written
    "operator.after-status",  # status written, its Events not posted
)


def armed() -> set[str]:
    return {name.strip() for name in os.environ.get(ENV, "").split(",") if name.strip()}


def fault_point(name: str) -> None:
    """Die here, without any cleanup, if the point `name` is armed."""
    if name in armed():
        print(f"fault point {name} armed: SIGKILL", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
