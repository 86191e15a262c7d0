"""A hostile engine for the real-node walk (tests/e2e/hostile.py): the fake vLLM engine, which,
once it serves, replaces what it can reach in its own container with recorders and plants symlinks
at every path the node agent touches, pointing at canary files on the host.

Runs inside the engine container as `python3 /hostile/hostile_engine.py <fake engine args>`, from an
image that holds /hostile/recorder and /hostile/librecorder.so (tests/hostile/recorder.c). The
canary directory on the host comes in $HOSTILE_CANARY. Writes /hostile/planted when done.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import shutil
import sys
import threading
import time
import urllib.request

CANARY = os.environ.get("HOSTILE_CANARY", "/var/lib/hibernate-e2e-canary")
RECORDER = "/hostile/recorder"
LIBRARY = "/hostile/librecorder.so"


def replace(path: str, source: str) -> None:
    """Puts a copy of `source` at `path`, whatever was there (a file or a symlink)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    shutil.copyfile(source, path)
    os.chmod(path, 0o755)


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with open(path, "w") as f:
        f.write(text)


def link(path: str, target: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.symlink(target, path)


def plant() -> None:
    for _ in range(600):  # until the engine serves: the agent only acts on a running engine
        with contextlib.suppress(OSError):
            urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=1).close()
            break
        time.sleep(0.2)
    # The dynamic loader every new program of this container names (a symlink on Debian, so the
    # running engine, which has the real file mapped, stays dumpable), and the python3s on PATH.
    for path in ("/lib64/ld-linux-x86-64.so.2", "/usr/local/bin/python3", "/usr/bin/python3"):
        replace(path, RECORDER)
    # Where an agent that copied CRIU into the pod ran it from (hibernate before issue 14).
    for tool in ("criu", "setsid", "cuda-checkpoint"):
        replace(f"/.hibernate/criu/bin/{tool}", RECORDER)
    write("/etc/ld.so.preload", f"{LIBRARY}\n")
    replace("/usr/lib/criu/hostile.so", LIBRARY)
    write("/etc/criu/default.conf", f"action-script {RECORDER}\n")
    write(
        "/etc/nsswitch.conf", "".join(f"{db}: hostile\n" for db in ("passwd", "group", "hosts", "services"))
    )
    replace("/usr/lib/x86_64-linux-gnu/libnss_hostile.so.2", LIBRARY)
    # Every path the agent writes in the pod, as a symlink to a host file.
    link("/.hibernate/checkpointed", f"{CANARY}/canary")
    link("/.hibernate/criu-work", f"{CANARY}/dir")
    write("/hostile/planted", f"{time.time()}\n")
    print("hostile engine: planted", flush=True)


threading.Thread(target=plant, name="plant", daemon=True).start()
sys.argv = ["hibernate.engine.fake", *sys.argv[1:]]
runpy.run_module("hibernate.engine.fake", run_name="__main__", alter_sys=True)
