"""The reference engine (hibernate.engine.reference): a real torch transformer behind vLLM's sleep API.

On CPU (skipped without torch): safetensors files written and read by hand, weights saved once
and loaded back with several readers, the same tokens before a sleep and after a wake at levels 1
and 2, garbage after a level-2 wake without a reload, requests held while asleep. The tests
marked gpu run the engine on cuda:0 and check that level 1 gives back the GPU memory of the
weights and the KV cache. Everything talks to a subprocess with urllib, and nothing here imports
kubernetes, httpx or torch at module level, so the GPU machine runs them with only torch:

    PYTHONPATH=operator python3 -m pytest --noconftest -p no:cacheprovider -m gpu -s tests/test_reference_engine.py
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hibernate.engine import reference_safetensors as st

OPERATOR_DIR = Path(__file__).resolve().parent.parent / "operator"
HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
GIB = 2**30
PROMPT = "t3 t1 t4 the reference engine t15"


# --- safetensors by hand (no torch needed) -----------------------------------------------------------


def test_safetensors_roundtrip_and_layout(tmp_path: Path) -> None:
    tensors = {
        "a": ("BF16", (2, 3), bytes(range(12))),
        "b": ("F32", (4,), b"\x01" * 16),
        "empty": ("I64", (0, 5), b""),
    }
    path = tmp_path / "x.safetensors"
    st.save_bytes(path, tensors, {"format": "test"})
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    assert (8 + size) % 8 == 0  # the data section starts aligned
    header = json.loads(raw[8 : 8 + size])
    assert header["__metadata__"] == {"format": "test"}
    assert header["a"] == {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}
    assert header["b"]["data_offsets"] == [12, 28]
    loaded, meta = st.load_bytes(path)
    assert meta == {"format": "test"}
    assert loaded == {name: (dtype, shape, data) for name, (dtype, shape, data) in tensors.items()}
    parsed = st.read_header(path)
    assert parsed.data_offset == 8 + size and parsed.data_bytes == 28


def test_safetensors_refuses_broken_files(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    st.save_bytes(path, {"a": ("F16", (4,), b"\0" * 8)})
    good = path.read_bytes()
    path.write_bytes(good[:-1])  # truncated data
    with pytest.raises(st.SafetensorsError, match="data section"):
        st.read_header(path)
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(st.SafetensorsError, match="implausibly large"):
        st.read_header(path)
    bad = st.encode_header([st.TensorEntry("a", "F16", (4,), 0, 6)])  # 6 bytes for 4 x F16
    path.write_bytes(bad + b"\0" * 6)
    with pytest.raises(st.SafetensorsError, match="expected 8"):
        st.read_header(path)
    with pytest.raises(st.SafetensorsError, match="wrote 4 data bytes"):
        st.write_file(tmp_path / "y.safetensors", st.layout([("a", "F16", (4,))]), [b"\0" * 4])
    assert not list(tmp_path.glob(".y.safetensors*"))  # no partial file left behind


def test_safetensors_readable_by_the_real_package(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    safetensors = pytest.importorskip("safetensors")
    path = tmp_path / "x.safetensors"
    st.save_bytes(
        path, {"w": ("F32", (2, 2), b"\0\0\x80\x3f" * 4), "b": ("BF16", (1,), b"\x80\x3f")}, {"k": "v"}
    )
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert f.get_tensor("w").tolist() == [[1.0, 1.0], [1.0, 1.0]]
        assert f.get_tensor("b").float().tolist() == [1.0]


# --- the model and its weights in-process (torch on CPU) -------------------------------------------


@needs_torch
def test_model_size_and_shards() -> None:
    from hibernate.engine.reference_model import ModelConfig
    from hibernate.engine.reference_weights import plan_shards

    for gib in (0.004, 2, 16, 64):
        cfg = ModelConfig.for_size(int(gib * GIB))
        layer = 12 * cfg.hidden**2 * cfg.element_bytes
        assert abs(cfg.weights_bytes - gib * GIB) <= layer / 2 + 1, (gib, cfg)
        assert cfg.layers >= 4
    cfg = ModelConfig.for_size(16 * GIB)
    shards = plan_shards(cfg)
    assert sum(s.nbytes for s in shards) == cfg.weights_bytes
    assert all(s.nbytes <= 2 * GIB for s in shards)
    assert [p.name for s in shards for p in s.params] == [name for name, _ in cfg.param_shapes()]


@needs_torch
def test_weights_saved_once_and_loaded_with_any_reader_count(tmp_path: Path) -> None:
    import torch  # type: ignore[import-not-found,unused-ignore]

    from hibernate.engine.reference_model import MIB, ModelConfig
    from hibernate.engine.reference_weights import WeightStore

    cfg = ModelConfig.for_size(3 * MIB, seed=7)
    cpu = torch.device("cpu")

    def store() -> WeightStore:
        return WeightStore(cfg, cpu, shard_bytes=MIB, staging_bytes=256 * 1024)

    first = store()
    assert not first.files_match(tmp_path)
    first.generate()
    want = first.checksum()
    first.save(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == len(first.shards) > 1
    assert first.files_match(tmp_path)
    for readers in (1, 3, 8):
        again = store()
        again.load(tmp_path, readers)
        assert again.checksum() == want
    other = WeightStore(ModelConfig.for_size(3 * MIB, seed=8), cpu, shard_bytes=MIB)
    assert not other.files_match(tmp_path)  # another seed: regenerate, do not reuse
    # Level 1 in-process: offload, free, copy back.
    first.offload()
    assert not first.resident and first.host_valid
    first.restore()
    assert first.checksum() == want


# --- the engine as a process -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Engine:
    def __init__(self, tmp: Path, device: str, weights_gib: float, kv_gib: float, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"engine-{self.port}.log"
        self.argv = [
            sys.executable,
            "-m",
            "hibernate.engine.reference",
            "--model",
            "ref-test",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--weights-gib",
            str(weights_gib),
            "--kv-gib",
            str(kv_gib),
            "--weights-dir",
            str(tmp / "weights"),
            "--device",
            device,
            "--readers",
            "3",
            "--shard-mib",
            "1" if device == "cpu" else "256",
            "--staging-mib",
            "1" if device == "cpu" else "32",
            "--enable-sleep-mode",
            "--some-vllm-flag",
            "x",
            *extra,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(OPERATOR_DIR), env.get("PYTHONPATH")]))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the engine exited ({self.proc.returncode}):\n{self.log_text()}")
            with contextlib.suppress(OSError):
                self.call("GET", "/health", timeout=2)
                return
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the engine did not start:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def call(self, method: str, path: str, body: object = None, timeout: float = 120) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw.strip() else None

    def complete(self, max_tokens: int = 10, timeout: float = 120) -> str:
        body = self.call("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": max_tokens}, timeout)
        text: str = body["choices"][0]["text"]
        return text

    def checksum(self) -> str:
        return str(self.call("POST", "/collective_rpc", {"method": "checksum"})["results"][0])

    def memory(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "/debug/memory")
        return result

    def sleeping(self) -> bool:
        return bool(self.call("GET", "/is_sleeping")["is_sleeping"])

    def wake_level2(self, reload: bool = True) -> None:
        self.call("POST", "/wake_up?tags=weights")
        if reload:
            self.call("POST", "/collective_rpc", {"method": "reload_weights"})
        self.call("POST", "/wake_up?tags=kv_cache")
        self.call("POST", "/reset_prefix_cache")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cpu_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if not HAVE_TORCH:
        pytest.skip("torch is not installed")
    engine = Engine(tmp_path_factory.mktemp("reference"), "cpu", 0.004, 0.001)
    yield engine
    engine.stop()


@pytest.fixture
def awake(cpu_engine: Engine) -> Iterator[Engine]:
    """The module's engine, awake and answering as at start; put back that way after each test."""
    yield cpu_engine
    if cpu_engine.sleeping():
        cpu_engine.wake_level2()
        cpu_engine.call("POST", "/wake_up")


