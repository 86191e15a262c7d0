"""Start the fake vLLM engine (`python -m hibernate.engine.fake`) as a real process for tests.

    from tests.engine_fixtures import start_fake_engine

    with start_fake_engine("--api", "0.30", weights_mib=32) as engine:
        url, process = engine          # or engine.url, engine.process, engine.rss_bytes()

Or, with `pytest_plugins = ["tests.engine_fixtures"]` in a conftest, the `fake_engine` fixture (defaults)
and `fake_engine_factory` (call it with the same arguments as `start_fake_engine`).

The engine listens on a free loopback port, logs to a file opened for appending and reads stdin
from /dev/null in a session of its own (what CRIU wants); it is stopped with SIGTERM at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ports import free_port

OPERATOR_DIR = Path(__file__).resolve().parents[1] / "operator"
# The fake engine as a simulated pod's command (hibernate.localnode.simpod), on the pod's port 8000.
SIMPOD_ENGINE = [
    sys.executable,
    "-m",
    "hibernate.engine.fake",
    "--model",
    "tiny",
    "--port",
    "8000",
    "--weights-mib",
    "8",
]


@dataclass(frozen=True)
class FakeEngine:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def __iter__(self) -> Iterator[Any]:
        """`url, process = engine`."""
        return iter((self.url, self.process))

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        """VmRSS of the engine process, read by the test from /proc, not from the engine."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


PROMPT = "The capital of France is"


def complete(url: str, prompt: str = PROMPT, max_tokens: int = 8) -> str:
    """One completion from an engine at `url` (fake model name), its text."""
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": "fake-model", "prompt": prompt, "max_tokens": max_tokens},
        timeout=30,
    )
    r.raise_for_status()
    text: str = r.json()["choices"][0]["text"]
    return text


@contextmanager
def start_fake_engine(
    *args: str,
    model: str = "fake-model",
    weights_mib: int = 32,
    kv_mib: int = 8,
    sleep_mode: bool = True,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 20.0,
) -> Iterator[FakeEngine]:
    """Run the fake engine until the block ends; `args` come last, so they override the defaults."""
    with tempfile.TemporaryDirectory(prefix="fake-engine-") as workdir:
        log_path = Path(workdir) / "engine.log"
        for _ in range(3):  # another process may take the free port between the probe and the bind
            port = free_port()
            command = [
                sys.executable,
                "-m",
                "hibernate.engine.fake",
                *("--model", model, "--host", "127.0.0.1", "--port", str(port)),
                *("--weights-mib", str(weights_mib), "--kv-mib", str(kv_mib)),
                *(["--enable-sleep-mode"] if sleep_mode else []),
                *args,
            ]
            engine = _spawn(command, log_path, env)
            try:
                if _wait_healthy(engine, startup_timeout):
                    break
            except BaseException:
                _stop(engine.process)
                raise
        else:
            raise RuntimeError(f"the fake engine could not bind a port:\n{log_path.read_text()}")
        try:
            yield engine
        finally:
            _stop(engine.process)
            # Shown by pytest only for a failing test.
            print(f"--- fake engine log ({' '.join(command[3:])}) ---\n{engine.log()}")


def _spawn(command: list[str], log_path: Path, env: Mapping[str, str] | None) -> FakeEngine:
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(OPERATOR_DIR), os.environ.get("PYTHONPATH")])
    )
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=environment,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
    return FakeEngine(url, process, log_path)


def _wait_healthy(engine: FakeEngine, timeout: float) -> bool:
    """True once /health answers 200; False if the engine exited because its port was taken."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            if "Address already in use" in engine.log():
                return False
            raise RuntimeError(f"the fake engine exited with {engine.process.returncode}:\n{engine.log()}")
        try:
            if httpx.get(f"{engine.url}/health", timeout=1.0).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"the fake engine did not answer /health within {timeout:g}s:\n{engine.log()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def fake_engine() -> Iterator[FakeEngine]:
    with start_fake_engine() as engine:
        yield engine


@pytest.fixture
def fake_engine_factory() -> Iterator[Callable[..., FakeEngine]]:
    with ExitStack() as stack:

        def start(*args: str, **options: object) -> FakeEngine:
            return stack.enter_context(start_fake_engine(*args, **options))  # type: ignore[arg-type]

        yield start
