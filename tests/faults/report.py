"""The fault suite's results: one JSON file the tests write, and the README table rendered from it.

Each test records one row (a fault or a hostile input) with what happened, the events
lost and the time to converge, as it measured them; the README's table between the
``<!-- faults-table -->`` markers is re-rendered from the whole file after every record,
so it always shows the latest measured row of each case, never hand-written numbers.

    python -m tests.faults.report          # re-render the README table from the results
    python -m tests.faults.report --check  # exit 1 if the README table is not the rendered one
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "results.json"
README = REPO / "README.md"
BEGIN = "<!-- faults-table -->"
END = "<!-- /faults-table -->"
#: Table order: faults first, then hostile input against the containers, then host-level fuzzing.
GROUPS = ("fault", "input", "fuzz")


def load(path: Path = RESULTS) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def record(key: str, *, group: str, title: str, happened: str, events_lost: int | None,
           converge_s: float | None, passed: bool, order: int, **details: Any) -> None:
    """Store one measured row (replacing the previous one of the same key) and re-render the README."""
    assert group in GROUPS, group
    results = load()
    results[key] = {
        "group": group, "order": order, "title": title, "happened": happened, "events_lost": events_lost,
        "converge_s": None if converge_s is None else round(converge_s, 1), "passed": passed,
        "measured": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", **details,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(results.items())), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, RESULTS)
    update_readme(results)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: dict[str, dict[str, Any]]) -> str:
    rows = sorted(results.values(), key=lambda r: (GROUPS.index(r["group"]), r["order"], r["title"]))
    lines = ["| fault or input | what happened | events lost | time to converge | measured |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lost = "—" if r["events_lost"] is None else str(r["events_lost"])
        converge = "—" if r["converge_s"] is None else f"{r['converge_s']:.1f} s"
        verdict = "" if r["passed"] else "**FAILED**: "
        lines.append(f"| {_cell(r['title'])} | {verdict}{_cell(r['happened'])} | {lost} | {converge} | "
                     f"{r['measured'][:10]} |")
    return "\n".join(lines)


def rendered_readme(text: str, results: dict[str, dict[str, Any]]) -> str:
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"README.md has no {BEGIN} ... {END} markers")
    return f"{head}{BEGIN}\n{render(results)}\n{END}{tail}"


def update_readme(results: dict[str, dict[str, Any]] | None = None) -> bool:
    """Re-render the table in README.md; True if it changed."""
    text = README.read_text(encoding="utf-8")
    new = rendered_readme(text, load() if results is None else results)
    if new == text:
        return False
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, README)
    return True


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        text = README.read_text(encoding="utf-8")
        if rendered_readme(text, load()) != text:
            print("README.md's faults table is not the one rendered from", RESULTS, file=sys.stderr)
            return 1
        return 0
    update_readme()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
