"""The snapshot bench's report (bench/snapshot_restore.py writes it): one sample per step and cycle,
each step's median over its cycles, the comparisons issue 19 asks for, a section of RESULTS.md and a
JSON of every sample.

Kept apart from the runner (which needs root, CRIU and the engine) so that the tables can be built
and tested anywhere: tests/test_bench_reporting.py renders a report from made-up samples.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from reporting import write_section

GIB: Final = 2**30


@dataclass(frozen=True)
class Step:
    """One row of the table: which sample values it shows, and what its seconds mean."""

    name: str
    label: str
    measures: str  # what the headline seconds are, in words
    headline: str  # the sample value shown as the row's seconds
    parts: tuple[tuple[str, str], ...]  # (sample value, label) shown as its parts


STEPS: Final = (
    Step(
        "cold",
        "cold start in a fresh pod",
        "pod start → first correct token",
        "first_token_s",
        (
            ("pod_ready_s", "pod up, engine answers /health"),
            ("load_s", "weights load (engine)"),
            ("first_answer_s", "then the first token"),
        ),
    ),
    Step(
        "inplace",
        "Checkpoint (level 4) in place",
        "wake → first correct token (wake check included)",
        "first_token_s",
        (
            ("sleep_s", "sleep"),
            ("criu_dump_s", "of which criu dump"),
            ("wake_s", "agent wake"),
            ("criu_restore_s", "of which criu restore"),
            ("cuda_restore_s", "of which CUDA restore"),
            ("reload_s", "of which weight reload (engine)"),
            ("canary_s", "wake check"),
        ),
    ),
    Step(
        "snapshot",
        "snapshot taken from pod A",
        "engine to level 2, CUDA suspended, criu dump (Levels.snapshot)",
        "seconds",
        (
            ("engine_sleep_s", "engine to level 2 and the rest"),
            ("cuda_suspend_s", "CUDA suspend"),
            ("criu_dump_s", "criu dump (verified)"),
        ),
    ),
    Step(
        "restore",
        "restore into a new pod B",
        "pod start → first correct token (wake check included)",
        "first_token_s",
        (
            ("pod_s", "new pod, its init waiting"),
            ("agent_s", "agent: claim → init told"),
            ("criu_restore_s", "of which criu restore"),
            ("cuda_restore_s", "of which CUDA restore"),
            ("engine_wake_s", "of which engine wake"),
            ("reload_s", "of which weight reload (engine)"),
            ("canary_s", "of which wake check"),
            ("claim_to_token_s", "claim → first correct token"),
        ),
    ),
)
STEP_NAMES: Final = tuple(s.name for s in STEPS)


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Sample:
    """One step of one cycle: its values (seconds, bytes), whether the engine answered right after it,
    and the error or skip that ended it."""

    step: str
    cycle: int
    values: dict[str, float] = field(default_factory=dict)
    correct: bool | None = None
    error: str | None = None
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return not self.error and not self.skipped and self.correct is not False


@dataclass
class Summary:
    """A step over its cycles: the median of each value over the good cycles, their range for the
    headline, and the first bad cycle as it was (a median never hides a failure). Skipped cycles (a
    cold start that wrote the weights files, say) count neither way."""

    step: Step
    cycles: int  # the cycles that ran this step (not skipped)
    good: int
    median: dict[str, float]
    low: float | None
    high: float | None
    failure: str | None
    skip: str | None = None

    @property
    def seconds(self) -> float | None:
        return self.median.get(self.step.headline)


def summarize(step: Step, samples: Sequence[Sample]) -> Summary:
    mine = [s for s in samples if s.step == step.name]
    ran = [s for s in mine if not s.skipped]
    good = [s for s in ran if s.ok]
    keys = sorted({k for s in good for k in s.values})
    median = {k: statistics.median([s.values[k] for s in good if k in s.values]) for k in keys}
    heads = [s.values[step.headline] for s in good if step.headline in s.values]
    bad = next((s for s in ran if not s.ok), None)
    failure = None
    if bad is not None:
        failure = f"cycle {bad.cycle}: {(bad.error or 'wrong answer').splitlines()[0][:240]}"
    skipped = next((s for s in mine if s.skipped), None)
    skip = f"cycle {skipped.cycle} skipped: {skipped.skipped}" if skipped is not None else None
    return Summary(
        step,
        len(ran),
        len(good),
        median,
        min(heads) if heads else None,
        max(heads) if heads else None,
        failure,
        skip,
    )


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(samples: Sequence[Sample]) -> list[str]:
    lines = [
        "| step | its seconds are | s (median) | min / max | good cycles | correct | image GiB | parts (median s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for step in STEPS:
        sm = summarize(step, samples)
        if not sm.cycles and not sm.skip:
            continue
        parts = ", ".join(f"{label} {sm.median[k]:.3f}" for k, label in step.parts if k in sm.median)
        for problem in (f"**{sm.failure}**" if sm.failure else None, sm.skip):
            if problem:
                parts = f"{parts}; {problem}" if parts else problem
        correct = "-" if not sm.cycles else ("yes" if sm.good == sm.cycles else "**NO**")
        image = f"{sm.median['image_bytes'] / GIB:.2f}" if "image_bytes" in sm.median else "-"
        spread = f"{_s(sm.low)} / {_s(sm.high)}" if sm.low is not None else "-"
        lines.append(
            f"| {step.label} | {step.measures} | {_s(sm.seconds)} | {spread} | {sm.good} of {sm.cycles} "
            f"| {correct} | {image} | {parts or '-'} |"
        )
    return lines


def comparisons(samples: Sequence[Sample], weights_gib: float) -> list[str]:
    """What issue 19 asks: the restore beside the cold start and beside level 4 in place."""
    by = {s.name: summarize(s, samples) for s in STEPS}
    out: list[str] = []
    cold, restore, inplace, snap = (by[n].seconds for n in ("cold", "restore", "inplace", "snapshot"))
    if restore is not None and cold is not None and restore > 0:
        out.append(
            f"- restore into a new pod vs cold start, to the first correct token: {restore:.3f} s vs {cold:.3f} s "
            f"({cold / restore:.1f}x faster, {cold - restore:+.3f} s saved)"
        )
    claim = by["restore"].median.get("claim_to_token_s")
    if claim is not None and inplace is not None and inplace > 0:
        out.append(
            f"- the agent's part of the restore (claim → first correct token) vs Checkpoint in place "
            f"(wake → first correct token): {claim:.3f} s vs {inplace:.3f} s ({claim / inplace:.2f}x)"
        )
    image = by["snapshot"].median.get("image_bytes")
    if image is not None and snap is not None:
        out.append(
            f"- the snapshot: {snap:.3f} s to take, {image / GIB:.2f} GiB on disk for {weights_gib:g} GiB of "
            "weights (the engine is at level 2: no weights in the image)"
        )
    return out


class Report:
    """The section of RESULTS.md and the JSON, rewritten after every cycle (a run cut short still
    leaves its numbers)."""

    def __init__(
        self,
        results: Path,
        json_path: Path | None,
        marker: str,
        head: list[str],
        weights_gib: float,
    ) -> None:
        self.results = results
        self.json_path = json_path
        self.marker = marker
        self.head = head
        self.weights_gib = weights_gib
        self.samples: list[Sample] = []
        self.notes: list[str] = []
        self.status = "running"

    def add(self, sample: Sample) -> Sample:
        self.samples.append(sample)
        return sample

    def note(self, text: str) -> None:
        self.notes.append(text)
        say(f"  note: {text}")

    def render(self) -> str:
        lines = [*self.head, *table(self.samples), ""]
        lines += comparisons(self.samples, self.weights_gib)
        lines += [f"- {n}" for n in self.notes]
        lines.append(f"- run: {self.status}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        summary = {}
        for step in STEPS:
            sm = summarize(step, self.samples)
            if sm.cycles or sm.skip:
                summary[step.name] = {
                    "cycles": sm.cycles,
                    "good": sm.good,
                    "median": sm.median,
                    "min": sm.low,
                    "max": sm.high,
                    "failure": sm.failure,
                    "skipped": sm.skip,
                }
        return {
            "marker": self.marker,
            "head": self.head,
            "weights_gib": self.weights_gib,
            "status": self.status,
            "notes": self.notes,
            "summary": summary,
            "samples": [asdict(s) for s in self.samples],
        }

    def write(self) -> None:
        write_section(self.results, self.marker, self.render())
        if self.json_path is not None:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
