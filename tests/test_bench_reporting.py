"""bench/reporting.py: each benchmark owns one section of bench/RESULTS.md and rewrites only that."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