def test_api_shapes(awake: Engine) -> None:
    models = awake.call("GET", "/v1/models")
    assert models["data"][0]["id"] == "ref-test"
    assert awake.call("GET", "/is_sleeping") == {"is_sleeping": False}
    text = awake.complete(6)
    assert len(text.split()) == 6 and all(w.startswith("t") and w[1:].isdigit() for w in text.split())
    assert awake.complete(6) == text  # greedy: deterministic
    with pytest.raises(urllib.error.HTTPError) as bad:
        awake.call("POST", "/sleep?level=7")
    assert bad.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as unknown:
        awake.call("POST", "/collective_rpc", {"method": "no_such_method"})
    assert unknown.value.code == 500
    assert "ignoring arguments: --some-vllm-flag x" in awake.log_text()


def test_level1_same_tokens_and_memory_moves_to_host(awake: Engine) -> None:
    before, checksum = awake.complete(), awake.checksum()
    held = awake.memory()
    assert held["device_bytes"] > 0 and held["weights_bytes"] > 0 and held["kv_bytes"] > 0
    assert awake.call("POST", "/sleep?level=1") == {"status": "sleeping", "level": 1}
    assert awake.sleeping()
    asleep = awake.memory()
    assert asleep["device_bytes"] == 0 and asleep["host_copy_valid"]
    assert asleep["host_copy_bytes"] >= held["weights_bytes"]
    assert awake.call("POST", "/wake_up") == {"status": "awake", "tags": None}
    assert not awake.sleeping()
    assert awake.complete() == before
    assert awake.checksum() == checksum


