"""Every level through the agent, inside a pod, on a real GPU (issue 16, items 1, 2 and 4).

The PyTorch reference engine (hibernate.engine.reference, 16 GiB of weights, --pinned-prealloc) runs
inside a simulated pod (hibernate.localnode.simpod: its own pid, mount, ipc and uts namespaces, a
pod cgroup, the pod init as PID 1) that is given the GPU's device nodes as a container runtime with
the NVIDIA toolkit gives them. The agent's own `Levels`, with a real `PodRef` of that pod, moves it
Awake → L1 → Awake → L2 → Awake → CudaSuspend → Awake → Checkpoint → Awake: the agent finds the pod's
processes by their cgroup, speaks HTTP to the engine (the pod has the host's network, like a
hostNetwork pod, so the engine is at 127.0.0.1), checkpoints CUDA with the driver API from this
process and runs criu from its bundle in the pod's namespaces. Checked at every step: after each
wake the same prompt gives the same tokens (greedy); asleep at CudaSuspend and Checkpoint the engine
holds no GPU memory and the card is back to what it used before the engine started; after Checkpoint
the engine has its pid in the pod back. One line per step (sleep s, wake s, first correct token s:
from the start of the wake to a 1-token completion equal to the awake answer's first token), and
with OUT set (bench/gpu_run.sh sets it) the same as JSON in $OUT/gpu-pod.json.

The second test is a failed in-pod restore: after a Checkpoint sleep one pages-*.img of the image is
truncated; `Levels.wake` raises LevelError with criu's reason, and what the agent's worker does next
(`Agent._failed` reads the level back with `Levels.probe` and reports the pod Failed there, then
retries the wake with backoff) leaves the engine cleanly gone, never half restored.

    PYTHONPATH=operator HIBERNATE_CRIU=.carry/criu python3 -m pytest --noconftest -p no:cacheprovider \\
        -m gpu -s tests/test_gpu_pod.py

HIBERNATE_GPU_POD_GIB sets the weights (default 16; 2 for a quick run). The weights live in
/var/tmp/hibernate-bench/weights/<size>g, where bench/wake.py keeps them: the first engine writes
them (through a volume of the pod, to the host's disk), later ones and the bench read them. The tests
need root, the NVIDIA driver, torch, httpx, nvidia-smi, unshare and the CRIU bundle; they skip with
the reason otherwise (also under --noconftest, which bench/gpu_run.sh uses). The first test here is a
CPU one: the agent's CUDA process discovery that the walk depends on.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hibernate.localnode.gpupod import end_pod, pod_volumes
from hibernate.localnode.simpod import SimPod, nvidia_devices

T = TypeVar("T")

OPERATOR_DIR = Path(__file__).resolve().parent.parent / "operator"
WORK_DIR = Path("/var/tmp/hibernate-bench")  # bench/wake.py's --work-dir: weights/<size>g
PIDS_FILE = WORK_DIR / "gpu-pod.pids"  # pod inits, for bench/gpu_run.sh to end if pytest was killed
PROMPT = "t17 t4242 hibernate wakes the model t7"
MAX_TOKENS = 8
GIB = 2**30
# nvidia-smi's memory.used of the card, asleep, may exceed the baseline by this much (its rounding
# and the driver's own bookkeeping); the engine's own process must hold exactly nothing.
CARD_SLACK_MIB = 32
# The agent's limits for one engine call and one criu run (the DaemonSet's are 300 s and 600 s): a
# step that hangs fails within the GPU run's time. A restore from a corrupted image gets less (see
# the second test): a healthy one of the engine-assisted image takes a few seconds.
ENGINE_TIMEOUT_S = 180.0
CRIU_TIMEOUT_S = 180.0
BAD_RESTORE_TIMEOUT_S = 20.0


# --- on CPU: what the walk needs from the agent's discovery --------------------------------------------


def test_agent_finds_a_checkpointed_cuda_process_that_holds_no_gpu_device(tmp_path: Path) -> None:
    """A CUDA-checkpointed process has let go of /dev/nvidia* (that is what lets criu dump it without
    a plugin), so the wake must find it through the driver, not only by its open files."""
    from hibernate.agent import cuda, discovery
    from hibernate.agent.levels import Host

    proc_root = tmp_path / "proc"
    for pid, target in ((10, "/dev/null"), (11, "/dev/nvidiactl"), (12, None), (13, None)):
        fd_dir = proc_root / str(pid) / "fd"
        fd_dir.mkdir(parents=True)
        if target is not None:
            (fd_dir / "3").symlink_to(target)

    class Driver:
        def __init__(self) -> None:
            self.states = {11: cuda.ProcessState.RUNNING, 12: cuda.ProcessState.CHECKPOINTED}
            self.asked: list[int] = []

        def get_state(self, pid: int) -> cuda.ProcessState:
            self.asked.append(pid)
            if pid not in self.states:
                raise cuda.CudaCallError("cuCheckpointProcessGetState", pid, 500, "CUDA_ERROR_NOT_FOUND")
            return self.states[pid]

        def lock(self, pid: int, timeout_ms: int = 0) -> None:
            raise AssertionError("not called")

        def checkpoint(self, pid: int) -> None:
            raise AssertionError("not called")

        def restore(self, pid: int) -> None:
            raise AssertionError("not called")

        def unlock(self, pid: int) -> None:
            raise AssertionError("not called")

        def restore_thread_id(self, pid: int) -> int:
            raise AssertionError("not called")

    procs = [
        discovery.ProcessInfo(
            pid=pid,
            ppid=1,
            comm="python3",
            cmdline=(),
            pod_uid="u",
            container_id="c",
            nspid=(pid,),
            cgroup="/",
        )
        for pid in (10, 11, 12, 13)
    ]
    driver = Driver()
    host = Host(proc_root=str(proc_root), cuda_api=lambda: driver)
    assert discovery.cuda_pids([p.pid for p in procs], proc_root) == [11]  # the file scan alone
    assert host.cuda_pids_of(procs) == [11, 12]
    assert sorted(driver.asked) == [10, 12, 13]  # the driver is asked only about the others

    def no_driver() -> cuda.CheckpointApi:
        raise cuda.CudaUnavailable("no NVIDIA driver library")

    assert Host(proc_root=str(proc_root), cuda_api=no_driver).cuda_pids_of(procs) == [11]


# --- helpers ---------------------------------------------------------------------------------------------


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _http(method: str, url: str, body: object = None, timeout: float = 120.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw.strip() else None


def _complete(url: str, max_tokens: int, timeout: float = 120.0) -> str:
    body = _http("POST", f"{url}/v1/completions", {"prompt": PROMPT, "max_tokens": max_tokens}, timeout)
    text: str = body["choices"][0]["text"]
    return text


def _nvidia_smi(*query: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    return [[f.strip() for f in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def card_used_mib() -> int:
    """memory.used of GPU 0."""
    return int(_nvidia_smi("--query-gpu=memory.used", "-i", "0")[0][0])


def process_used_mib(host_pid: int) -> int:
    """The GPU memory nvidia-smi charges to a host pid; 0 when it is not listed."""
    for row in _nvidia_smi("--query-compute-apps=pid,used_memory"):
        if len(row) >= 2 and row[0] == str(host_pid):
            return int(row[1]) if row[1].isdigit() else -1
    return 0


def settle_card(limit_mib: int, seconds: float = 15.0) -> int:
    """memory.used of GPU 0 once it is at most `limit_mib`, or what it is after `seconds`."""
    deadline = time.monotonic() + seconds
    used = card_used_mib()
    while used > limit_mib and time.monotonic() < deadline:
        time.sleep(0.25)
        used = card_used_mib()
    return used


def _rss_gib(host_pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    return 0.0


def _fs_type(path: Path) -> str:
    best, kind = "", "?"
    real = str(path.resolve())
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        mount = parts[1].replace("\\040", " ")
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, kind = mount, parts[2]
    return kind


def _skip_reason() -> str | None:
    """Why the GPU tests cannot run here, checked in the test itself: bench/gpu_run.sh runs pytest
    with --noconftest, so tests/conftest.py's skip of `gpu` tests does not apply there."""
    if not Path("/proc/driver/nvidia").exists():
        return "no NVIDIA driver (/proc/driver/nvidia missing)"
    if os.geteuid() != 0:
        return "needs root (namespaces, cgroups, the CUDA checkpoint API on another process, CRIU)"
    for module, why in (("torch", "the engine"), ("httpx", "the agent's engine client")):
        if importlib.util.find_spec(module) is None:
            return f"{module} ({why}) is not installed"
    for tool in ("unshare", "nvidia-smi"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    if not nvidia_devices():
        return "no /dev/nvidia* device nodes to give the pod"
    from hibernate.agent import criu

    try:
        bundle = criu.locate()
        criu.version(bundle)
    except criu.CriuError as e:
        return f"no usable CRIU bundle (HIBERNATE_CRIU=.carry/criu, built by hack/build-criu.sh): {e}"
    if bundle.nsjoin is None:
        return f"{bundle.criu} is not a bundle with hibernate-nsjoin.so; build one with hack/build-criu.sh"
    return None


# --- the pod, the agent, and what is measured ---------------------------------------------------------


@dataclass
class Env:
    gib: float
    kv_gib: float
    weights: Path
    baseline_mib: int
    gpu: dict[str, str]
    results: dict[str, Any] = field(default_factory=dict)

    def write(self) -> None:
        """$OUT/gpu-pod.json (rewritten after every step, so a cut run still leaves its numbers)."""
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            Path(out, "gpu-pod.json").write_text(json.dumps(self.results, indent=1) + "\n")


@dataclass
class PodEngine:
    """The engine in its pod, the agent's view of it, and what it answered awake."""

    sim: SimPod
    url: str
    ref: Any  # hibernate.agent.podref.PodRef
    levels: Any  # hibernate.agent.levels.Levels
    ckpt_root: Path
    reference: str
    start_s: float
    restored: bool = False  # criu has restored it: end it CUDA-checkpointed (see stop)

    def host_pid(self) -> int:
        pid = self.sim.engine_host_pid()
        assert pid is not None, f"the engine is not running in its pod:\n{self.sim.log()[-3000:]}"
        return pid

    def image(self) -> Path:
        path: Path = self.ref.image_dir(self.levels.host.checkpoint_roots)
        return path

    def serving(self) -> bool:
        if self.sim.engine_host_pid() is None:
            return False
        try:
            if _http("GET", f"{self.url}/is_sleeping", timeout=10)["is_sleeping"]:
                return False
            return _complete(self.url, MAX_TOKENS, timeout=30) == self.reference
        except OSError:
            return False

    def stop(self) -> None:
        """Ends the pod. An engine that criu restored is first put to sleep and CUDA-checkpointed:
        ending a live restored CUDA process has hung hosts (NVIDIA/cuda-checkpoint#53)."""
        end_pod(self.sim, self.url, self.restored)
        shutil.rmtree(self.ckpt_root, ignore_errors=True)


def _start_pod(env: Env) -> PodEngine:
    from hibernate.agent.levels import Host, Levels
    from hibernate.agent.podref import PodRef

    port = _free_port()
    env.weights.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "hibernate.engine.reference",
        "--model",
        f"gpu-pod-{env.gib:g}g",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--weights-gib",
        f"{env.gib:g}",
        "--kv-gib",
        f"{env.kv_gib:g}",
        "--weights-dir",
        str(env.weights),
        "--device",
        "cuda:0",
        "--readers",
        "8",
        "--pinned-prealloc",
        "--enable-sleep-mode",
    ]
    pythonpath = os.pathsep.join(filter(None, [str(OPERATOR_DIR), os.environ.get("PYTHONPATH")]))
    devices = nvidia_devices()
    volumes = pod_volumes([env.weights])
    print(f"\n[gpu-pod] devices {' '.join(devices)}; volumes {' '.join(volumes)}")
    started = time.monotonic()
    try:
        sim = SimPod.start(
            argv,
            port=port,
            ready_path="/health",
            timeout=min(600.0, 120.0 + 12 * env.gib),
            host_network=True,
            env={"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
            devices=devices,
            volumes=volumes,
        )
    except (RuntimeError, TimeoutError) as e:
        pytest.fail("the engine did not start in its pod: " + str(e)[-6000:])
    start_s = time.monotonic() - started
    with contextlib.suppress(OSError):
        PIDS_FILE.parent.mkdir(parents=True, exist_ok=True)
        with PIDS_FILE.open("a") as f:
            f.write(f"{sim.init_pid}\n")
    ckpt_root = Path(tempfile.mkdtemp(prefix="gpu-pod-checkpoints-", dir=WORK_DIR)).resolve()
    ref = PodRef(
        namespace="gpu-pod",
        name=f"reference-{env.gib:g}g",
        uid=sim.uid,
        ip="127.0.0.1",
        port=port,
        container="engine",
        container_id=sim.container_id,
        annotations={},
        checkpoint_dir=str(ckpt_root),
        deleting=False,
    )
    # The agent's Host as the DaemonSet runs it, except a tmp checkpoint root and shorter timeouts.
    host = Host(
        checkpoint_roots=(ckpt_root,), engine_timeout_s=ENGINE_TIMEOUT_S, criu_timeout_s=CRIU_TIMEOUT_S
    )
    levels = Levels(host)
    url = f"http://127.0.0.1:{port}"
    pe = PodEngine(sim, url, ref, levels, ckpt_root, reference="", start_s=start_s)
    try:
        pe.reference = _complete(url, MAX_TOKENS)
        assert _complete(url, MAX_TOKENS) == pe.reference, "greedy: the same answer twice"
        timings = _http("GET", f"{url}/debug/timings", timeout=30)
    except BaseException:
        print(sim.log()[-4000:])
        pe.stop()
        raise
    env.results.setdefault("engine_starts", []).append(
        {"seconds": round(start_s, 2), "engine_timings": timings, "ns_pid": sim.engine_ns_pid()}
    )
    print(
        f"[gpu-pod] engine ready in its pod in {start_s:.1f} s (host pid {pe.host_pid()}, pid "
        f"{sim.engine_ns_pid()} in the pod); its steps: {timings}; answer {pe.reference!r}"
    )
    return pe


class Pods:
    """The module's pod: started once, reused while it serves as it did at start."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.current: PodEngine | None = None

    def get(self) -> PodEngine:
        if self.current is not None and not self.current.serving():
            print(
                f"[gpu-pod] the pod's engine does not serve as at start; a new pod\n{self.current.sim.log()[-2000:]}"
            )
            self.current.stop()
            self.current = None
        if self.current is None:
            self.current = _start_pod(self.env)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture(scope="module")
def gpu_env() -> Env:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from hibernate.agent import cuda

    cuda.default_api()  # loads the driver library here, as the agent does, before the baseline
    gib = float(os.environ.get("HIBERNATE_GPU_POD_GIB", "16"))
    weights = WORK_DIR / "weights" / f"{gib:g}g"  # bench/wake.py's layout: the same files
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    have = sum(p.stat().st_size for p in weights.glob("*")) if weights.exists() else 0
    if shutil.disk_usage(WORK_DIR).free + have < gib * GIB * 1.05 + 4 * GIB:
        pytest.skip(f"not enough disk under {WORK_DIR} for {gib:g} GiB of weights and a checkpoint image")
    busy = [row for row in _nvidia_smi("--query-compute-apps=pid,used_memory") if row and row[0]]
    name, driver = (_nvidia_smi("--query-gpu=name,driver_version", "-i", "0") or [["?", "?"]])[0][:2]
    env = Env(
        gib=gib,
        kv_gib=4.0 if gib >= 8 else 1.0,
        weights=weights,
        baseline_mib=card_used_mib(),
        gpu={"name": name, "driver": driver},
    )
    env.results.update(
        {
            "gpu": env.gpu,
            "size_gib": gib,
            "kv_gib": env.kv_gib,
            "weights_dir": f"{weights} ({_fs_type(WORK_DIR)})",
            "checkpoint_fs": _fs_type(WORK_DIR),
            "baseline_card_mib": env.baseline_mib,
            "other_compute_apps": busy,
        }
    )
    print(
        f"\n[gpu-pod] {name}, driver {driver}; card uses {env.baseline_mib} MiB before the engine; {gib:g} GiB"
    )
    return env


@pytest.fixture(scope="module")
def pods(gpu_env: Env) -> Iterator[Pods]:
    # bench/gpu_run.sh ends pytest with SIGTERM at its time limit: end the pod then too.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    holder = Pods(gpu_env)
    try:
        yield holder
    finally:
        holder.close()
        signal.signal(signal.SIGTERM, previous)
        gpu_env.write()


# --- the walk ----------------------------------------------------------------------------------------


def _walk_step(env: Env, pe: PodEngine, level: Any) -> dict[str, Any]:
    from hibernate.agent import cuda, discovery
    from hibernate.api.levels import SleepLevel

    row: dict[str, Any] = {"level": level.label}
    ns_pid, host_pid = pe.sim.engine_ns_pid(), pe.host_pid()
    row["card_awake_mib"] = card_used_mib()
    row["engine_awake_mib"] = process_used_mib(host_pid)
    before = _http("GET", f"{pe.url}/debug/timings", timeout=30)

    started = time.monotonic()
    details = _run(pe.levels.sleep(pe.ref, level))
    row["sleep_s"] = round(time.monotonic() - started, 3)
    row["sleep_details"] = details

    # -- asleep: what the engine and the card hold
    limit = env.baseline_mib + CARD_SLACK_MIB
    if level == SleepLevel.CHECKPOINT:
        assert pe.sim.engine_host_pid() is None, "criu ended the engine's processes"
        assert pe.sim.init_alive(), "the pod stays: its init outlives the engine"
        image = pe.image()
        assert image.is_dir() and details["image_bytes"] > 0, details
        row["image_bytes"] = details["image_bytes"]
        row["engine_asleep_mib"] = 0
        row["card_asleep_mib"] = settle_card(limit)
        assert row["card_asleep_mib"] <= limit, f"the GPU is not free at Checkpoint: {row}"
    elif level == SleepLevel.CUDA_SUSPEND:
        api = cuda.default_api()
        assert api.get_state(host_pid) is cuda.ProcessState.CHECKPOINTED
        # What the wake will need: the agent must still find the suspended engine.
        by_files = discovery.cuda_pids([host_pid])
        row["checkpointed_engine_holds_dev_nvidia"] = bool(by_files)
        assert host_pid in pe.levels.host.cuda_pids(pe.ref), "the agent cannot find the engine to resume it"
        row["engine_asleep_mib"] = process_used_mib(host_pid)
        row["card_asleep_mib"] = settle_card(limit)
        row["engine_rss_asleep_gib"] = round(_rss_gib(host_pid), 2)
        assert row["engine_asleep_mib"] == 0, f"the engine holds GPU memory at CudaSuspend: {row}"
        assert row["card_asleep_mib"] <= limit, f"the GPU is not free at CudaSuspend: {row}"
    else:
        memory = _http("GET", f"{pe.url}/debug/memory", timeout=30)
        assert memory["device_bytes"] == 0, memory  # the engine's own count: weights and KV freed
        row["engine_asleep_mib"] = process_used_mib(host_pid)
        row["card_asleep_mib"] = card_used_mib()
        row["gpu_reserved_asleep_bytes"] = memory.get("gpu_reserved_bytes")
        row["pinned_asleep_bytes"] = memory.get("pinned_bytes")

    # -- the wake, and the first correct token
    first_ref = pe.reference.split()[0]
    started = time.monotonic()
    details = _run(pe.levels.wake(pe.ref, level))
    row["wake_s"] = round(time.monotonic() - started, 3)
    first = _complete(pe.url, 1)
    row["first_token_s"] = round(time.monotonic() - started, 3)
    full = _complete(pe.url, MAX_TOKENS)
    row["wake_details"] = details
    row["same_answer"] = first.strip() == first_ref and full == pe.reference
    after = _http("GET", f"{pe.url}/debug/timings", timeout=30)
    for key in ("reload", "restore"):
        if after.get(key) != before.get(key):
            row[f"engine_{key}_s"] = after[key]
    if level == SleepLevel.CHECKPOINT:
        pe.restored = True
        row["host_pid_before_after"] = [host_pid, pe.host_pid()]
        assert not pe.image().exists(), "the image is removed once the engine runs again"
    row["ns_pid_before_after"] = [ns_pid, pe.sim.engine_ns_pid()]
    row["card_woken_mib"] = card_used_mib()
    assert row["same_answer"], (
        f"after the wake from {level.label}: {first!r} / {full!r}, awake {pe.reference!r}"
    )
    assert pe.sim.engine_ns_pid() == ns_pid, (
        f"the engine's pid in the pod changed: {row['ns_pid_before_after']}"
    )
    return row


def _line(env: Env, row: dict[str, Any]) -> str:
    extra = ""
    if "image_bytes" in row:
        extra += f", image {row['image_bytes'] / GIB:.2f} GiB, host pid {row['host_pid_before_after']}"
    if "checkpointed_engine_holds_dev_nvidia" in row:
        extra += f", suspended engine holds /dev/nvidia*: {row['checkpointed_engine_holds_dev_nvidia']}"
    return (
        f"[gpu-pod] {env.gib:g} GiB {row['level']:<11} sleep {row['sleep_s']:7.3f} s  wake {row['wake_s']:7.3f} s  "
        f"first token {row['first_token_s']:7.3f} s  same answer {'yes' if row['same_answer'] else 'NO'}  "
        f"asleep: engine {row['engine_asleep_mib']} MiB, card {row['card_asleep_mib']} MiB "
        f"(baseline {env.baseline_mib}, awake {row['card_awake_mib']}); pid in pod "
        f"{row['ns_pid_before_after'][0]}->{row['ns_pid_before_after'][1]}{extra}"
    )


@pytest.mark.gpu
def test_gpu_pod_every_level_through_the_agent(gpu_env: Env, pods: Pods) -> None:
    from hibernate.api.levels import SleepLevel

    pe = pods.get()
    walk: list[dict[str, Any]] = []
    gpu_env.results["walk"] = walk
    for level in (SleepLevel.L1, SleepLevel.L2, SleepLevel.CUDA_SUSPEND, SleepLevel.CHECKPOINT):
        try:
            row = _walk_step(gpu_env, pe, level)
        except BaseException as e:
            walk.append({"level": level.label, "error": f"{type(e).__name__}: {e}"[:2000]})
            gpu_env.write()
            print(f"[gpu-pod] {level.label} FAILED: {type(e).__name__}: {e}\n{pe.sim.log()[-4000:]}")
            raise
        walk.append(row)
        gpu_env.write()
        print(_line(gpu_env, row))
    print("[gpu-pod] JSON " + json.dumps({"walk": walk}))


# --- a failed in-pod restore ---------------------------------------------------------------------------


def _pod_processes(pe: PodEngine) -> list[int]:
    return [p.pid for p in pe.levels.host.processes(pe.ref)]


def _engine_gone(pe: PodEngine, seconds: float = 10.0) -> bool:
    """Whether only the pod's init is left (a failed restore's processes are reaped by it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pe.sim.engine_host_pid() is None and _pod_processes(pe) == [pe.sim.init_pid]:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.gpu
def test_gpu_pod_failed_restore_leaves_no_half_engine(gpu_env: Env, pods: Pods) -> None:
    """A pages image cut short (a disk error, a copy that did not finish) between the Checkpoint sleep
    and the wake. criu 4.2's restorer does not stop at the early end of a pages image: it reads 0 bytes
    again and again (seen on CPU and on an H200), until the agent's criu timeout kills it. So the agent
    records every file's size at the dump and refuses a cut image before criu starts; the timeout
    (BAD_RESTORE_TIMEOUT_S here) stays the backstop."""
    from hibernate.agent.levels import LevelError
    from hibernate.api.levels import SleepLevel

    pe = pods.get()
    report: dict[str, Any] = {}
    gpu_env.results["failed_restore"] = report
    level = SleepLevel.CHECKPOINT
    details = _run(pe.levels.sleep(pe.ref, level))
    image = pe.image()
    pe.levels.shrinker.wait(image, timeout=120)  # the file cut is then the one the wake reads
    pages = max(image.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    size = pages.stat().st_size
    os.truncate(pages, size // 2)
    report.update(
        {
            "image_bytes": details["image_bytes"],
            "corrupted": f"{pages.name} cut from {size} to {size // 2} bytes",
            "criu_timeout_s": BAD_RESTORE_TIMEOUT_S,
        }
    )
    print(f"\n[gpu-pod] Checkpoint image {details['image_bytes'] / GIB:.2f} GiB; {report['corrupted']}")
    pe.levels.host.criu_timeout_s = BAD_RESTORE_TIMEOUT_S

    started = time.monotonic()
    with pytest.raises(LevelError) as failed:
        _run(pe.levels.wake(pe.ref, level))
    report["wake_s"] = round(time.monotonic() - started, 3)
    message = str(failed.value)
    report["error"] = message[:3000]
    report["criu_ran_until_the_timeout"] = "timed out" in message
    print(f"[gpu-pod] the wake failed in {report['wake_s']:.2f} s: {message[:1500]}")
    if report["criu_ran_until_the_timeout"]:
        print(
            "[gpu-pod] FINDING: criu restore did not fail on the truncated pages image; it ran until the "
            f"agent's criu timeout ({BAD_RESTORE_TIMEOUT_S:g} s here, 600 s in the DaemonSet), one core busy"
        )
    # The sizes recorded at the dump refuse the cut image before criu starts (criu itself would spin).
    assert "is damaged" in message and "pages-" in message, message

    # Nothing half restored: no engine process, no CUDA process, the GPU free; the pod itself stays.
    assert _engine_gone(pe), f"processes left in the pod: {_pod_processes(pe)}"
    assert pe.sim.init_alive(), "the pod's init keeps the pod while the agent retries"
    assert pe.levels.host.cuda_pids(pe.ref) == []
    limit = gpu_env.baseline_mib + CARD_SLACK_MIB
    report["card_after_mib"] = settle_card(limit)
    assert report["card_after_mib"] <= limit, report

    # What the worker does with the LevelError (Agent._failed, action wake): it reads the level back
    # and reports the pod Failed there with this error, then retries the wake with backoff.
    where = _run(pe.levels.probe(pe.ref, level))
    report["probe_after_failure"] = where.label
    assert where == SleepLevel.CHECKPOINT, "reported Failed at Checkpoint: the image is still the engine"
    with pytest.raises(LevelError, match="is damaged"):
        _run(pe.levels.wake(pe.ref, level))  # the retry fails the same way, and leaves nothing either
    assert _engine_gone(pe), f"processes left in the pod after the retry: {_pod_processes(pe)}"
    # The image gone (a person deleting it for a cold start, or a lost disk): the reason says so.
    shutil.rmtree(image)
    with pytest.raises(LevelError, match="does not exist") as gone:
        _run(pe.levels.wake(pe.ref, level))
    report["error_without_image"] = str(gone.value)[:500]
    assert _engine_gone(pe, 1.0) and pe.sim.init_alive()
    report["outcome"] = (
        "engine cleanly gone: no process but the pod init, no CUDA process, GPU at baseline; "
        f"the agent reports Failed at {where.label} with criu's reason and retries with backoff"
    )
    gpu_env.write()
    print(
        f"[gpu-pod] {report['outcome']}; card {report['card_after_mib']} MiB (baseline {gpu_env.baseline_mib})"
    )
    print("[gpu-pod] JSON " + json.dumps({"failed_restore": report}))
    pods.close()  # the engine is gone for good: end the pod
