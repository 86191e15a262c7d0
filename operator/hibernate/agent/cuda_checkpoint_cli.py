"""A stand-in for NVIDIA's `cuda-checkpoint` binary, built on the driver API (cuda.py).

CRIU's cuda_plugin does not call the driver: it executes `cuda-checkpoint` from PATH and
disables itself when the binary is missing, and NVIDIA's binary is not on our GPU nodes
(notes/checkpointing.md, "GPU (b)"). The plugin uses exactly this interface:

    cuda-checkpoint -h                          (the output must mention --action)
    cuda-checkpoint --get-state --pid P         (prints running|locked|checkpointed|failed)
    cuda-checkpoint --get-restore-tid --pid P   (prints the thread id)
    cuda-checkpoint --action lock|checkpoint|restore|unlock --pid P [--timeout MS]

plus `--toggle --pid P` (running <-> checkpointed), as NVIDIA's binary has. Values go to stdout
alone, so the plugin's atoi/strncmp parse them; errors go to stderr with exit status 1.
Installed as the console script `cuda-checkpoint` (entry point
`hibernate.agent.cuda_checkpoint_cli:main`), or run as `python -m hibernate.agent.cuda_checkpoint_cli`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hibernate.agent import cuda

ACTIONS = ("lock", "checkpoint", "restore", "unlock")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cuda-checkpoint",
        description=(
            "Checkpoint and restore the CUDA state of a running process through the CUDA driver API "
            "(hibernate's stand-in for NVIDIA's cuda-checkpoint)."
        ),
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--toggle", action="store_true", help="checkpoint a running process, or restore a checkpointed one"
    )
    mode.add_argument("--get-state", action="store_true", help="print running|locked|checkpointed|failed")
    mode.add_argument(
        "--get-restore-tid", action="store_true", help="print the process's CUDA restore thread id"
    )
    mode.add_argument("--action", choices=ACTIONS, help="run one step: lock, checkpoint, restore or unlock")
    parser.add_argument("--pid", "-p", type=int, required=True, help="the process id")
    parser.add_argument(
        "--timeout",
        "-t",
        type=int,
        default=0,
        metavar="MS",
        help="lock timeout in milliseconds (lock and toggle; 0 waits forever)",
    )
    return parser


def main(argv: Sequence[str] | None = None, api: cuda.CheckpointApi | None = None) -> int:
    """Run the CLI; returns the exit status. `api` lets tests inject a fake driver."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # -h (0) and usage errors (2) end here; return instead of exiting
        return exc.code if isinstance(exc.code, int) else 1
    if args.pid <= 0:
        print(f"cuda-checkpoint: invalid pid {args.pid}", file=sys.stderr)
        return 2
    try:
        # Never fall back to a `cuda-checkpoint` on PATH: that could be this very program.
        driver = api if api is not None else cuda.load_api(allow_cli=False)
        return _dispatch(driver, args)
    except cuda.CudaError as exc:
        print(f"cuda-checkpoint: {exc}", file=sys.stderr)
        return 1


def _dispatch(api: cuda.CheckpointApi, args: argparse.Namespace) -> int:
    pid: int = args.pid
    if args.get_state:
        print(api.get_state(pid).value)
    elif args.get_restore_tid:
        print(api.restore_thread_id(pid))
    elif args.action == "lock":
        api.lock(pid, max(0, args.timeout))
    elif args.action in ACTIONS:
        getattr(api, args.action)(pid)
    else:
        _toggle(api, pid, args.timeout)
    return 0


def _toggle(api: cuda.CheckpointApi, pid: int, timeout_ms: int) -> None:
    state = api.get_state(pid)
    if state is cuda.ProcessState.RUNNING:
        cuda.suspend_all([pid], timeout_ms / 1000, api=api)
    elif state is cuda.ProcessState.CHECKPOINTED:
        cuda.resume_all([pid], api=api)
    else:
        # A locked process is half way; which way to go is the caller's call, not a toggle's.
        raise cuda.CudaError(
            f"pid {pid} is {state.value}: --toggle needs running or checkpointed; use --action"
        )


if __name__ == "__main__":
    sys.exit(main())
