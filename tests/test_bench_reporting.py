"""bench/reporting.py: each benchmark owns one section of bench/RESULTS.md and rewrites only that."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

_SPEC = importlib.util.spec_from_file_location(
    "reporting", Path(__file__).resolve().parent.parent / "bench" / "reporting.py"
)
assert _SPEC is not None and _SPEC.loader is not None
reporting = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(reporting)


def test_a_new_section_goes_at_the_end_of_a_new_file(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    reporting.write_section(results, "bench:a", "## A\n\nfirst\n")
    text = results.read_text()
    assert text.startswith(reporting.PREAMBLE)
    assert text.endswith("<!-- bench:a begin -->\n## A\n\nfirst\n<!-- bench:a end -->\n")


def test_a_rerun_replaces_its_own_section_and_leaves_the_others(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    reporting.write_section(results, "bench:a", "## A\n\nold numbers\n")
    reporting.write_section(results, "bench:b", "## B\n\nkept\n")
    reporting.write_section(results, "bench:a", "## A\n\nnew numbers\n")
    text = results.read_text()
    assert "old numbers" not in text
    assert text.count("<!-- bench:a begin -->") == 1
    assert text.index("new numbers") < text.index("kept"), "the section stays where it was"
    assert "<!-- bench:b begin -->\n## B\n\nkept\n<!-- bench:b end -->" in text


def test_percentile_is_a_measured_value_never_an_interpolated_one() -> None:
    values = [float(v) for v in reversed(range(101))]
    assert reporting.percentile(values, 50) == 50.0
    assert reporting.percentile(values, 99) == 99.0
    assert reporting.percentile(values, 100) == 100.0
    assert reporting.percentile([0.0, 10.0], 50) == 0.0
    assert reporting.percentile([3.0], 99) == 3.0


# --- the wake bench's report (bench/wake_report.py) ------------------------------------------------


def _wake_report() -> Any:
    bench = str(Path(__file__).resolve().parent.parent / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)  # as when bench/wake.py runs: its modules import each other by name
    return importlib.import_module("wake_report")


def test_repeated_cycles_are_reported_as_their_median_and_correct_only_if_every_cycle_was() -> None:
    wr = _wake_report()
    cycles = [
        wr.Row(
            16, "agent", "agent", 3, sleep_s=s, wake_s=w, first_token_s=t, correct=True, details={"cuda_s": d}
        )
        for s, w, t, d in ((1.0, 0.9, 1.0, 0.5), (5.0, 0.7, 0.8, 0.4), (1.2, 3.0, 3.1, 0.6))
    ]
    row = wr.median_row(cycles)
    assert (row.sleep_s, row.wake_s, row.first_token_s) == (1.2, 0.9, 1.0), "each timing its own median"
    assert row.details == {"cuda_s": 0.5, "cycles": 3} and row.correct
    assert [(c["sleep_s"], c["cuda_s"]) for c in row.samples] == [(1.0, 0.5), (5.0, 0.4), (1.2, 0.6)], (
        "every cycle kept as measured, for results.json"
    )
    cycles[2].correct = False
    assert not wr.median_row(cycles).correct, "one wrong answer makes the row wrong"


def test_a_failed_cycle_is_never_hidden_by_the_median() -> None:
    wr = _wake_report()
    good = wr.Row(16, "raw", "raw", 4, sleep_s=1.0, wake_s=1.0, correct=True)
    failed = wr.Row(16, "raw", "raw", 4, error="criu restore failed (rc 1)")
    row = wr.median_row([good, failed])
    assert row.error == "criu restore failed (rc 1)" and row.details["cycle"] == 2


def test_agent_overhead_is_a_ratio_for_long_steps_and_milliseconds_for_short_ones() -> None:
    wr = _wake_report()

    def pair(agent: tuple[float, float], raw: tuple[float, float]) -> bool:
        a = wr.Row(16, "agent", "agent", 2, sleep_s=agent[0], wake_s=agent[1], correct=True)
        r = wr.Row(16, "raw", "raw", 2, sleep_s=raw[0], wake_s=raw[1], correct=True)
        return bool(wr.overhead_met(a, r))

    assert pair((0.050, 0.60), (0.040, 0.59)), "+10 ms on a 40 ms sleep is within the floor"
    assert not pair((0.055, 0.60), (0.040, 0.59)), "+15 ms on a 40 ms sleep is not"
    assert pair((0.10, 1.05), (0.10, 1.00)) and not pair((0.10, 1.06), (0.10, 1.00)), "5 % above 0.2 s"


def test_the_goals_table_checks_each_size_against_its_own_goals() -> None:
    wr = _wake_report()
    gib = 2**30
    rows = [
        wr.Row(16, "agent", "agent", 3, sleep_s=1.0, wake_s=0.6, first_token_s=0.75, correct=True),
        wr.Row(
            16, "agent", "agent", 4, sleep_s=1.4, wake_s=1.9, first_token_s=2.2, correct=True, image_bytes=gib
        ),
        wr.Row(16, "raw", "raw", 3, sleep_s=1.0, wake_s=0.58, correct=True),
    ]
    table = "\n".join(wr.goals(16, rows))
    assert "| CudaSuspend wake to first correct token | <= 0.8 s | 0.750 | yes |" in table
    assert (
        "| Checkpoint wake to first correct token (weights in page cache) | <= 2.0 s | 2.200 | **no** |"
        in table
    )
    assert "| Checkpoint image | <= 1 GiB | 1.00 | yes |" in table
    assert "agent overhead over raw, level 3" in table and "+20 ms" in table
    big = [wr.Row(64, "agent", "agent", 3, first_token_s=2.5, correct=True)]
    assert "| CudaSuspend wake to first correct token | <= 2.0 s | 2.500 | **no** |" in "\n".join(
        wr.goals(64, big)
    )
    assert wr.goals(2, big) == [], "no goal is set for 2 GiB"


def test_the_agent_and_raw_cycles_of_a_level_are_taken_in_turn_and_a_failed_path_stops_alone(
    tmp_path: Path,
) -> None:
    # Drift over a run (the driver's checkpoint, criu's dump) must reach both paths alike.
    wr = _wake_report()
    wake = importlib.import_module("wake")
    args = wake.parse_args(["--device", "cpu", "--cycles", "3", "--work-dir", str(tmp_path)])
    report = wr.Report(tmp_path / "RESULTS.md", None, "test", [])
    bench = wake.Bench(args, report)
    taken: list[str] = []

    async def one_cycle(
        engine: Any, size: float, kv: float, level: int, path: str, adapter: str, est: str
    ) -> Any:
        taken.append(path)
        failed = path == "raw" and taken.count("raw") == 2
        return wr.Row(
            size,
            path,
            adapter,
            level,
            sleep_s=1.0,
            wake_s=1.0,
            correct=True,
            error="boom" if failed else None,
        )

    bench.one_cycle = one_cycle
    asyncio.run(bench.side_by_side(None, 16, 4, 3, [("agent", "agent"), ("raw", "raw")], "3"))
    assert taken == ["agent", "raw", "agent", "raw", "agent"]
    agent, raw = report.sizes[16]
    assert agent.details["cycles"] == 3 and len(agent.samples) == 3
    assert raw.error == "boom", "the failed cycle is the raw row, never hidden by a median"
