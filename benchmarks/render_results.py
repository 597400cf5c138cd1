"""Render docs/results.md from the result files in benchmarks/results/*.json (see harness.py).

    python benchmarks/render_results.py            # writes docs/results.md
    python benchmarks/render_results.py --check    # exit 1 if docs/results.md is not what the files give

Every section is one result file: its title, the command that produced it, when, at which commit,
on which machine (CPU, cores, torch threads, GPU, load average) and with which package versions,
the settings all rows share, and the rows as a table. Nothing in docs/results.md is written by
hand: `make bench` measures and renders again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness

OUTPUT = harness.ROOT / "docs" / "results.md"

HEADER = """# Results

Every figure below comes from a JSON file in `benchmarks/results/`, written by the benchmark named
with it, and this page is rendered from those files by `python benchmarks/render_results.py`
(`make bench` runs the benchmarks and renders it again). Each section says when, at which commit
and on which machine it was measured, with the load average of that machine during the run: on a
shared machine absolute times vary with the load, so compare the figures within one table, which
were measured in one run under the same conditions.
"""


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value).replace("|", "\\|")


def table(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows
    ]
    return "\n".join(lines)


def stamp_line(environment: dict) -> str:
    """When, where and with what, in one paragraph."""
    commit = environment.get("commit") or "unknown commit"
    if environment.get("uncommitted_changes"):
        commit += " (with uncommitted changes)"
    machine = f"{environment.get('cpu', 'unknown CPU')}, {environment.get('cores')} cores"
    if environment.get("threads") is not None:
        machine += f", {environment['threads']} torch threads"
    if environment.get("gpu"):
        machine += f", GPU {environment['gpu']}"
    load = environment.get("load_average")
    if load:
        start = environment.get("load_average_at_start")
        load_text = f"load average (1/5/15 min) {' / '.join(f'{x:g}' for x in load)} at the end"
        if start:
            load_text = (
                f"load average (1/5/15 min) {' / '.join(f'{x:g}' for x in start)} at the start, "
                f"{' / '.join(f'{x:g}' for x in load)} at the end"
            )
        machine += f"; {load_text}"
    packages = ", ".join(
        f"{name} {version}" for name, version in environment.get("packages", {}).items()
    )
    return (
        f"Measured {environment.get('when', 'at an unknown time')} at commit {commit} on {machine}. "
        f"Python {environment.get('python', '?')}; {packages}."
    )


def section(record: dict, source: Path) -> str:
    parts = [
        f"## {record['title']}",
        "",
        f"From `benchmarks/results/{source.name}`, written by `{record['command']}`.",
        "",
        stamp_line(record["environment"]),
        "",
    ]
    settings = record.get("settings") or {}
    if settings:
        parts += [
            "Settings: "
            + "; ".join(f"{key} {_cell(value)}" for key, value in settings.items())
            + ".",
            "",
        ]
    if record.get("notes"):
        parts += [record["notes"], ""]
    parts += [table(record["columns"], record["rows"]) if record["rows"] else "(no rows)", ""]
    return "\n".join(parts)


def load_records(folder: Path) -> list[tuple[Path, dict]]:
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SystemExit(
                f"{path} is not valid JSON ({error}); measure again or remove it."
            ) from None
        missing = [
            key
            for key in ("title", "command", "environment", "columns", "rows")
            if key not in record
        ]
        if missing:
            raise SystemExit(
                f"{path} lacks {missing}: it was not written by benchmarks/harness.py's save()."
            )
        records.append((path, record))
    return records


def render(folder: Path = harness.RESULTS_DIR) -> str:
    sections = [section(record, path) for path, record in load_records(folder)]
    if not sections:
        sections = ["No result files yet: run `make bench`.\n"]
    return HEADER + "\n" + "\n".join(sections)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--results", type=Path, default=harness.RESULTS_DIR, help="folder of result files"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument(
        "--check", action="store_true", help="only check that the output is up to date"
    )
    args = parser.parse_args(argv)
    text = render(args.results)
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            sys.exit(
                f"{args.output} is not what {args.results} gives; run python benchmarks/render_results.py."
            )
        return
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