def test_level2_with_reload_same_tokens(awake: Engine) -> None:
    before, checksum = awake.complete(), awake.checksum()
    awake.call("POST", "/sleep?level=2")
    assert awake.memory()["device_bytes"] == 0
    asleep = awake.memory()
    assert not asleep["host_copy_valid"] and asleep["host_copy_bytes"] == 0  # level 2 keeps nothing
    woke = awake.call("POST", "/wake_up?tags=weights")
    assert woke["status"] == "sleeping"  # the KV cache is still asleep
    awake.call("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"readers": 2}})
    awake.call("POST", "/wake_up?tags=kv_cache")
    assert not awake.sleeping()
    assert awake.complete() == before
    assert awake.checksum() == checksum
    assert awake.call("GET", "/debug/timings")["reload_readers"] == 2


def test_a_level2_sleep_before_a_dump_keeps_the_hint_and_still_reloads_the_same_tokens(
    awake: Engine,
) -> None:
    before = awake.complete()
    awake.call("POST", "/sleep?level=2&hibernate=checkpoint")
    asleep = awake.memory()
    assert asleep["sleep_hints"][-1] == "checkpoint" and asleep["host_copy_bytes"] == 0
    assert "prepare_checkpoint" in awake.call("GET", "/debug/timings"), "the hint was acted on"
    awake.wake_level2()
    assert awake.complete() == before, "the staging buffers freed for the dump come back for the reload"
    with pytest.raises(urllib.error.HTTPError) as bad:
        awake.call("POST", "/sleep?level=1&hibernate=make-coffee")
    assert bad.value.code == 400 and not awake.sleeping()


def test_level2_without_reload_answers_garbage(awake: Engine) -> None:
    before, checksum = awake.complete(), awake.checksum()
    awake.call("POST", "/sleep?level=2")
    with pytest.raises(urllib.error.HTTPError) as early:
        awake.call("POST", "/collective_rpc", {"method": "reload_weights"})
    assert early.value.code == 500  # weights not mapped yet
    awake.wake_level2(reload=False)
    assert not awake.sleeping()
    assert awake.complete() != before
    assert awake.checksum() != checksum
    awake.call("POST", "/collective_rpc", {"method": "reload_weights"})
    assert awake.complete() == before


def test_requests_are_held_while_asleep(awake: Engine) -> None:
    before = awake.complete()
    awake.call("POST", "/sleep?level=1")
    answers: list[str] = []
    thread = threading.Thread(target=lambda: answers.append(awake.complete(timeout=60)))
    thread.start()
    thread.join(1.0)
    assert thread.is_alive() and not answers  # held, not refused
    awake.call("POST", "/wake_up")
    thread.join(30)
    assert answers == [before]


def test_partial_wake_keeps_requests_held(awake: Engine) -> None:
    before = awake.complete()
    awake.call("POST", "/sleep?level=1")
    answers: list[str] = []
    thread = threading.Thread(target=lambda: answers.append(awake.complete(timeout=60)))
    thread.start()
    awake.call("POST", "/wake_up?tags=weights")
    thread.join(0.5)
    assert thread.is_alive() and awake.sleeping()  # the KV cache is still asleep
    awake.call("POST", "/wake_up?tags=kv_cache")
    thread.join(30)
    assert answers == [before]


def test_restart_reuses_the_weight_files(cpu_engine: Engine, tmp_path: Path) -> None:
    directory = Path(cpu_engine.argv[cpu_engine.argv.index("--weights-dir") + 1])
    copy = tmp_path / "weights"
    shutil.copytree(directory, copy)
    second = Engine(tmp_path, "cpu", 0.004, 0.001)
    try:
        assert "weights loaded from" in second.log_text()
        assert second.checksum() == cpu_engine.checksum()
        assert second.complete() == cpu_engine.complete()
    finally:
        second.stop()


# --- on a GPU ------------------------------------------------------------------------------------


def _gpu_skip_reason() -> str | None:
    if not Path("/proc/driver/nvidia").exists():
        return "no NVIDIA driver (/proc/driver/nvidia missing)"
    if not HAVE_TORCH:
        return "torch is not installed"
    return None


@pytest.fixture(scope="module")
def gpu_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    reason = _gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    gib = float(os.environ.get("HIBERNATE_GPU_TEST_GIB", "2"))
    engine = Engine(tmp_path_factory.mktemp("reference-gpu"), "cuda:0", gib, 1.0, "--pinned-prealloc")
    yield engine
    engine.stop()


def _engine_gpu_mib(pid: int) -> int | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if fields and fields[0] == str(pid):
            return int(fields[1])
    return 0


@pytest.mark.gpu
def test_gpu_level1_frees_weights_and_kv(gpu_engine: Engine) -> None:
    before, checksum = gpu_engine.complete(), gpu_engine.checksum()
    awake = gpu_engine.memory()
    held = awake["weights_bytes"] + awake["kv_bytes"]
    assert awake["gpu_reserved_bytes"] >= held
    used_awake = _engine_gpu_mib(gpu_engine.proc.pid)
    started = time.monotonic()
    gpu_engine.call("POST", "/sleep?level=1")
    slept = time.monotonic() - started
    asleep = gpu_engine.memory()
    used_asleep = _engine_gpu_mib(gpu_engine.proc.pid)
    print(
        f"\n[gpu] reserved awake {awake['gpu_reserved_bytes'] / GIB:.2f} GiB, asleep "
        f"{asleep['gpu_reserved_bytes'] / GIB:.2f} GiB; nvidia-smi {used_awake} -> {used_asleep} MiB; "
        f"pinned {asleep['pinned_bytes'] / GIB:.2f} GiB; sleep {slept:.3f}s"
    )
    assert awake["gpu_reserved_bytes"] - asleep["gpu_reserved_bytes"] >= 0.95 * held
    assert asleep["gpu_allocated_bytes"] < 128 * 2**20
    if used_awake is not None and used_asleep is not None:
        assert used_awake - used_asleep >= 0.9 * held / 2**20
    started = time.monotonic()
    gpu_engine.call("POST", "/wake_up")
    woke = time.monotonic() - started
    assert gpu_engine.complete() == before
    assert gpu_engine.checksum() == checksum
    print(f"[gpu] level 1: wake {woke:.3f}s, timings {gpu_engine.call('GET', '/debug/timings')}")


@pytest.mark.gpu
def test_gpu_a_cuda_suspend_hint_unpins_the_host_copy_and_the_wake_pins_it_again(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With `--host-alloc register`, the level-1 sleep before a CUDA suspend leaves its host copy
    unpinned (so the driver's restore has no pinned memory to register again); the wake pins it
    slab by slab while copying, and answers the same tokens."""
    reason = _gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    engine = Engine(
        tmp_path_factory.mktemp("reference-gpu-unpin"), "cuda:0", 1.0, 0.5, "--host-alloc", "register"
    )
    try:
        before, checksum = engine.complete(), engine.checksum()
        engine.call("POST", "/sleep?level=1&hibernate=cuda-suspend")
        asleep = engine.memory()
        assert asleep["host_copy_valid"] and asleep["host_copy_bytes"] >= GIB
        assert asleep["pinned_bytes"] < asleep["host_copy_bytes"], "the host copy is unpinned"
        assert "prepare_cuda_suspend" in engine.call("GET", "/debug/timings")
        engine.call("POST", "/wake_up")
        assert engine.complete() == before
        assert engine.checksum() == checksum
        engine.call("POST", "/sleep?level=1")  # a plain level-1 sleep keeps the copy pinned
        assert engine.memory()["pinned_bytes"] >= engine.memory()["host_copy_bytes"]
        engine.call("POST", "/wake_up")
        assert engine.complete() == before
    finally:
        engine.stop()


@pytest.mark.gpu
def test_gpu_ring_threads_copy_both_ways_from_both_ends_and_a_plain_sleep_pins_again(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With `--ring-threads`, the wake after a cuda-suspend sleep copies slabs back from both ends
    at once: the ring threads' slabs come back through small pinned buffers and stay unpinned. The
    next cuda-suspend sleep copies into those slabs through the rings too, unpinned; a plain level-1
    sleep pins every slab again first. The weights are the same bytes after every wake."""
    reason = _gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    engine = Engine(
        tmp_path_factory.mktemp("reference-gpu-ring"),
        "cuda:0",
        2.0,
        0.5,
        "--host-alloc",
        "register",
        "--pinned-prealloc",
        "--ring-threads",
        "2",
    )

    def slabs_pinned() -> int:
        return int(engine.memory()["pinned_slab_bytes"])

    try:
        before, checksum = engine.complete(), engine.checksum()
        host_copy = engine.memory()["host_copy_bytes"]
        for _ in range(2):  # the second sleep starts from slabs the rings left unpinned
            engine.call("POST", "/sleep?level=1&hibernate=cuda-suspend")
            assert slabs_pinned() == 0, "the host copy is unpinned for the CUDA suspend"
            engine.call("POST", "/wake_up")
            assert engine.complete() == before
            assert engine.checksum() == checksum
            assert 0 < slabs_pinned() < host_copy, "copied back from both ends"
        engine.call("POST", "/sleep?level=1")
        assert slabs_pinned() == host_copy, "a plain level-1 sleep pins every slab again"
        engine.call("POST", "/wake_up")
        assert engine.complete() == before
        assert engine.checksum() == checksum
    finally:
        engine.stop()


@pytest.mark.gpu
def test_gpu_level2_reload_same_tokens(gpu_engine: Engine) -> None:
    before, checksum = gpu_engine.complete(), gpu_engine.checksum()
    gpu_engine.call("POST", "/sleep?level=2")
    asleep = gpu_engine.memory()
    assert asleep["gpu_allocated_bytes"] < 128 * 2**20
    assert asleep["host_copy_bytes"] == 0  # the preallocated pinned slabs are freed at level 2
    started = time.monotonic()
    gpu_engine.wake_level2()
    woke = time.monotonic() - started
    assert gpu_engine.complete() == before
    assert gpu_engine.checksum() == checksum
    print(
        f"\n[gpu] level 2: wake with reload {woke:.3f}s, timings {gpu_engine.call('GET', '/debug/timings')}"
    )
