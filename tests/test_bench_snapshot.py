"""bench/snapshot_restore.py's report (issue 19): the rows beside each other, medians over cycles, a
failed cycle shown as it was, the comparisons, the section and the JSON. Built from made-up samples:
the bench itself needs root, CRIU and the reference engine (bench/README.md runs it)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench(module: str) -> Any:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # as when the bench runs: its modules import each other by name
    return importlib.import_module(module)


def _samples(sr: Any) -> list[Any]:
    Sample = sr.Sample
    out = []
    for cycle, (cold, restore) in enumerate(((6.0, 2.0), (7.0, 3.0), (8.0, 2.5)), start=1):
        out.append(Sample("cold", cycle, {"first_token_s": cold, "pod_ready_s": cold - 0.5}, correct=True))
        out.append(
            Sample("inplace", cycle, {"first_token_s": 2.6, "sleep_s": 1.7, "criu_dump_s": 1.1}, correct=True)
        )
        out.append(
            Sample(
                "snapshot",
                cycle,
                {"seconds": 1.5, "image_bytes": 2 * sr.GIB, "criu_dump_s": 1.0},
                correct=True,
            )
        )
        out.append(
            Sample(
                "restore",
                cycle,
                {"first_token_s": restore, "claim_to_token_s": restore - 0.4, "criu_restore_s": 1.2},
                correct=True,
            )
        )
    return out


def test_each_step_is_the_median_of_its_cycles_beside_the_cold_start_and_level_4_in_place() -> None:
    sr = _bench("snapshot_report")
    samples = _samples(sr)
    lines = sr.table(samples)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert list(rows) == [
        "cold start in a fresh pod",
        "Checkpoint (level 4) in place",
        "snapshot taken from pod A",
        "restore into a new pod B",
    ]
    assert "| 7.000 | 6.000 / 8.000 | 3 of 3 | yes |" in rows["cold start in a fresh pod"]
    assert "| 2.500 | 2.000 / 3.000 | 3 of 3 | yes |" in rows["restore into a new pod B"]
    assert "of which criu restore 1.200" in rows["restore into a new pod B"]
    assert "| 2.00 |" in rows["snapshot taken from pod A"]  # the image, GiB
    text = "\n".join(sr.comparisons(samples, 16))
    assert "2.500 s vs 7.000 s (2.8x faster, +4.500 s saved)" in text
    assert "2.100 s vs 2.600 s" in text  # claim → first token beside the in-place wake
    assert "2.00 GiB on disk for 16 GiB of weights" in text


def test_a_failed_cycle_is_shown_and_never_hidden_by_the_median() -> None:
    sr = _bench("snapshot_report")
    samples = _samples(sr)
    samples.append(sr.Sample("restore", 4, {"agent_s": 0.3}, error="RuntimeError: not restored: criu failed"))
    samples.append(sr.Sample("cold", 4, {"first_token_s": 1.0}, correct=False))
    lines = sr.table(samples)
    restore = next(line for line in lines if line.startswith("| restore"))
    assert "| 2.500 |" in restore and "3 of 4" in restore and "| **NO** |" in restore
    assert "**cycle 4: RuntimeError: not restored: criu failed**" in restore
    cold = next(line for line in lines if line.startswith("| cold"))
    # The wrong answer is reported, and not in the median.
    assert "| 7.000 |" in cold and "**cycle 4: wrong answer**" in cold
    # A cold start that wrote the weights files is not one to compare: said, and counted neither way.
    samples.append(sr.Sample("cold", 5, skipped="this start wrote the weights"))
    cold = next(line for line in sr.table(samples) if line.startswith("| cold"))
    assert "3 of 4" in cold and "cycle 5 skipped: this start wrote the weights" in cold


def test_the_report_writes_its_own_section_and_every_sample_as_json(tmp_path: Path) -> None:
    sr = _bench("snapshot_report")
    results, js = tmp_path / "RESULTS.md", tmp_path / "snapshot.json"
    results.write_text("# Benchmark results\n\n<!-- other begin -->\nkept\n<!-- other end -->\n")
    report = sr.Report(results, js, "snapshot-bench:gpu", ["## Snapshot restore: H100", ""], 16)
    for sample in _samples(sr):
        report.add(sample)
    report.note("weights in the page cache")
    report.status = "complete"
    report.write()
    text = results.read_text()
    assert "kept" in text and text.count("<!-- snapshot-bench:gpu begin -->") == 1
    assert "## Snapshot restore: H100" in text and "- weights in the page cache" in text
    assert "| restore into a new pod B |" in text and "- run: complete" in text
    data = json.loads(js.read_text())
    assert data["summary"]["restore"]["median"]["first_token_s"] == 2.5
    assert data["summary"]["cold"]["good"] == 3 and len(data["samples"]) == 12
    assert data["samples"][0] == {
        "step": "cold",
        "cycle": 1,
        "values": {"first_token_s": 6.0, "pod_ready_s": 5.5},
        "correct": True,
        "error": None,
        "skipped": None,
    }


class _FakeApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def get_state(self, pid: int) -> Any:
        return None

    def lock(self, pid: int, timeout_ms: int = 0) -> None:
        self.calls.append(("lock", pid))

    def checkpoint(self, pid: int) -> None:
        self.calls.append(("checkpoint", pid))

    def restore(self, pid: int) -> None:
        self.calls.append(("restore", pid))

    def unlock(self, pid: int) -> None:
        self.calls.append(("unlock", pid))

    def restore_thread_id(self, pid: int) -> int:
        return pid


class _RemappingApi(_FakeApi):
    def restore_remapped(self, pid: int, pairs: Any) -> None:
        self.calls.append(("restore_remapped", pid))


def test_the_cuda_parts_are_timed_around_the_driver_calls_the_agent_makes() -> None:
    bench = _bench("snapshot_restore")
    timer = bench.CudaTimer()
    api = _FakeApi()
    timed = bench._TimedApi(api, timer)
    assert timer.seconds("resume") is None  # no CUDA (a CPU): no part, not a zero
    timed.lock(7, 100)
    timed.checkpoint(7)
    timed.restore(7)
    timed.unlock(7)
    assert api.calls == [("lock", 7), ("checkpoint", 7), ("restore", 7), ("unlock", 7)]
    suspend, resume = timer.seconds("suspend"), timer.seconds("resume")
    assert suspend is not None and resume is not None and suspend >= 0 and resume >= 0
    timer.reset()
    assert timer.seconds("suspend") is None
    # A driver that can restore onto other GPUs keeps that ability behind the timer, timed as a resume.
    remapping = bench._TimedRemappingApi(_RemappingApi(), timer)
    remapping.restore_remapped(7, [("GPU-a", "GPU-b")])
    assert remapping._api.calls == [("restore_remapped", 7)] and timer.seconds("resume") is not None
    assert not hasattr(timed, "restore_remapped")  # a plain API stays one, so the agent sees no remap
    # The snapshot's spec hash is stable for one engine command and changes with it.
    assert bench.spec_hash(["python", "-m", "x"]) == bench.spec_hash(["python", "-m", "x"])
    assert bench.spec_hash(["python", "-m", "x"]) != bench.spec_hash(["python", "-m", "y"])
    assert bench.timing_delta({"reload": 1.0}, {"reload": 1.0}, "reload") is None  # not reloaded again
    assert bench.timing_delta({"reload": 1.0}, {"reload": 0.8}, "reload") == 0.8
    cpu = bench.parse_args(["--device", "cpu"])
    assert (cpu.size, cpu.kv_gib, cpu.section) == (0.02, 0.004, "snapshot-bench:cpu")
    gpu = bench.parse_args([])
    assert (gpu.size, gpu.kv_gib, gpu.cycles, gpu.section) == (16.0, 4.0, 3, "snapshot-bench:gpu")


def test_the_bench_imports_where_the_gpu_machine_python_lacks_the_operators_packages() -> None:
    """The GPU machine's python3 has torch and httpx but not kubernetes, pydantic or kopf
    (/work/.library/device/KINDS.md): the bench, the agent's Levels and its wake check must import
    without them."""
    code = (
        "import sys\n"
        "for name in ('kubernetes', 'pydantic', 'kopf'): sys.modules[name] = None\n"
        "import snapshot_restore\n"
        "from hibernate.agent.levels import Levels\n"
        "check = snapshot_restore.agent_wake_check()\n"
        "print(type(check).__name__, type(check).answer.__qualname__)\n"
    )
    env = {"PYTHONPATH": f"{BENCH}:{BENCH.parent / 'operator'}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["WakeCheck", "WakeCheck.answer"]
