"""The wake bench's rows and report (bench/wake.py writes them): one row per sleep/wake cycle of a
path and level, the median of repeated cycles, comparisons between paths, and the goals of issue 17
checked against the rows of one run."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from reporting import write_section

GIB: Final = 2**30

# Paths whose cycles repeat (--cycles) and are reported as their median: the ones the goals and the
# agent-overhead ratio compare.
REPEATED_PATHS: Final = ("agent", "raw", "pod", "tmpfs")

# Goals (issue 17 and the ones before it): (size GiB, label, row key, field, limit).
GOALS: Final = (
    (16, "CudaSuspend sleep", ("agent", 3), "sleep_s", 1.2),
    (16, "CudaSuspend wake to first correct token", ("agent", 3), "first_token_s", 0.8),
    (64, "CudaSuspend wake to first correct token", ("agent", 3), "first_token_s", 2.0),
    (16, "L1 wake", ("agent", 1), "wake_s", 0.4),
    (16, "L2 wake (weights in page cache)", ("agent", 2), "wake_s", 1.2),
    (16, "Checkpoint sleep", ("agent", 4), "sleep_s", 1.5),
    (
        16,
        "Checkpoint wake to first correct token (weights in page cache)",
        ("agent", 4),
        "first_token_s",
        2.0,
    ),
)
IMAGE_GOAL_GIB: Final = 1.0  # the Checkpoint image of the reference engine at 16 GiB
# Agent overhead over raw: at most 5 %, or at most 10 ms where raw takes under 0.2 s (a ratio of a
# few milliseconds says nothing).
OVERHEAD_RATIO: Final = 0.05
OVERHEAD_FLOOR_S: Final = 0.010
OVERHEAD_SMALL_S: Final = 0.2
OVERHEAD_RULE: Final = "goal <= 5 %, or <= 10 ms where raw is under 0.2 s"


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Row:
    size_gib: float
    path: str  # agent (the adapter under test), raw, pod, plain, readers-1, tmpfs, cold (and warm-ups)
    adapter: str
    level: int
    sleep_s: float | None = None
    wake_s: float | None = None
    first_token_s: float | None = None
    correct: bool | None = None
    card_awake_mib: int | None = None
    card_asleep_mib: int | None = None
    engine_asleep_mib: int | None = None
    reserved_asleep_bytes: int | None = None
    rss_asleep_bytes: int | None = None
    pinned_asleep_bytes: int | None = None
    image_bytes: int | None = None
    image_fs: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    skipped: str | None = None
    # A median row's cycles, each as measured (timings and details), for results.json only: what
    # the median hides (one slow cycle, or all of them).
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int]:
        return (self.path, self.level)


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else str(value)


TABLE_HEAD: Final = (
    "| path | adapter | level | sleep s | wake s | first correct token s | correct | GPU MiB asleep (card / engine) "
    "| GPU reserved asleep GiB | host GiB asleep (RSS / pinned) | image GiB | notes |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def row_line(r: Row) -> str:
    if r.skipped:
        note = f"skipped: {r.skipped}"
    elif r.error:
        note = f"ERROR: {r.error.splitlines()[0][:200]}"
    else:
        note = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.details.items())
    correct = "-" if r.correct is None else ("yes" if r.correct else "**NO**")
    image = _gib(r.image_bytes) + (f" ({r.image_fs})" if r.image_fs else "")
    return (
        f"| {r.path} | {r.adapter} | {r.level} | {_f(r.sleep_s)} | {_f(r.wake_s)} | {_f(r.first_token_s)} | {correct} "
        f"| {_mib(r.card_asleep_mib)} / {_mib(r.engine_asleep_mib)} | {_gib(r.reserved_asleep_bytes)} "
        f"| {_gib(r.rss_asleep_bytes)} / {_gib(r.pinned_asleep_bytes)} | {image} | {note} |"
    )


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "-"
    return f"{a / b:.1f}x"


def comparisons(rows: Sequence[Row]) -> list[str]:
    by = {r.key: r for r in rows if not r.skipped and not r.error}
    lines = []
    for level in (1, 2, 3, 4):
        agent, raw = by.get(("agent", level)), by.get(("raw", level))
        if agent and raw and agent.sleep_s and raw.sleep_s and agent.wake_s and raw.wake_s:
            lines.append(
                f"- agent overhead, level {level} ({agent.adapter} vs raw): sleep {agent.sleep_s / raw.sleep_s - 1:+.1%}, "
                f"wake {agent.wake_s / raw.wake_s - 1:+.1%} ({'met' if overhead_met(agent, raw) else 'not met'}: {OVERHEAD_RULE})"
            )
    for level in (1, 2, 3, 4):
        pod, raw = by.get(("pod", level)), by.get(("raw", level))
        if pod and raw and pod.sleep_s and raw.sleep_s and pod.wake_s and raw.wake_s:
            token = ""
            if pod.first_token_s and raw.first_token_s:
                token = (
                    f", first correct token {pod.first_token_s / raw.first_token_s - 1:+.1%} "
                    f"({_f(pod.first_token_s)} vs {_f(raw.first_token_s)} s)"
                )
            lines.append(
                f"- pod vs raw, level {level} (the agent's Levels + PodRef on the engine in a SimPod vs bare "
                f"mechanisms on the host engine): sleep {pod.sleep_s / raw.sleep_s - 1:+.1%} "
                f"({_f(pod.sleep_s)} vs {_f(raw.sleep_s)} s), wake {pod.wake_s / raw.wake_s - 1:+.1%} "
                f"({_f(pod.wake_s)} vs {_f(raw.wake_s)} s){token}"
            )
    for level, name in ((3, "CudaSuspend"), (4, "Checkpoint")):
        fast, plain = by.get(("agent", level)), by.get(("plain", level))
        if fast and plain:
            lines.append(
                f"- {name} engine-assisted vs plain: sleep {_f(fast.sleep_s)} vs {_f(plain.sleep_s)} s "
                f"({_ratio(plain.sleep_s, fast.sleep_s)} faster), wake to first correct token "
                f"{_f(fast.first_token_s)} vs {_f(plain.first_token_s)} s ({_ratio(plain.first_token_s, fast.first_token_s)})"
                + (f", image {_gib(fast.image_bytes)} vs {_gib(plain.image_bytes)} GiB" if level == 4 else "")
            )
    one, eight = by.get(("readers-1", 2)), by.get(("agent", 2))
    if one and eight:
        r1, r8 = one.details.get("reload_s"), eight.details.get("reload_s")
        lines.append(
            f"- weights reload (page cache warm): 1 reader {_f(r1)} s, {eight.details.get('readers', '?')} readers {_f(r8)} s"
            f" ({_ratio(r1, r8)}); whole level-2 wake {_f(one.wake_s)} vs {_f(eight.wake_s)} s"
        )
    cold = by.get(("cold", 2))
    if cold:
        lines.append(
            f"- weights reload with a cold page cache: {_f(cold.details.get('reload_s'))} s, wake {_f(cold.wake_s)} s"
        )
    disk, tmpfs = by.get(("agent", 4)), by.get(("tmpfs", 4))
    if disk and tmpfs:
        lines.append(
            f"- Checkpoint image on tmpfs vs {disk.image_fs or 'disk'}: sleep {_f(tmpfs.sleep_s)} vs {_f(disk.sleep_s)} s, "
            f"wake {_f(tmpfs.wake_s)} vs {_f(disk.wake_s)} s"
        )
    return lines


class Report:
    def __init__(self, path: Path, json_path: Path | None, section: str, header: list[str]) -> None:
        self.path = path
        self.json_path = json_path
        self.section = section
        self.header = header
        self.sizes: dict[float, list[Row]] = {}
        self.notes: dict[float, list[str]] = {}
        self.status = "in progress"

    def add(self, row: Row) -> None:
        self.sizes.setdefault(row.size_gib, []).append(row)
        say(f"  {row_line(row)}")
        self.write()

    def note(self, size: float, text: str) -> None:
        self.notes.setdefault(size, []).append(text)
        say(f"  note: {text}")
        self.write()

    def render(self) -> str:
        out = [*self.header, f"Status: {self.status}.", ""]
        for size, rows in self.sizes.items():
            out += [f"### {size:g} GiB of weights", ""]
            out += [f"- {n}" for n in self.notes.get(size, [])]
            out += ["", TABLE_HEAD, *(row_line(r) for r in rows), ""]
            comp = comparisons(rows)
            if comp:
                out += ["Comparisons:", "", *comp, ""]
            table = goals(size, rows)
            if table:
                out += [*table, ""]
        return "\n".join(out) + "\n"

    def write(self) -> None:
        write_section(self.path, f"wake-bench:{self.section}", self.render())
        if self.json_path is not None:
            rows = [asdict(r) for rs in self.sizes.values() for r in rs]
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(
                json.dumps({"status": self.status, "header": self.header, "rows": rows}, indent=1)
            )

    def print_table(self, size: float) -> None:
        say(f"\n== {size:g} GiB ==")
        say(TABLE_HEAD)
        for r in self.sizes.get(size, []):
            say(row_line(r))
        for line in comparisons(self.sizes.get(size, [])):
            say(line)
        for line in goals(size, self.sizes.get(size, [])):
            say(line)
        say("")


def _within(mine: float, raw: float) -> bool:
    slack = 1e-9  # timings are floats: 0.050 - 0.040 is a hair over 0.010
    if raw < OVERHEAD_SMALL_S:
        return mine - raw <= OVERHEAD_FLOOR_S + slack
    return mine / raw - 1 <= OVERHEAD_RATIO + slack


def overhead_met(agent: Row, raw: Row) -> bool:
    """The agent's sleep and wake against raw's, each by the overhead rule."""
    pairs = ((agent.sleep_s, raw.sleep_s), (agent.wake_s, raw.wake_s))
    return all(a is not None and r is not None and _within(a, r) for a, r in pairs)


def median_row(rows: Sequence[Row]) -> Row:
    """One row for repeated cycles of a path and level: the median of each timing over the cycles
    that ran, correct only if every cycle answered correctly, the rest from the median-wake cycle;
    the first error or skip wins, so a failed cycle is never hidden by a median."""
    if not rows:
        raise ValueError("no cycles to take the median of")
    for r in rows:
        if r.error or r.skipped:
            bad = Row(**{f.name: getattr(r, f.name) for f in fields(Row)})
            bad.details = {**r.details, "cycle": list(rows).index(r) + 1, "cycles": len(rows)}
            return bad
    ran = sorted(rows, key=lambda r: r.wake_s if r.wake_s is not None else 0.0)
    middle = ran[(len(ran) - 1) // 2]
    out = Row(**{f.name: getattr(middle, f.name) for f in fields(Row)})
    for name in ("sleep_s", "wake_s", "first_token_s"):
        values = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        setattr(out, name, statistics.median(values) if values else None)
    out.correct = all(r.correct for r in rows)
    details: dict[str, Any] = {}
    for key in middle.details:
        values = [r.details[key] for r in rows if isinstance(r.details.get(key), int | float)]
        details[key] = statistics.median(values) if len(values) == len(rows) else middle.details[key]
    details["cycles"] = len(rows)
    out.details = details
    out.samples = [
        {"sleep_s": r.sleep_s, "wake_s": r.wake_s, "first_token_s": r.first_token_s, **r.details}
        for r in rows
    ]
    return out


def goals(size: float, rows: Sequence[Row]) -> list[str]:
    """The goals for this size as a table (empty where none is set for it)."""
    by = {r.key: r for r in rows if not r.skipped and not r.error}
    lines = [f"| goal ({size:g} GiB) | target | measured | met |", "|---|---|---|---|"]
    for goal_size, label, key, attr, limit in GOALS:
        if goal_size != size:
            continue
        row = by.get(key)
        value = getattr(row, attr) if row else None
        ok = "-" if value is None else ("yes" if value <= limit and row and row.correct else "**no**")
        lines.append(f"| {label} | <= {limit} s | {_f(value)} | {ok} |")
    if size == 16:
        image = by.get(("agent", 4))
        got = image.image_bytes if image else None
        ok = "-" if got is None else ("yes" if got <= IMAGE_GOAL_GIB * GIB else "**no**")
        lines.append(f"| Checkpoint image | <= {IMAGE_GOAL_GIB:g} GiB | {_gib(got)} | {ok} |")
        for level in (1, 2, 3, 4):
            agent, raw = by.get(("agent", level)), by.get(("raw", level))
            if agent and raw and None not in (agent.sleep_s, agent.wake_s, raw.sleep_s, raw.wake_s):
                assert agent.sleep_s is not None and raw.sleep_s is not None
                assert agent.wake_s is not None and raw.wake_s is not None
                measured = (
                    f"sleep {(agent.sleep_s - raw.sleep_s) * 1000:+.0f} ms ({agent.sleep_s / raw.sleep_s - 1:+.1%}), "
                    f"wake {(agent.wake_s - raw.wake_s) * 1000:+.0f} ms ({agent.wake_s / raw.wake_s - 1:+.1%})"
                )
                met = "yes" if overhead_met(agent, raw) else "**no**"
                lines.append(
                    f"| agent overhead over raw, level {level} | {OVERHEAD_RULE[5:]} | {measured} | {met} |"
                )
    return lines if len(lines) > 2 else []
