"""The README's faults table is the one rendered from the suite's results, never edited by hand."""

from __future__ import annotations

import pytest

from tests.faults import report

pytestmark = pytest.mark.faults


def test_readme_table_is_rendered_from_the_results() -> None:
    text = report.README.read_text(encoding="utf-8")
    assert report.rendered_readme(text, report.load()) == text, (
        "README.md's faults table differs from tests/faults/results/results.json: "
        "run `python -m tests.faults.report` (the suite re-renders it after each case)")


def test_every_recorded_row_has_what_the_table_needs() -> None:
    for key, row in report.load().items():
        assert row["group"] in report.GROUPS, key
        assert row["title"] and row["happened"] and row["measured"], key
        if row["passed"] and row["group"] == "fault":
            assert row["events_lost"] == 0 and row["converge_s"] is not None, key
