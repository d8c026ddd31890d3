"""Samples → one row each: median, p99 (or max), ratio to a baseline, target verdict.

These machines are noisy and shared: absolute times move from run to run,
ratios against a baseline measured in the same run hold. So every row that
has a natural baseline names it and shows the ratio.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Below this many samples a "p99" is just the maximum: call it that.
P99_MIN_SAMPLES = 100


@dataclass
class Row:
    section: str
    what: str
    unit: str  # "ms", "s", "MB", "rules", ...
    samples: list[float]
    baseline: str = ""  # `what` of the row this one is compared with
    target: str = ""  # human text, e.g. "≤ 3 ms", "≤ 2x baseline"
    # Given the row (and its baseline row, if any): True met, False missed.
    check: Callable[[Row, Row | None], bool] | None = field(default=None, repr=False)
    note: str = ""
    error: str = ""
    short: str = ""  # how other rows name this one when it is their baseline

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def tail(self) -> float:
        """p99 (nearest rank) with enough samples, else the maximum."""
        if not self.samples:
            return math.nan
        ordered = sorted(self.samples)
        if len(ordered) < P99_MIN_SAMPLES:
            return ordered[-1]
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]

    @property
    def tail_label(self) -> str:
        return "p99" if self.n >= P99_MIN_SAMPLES else "max"


class Results:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.started = time.time()
        self.load_at_start = os.getloadavg()

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def failed(self, section: str, what: str, error: str) -> None:
        self.rows.append(Row(section, what, "", [], error=error))

    def find(self, what: str) -> Row | None:
        return next((r for r in self.rows if r.what == what), None)

    def ratio(self, row: Row) -> float | None:
        base = self.find(row.baseline) if row.baseline else None
        if base is None or not base.samples or not row.samples or base.median == 0:
            return None
        return row.median / base.median

    def verdict(self, row: Row) -> str:
        if row.error:
            return "NOT MEASURED"
        if row.check is None:
            return ""
        base = self.find(row.baseline) if row.baseline else None
        if row.baseline and (base is None or not base.samples):
            return "NOT MEASURED (no baseline)"
        return "met" if row.check(row, base) else "MISSED"


def _num(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


HEADER = ["section", "measurement", "n", "median", "p99 / max", "vs baseline", "target", "verdict"]


def table_rows(results: Results) -> list[list[str]]:
    out = []
    for r in results.rows:
        if r.error:
            out.append(
                [r.section, r.what, "0", "-", "-", "-", r.target, f"NOT MEASURED: {r.error}"]
            )
            continue
        ratio = results.ratio(r)
        base = results.find(r.baseline)
        label = (base.short or base.what) if base is not None else ""
        vs = f"{ratio:.2f}x {label}" if ratio is not None else ""
        tail = "" if r.n <= 1 else f"{_num(r.tail)} {r.unit} ({r.tail_label})"
        verdict = results.verdict(r)
        if r.note:
            verdict = f"{verdict} — {r.note}" if verdict else r.note
        out.append(
            [r.section, r.what, str(r.n), f"{_num(r.median)} {r.unit}", tail, vs, r.target, verdict]
        )
    return out


def render_text(results: Results) -> str:
    rows = [HEADER, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(results: Results) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in table_rows(results):
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def machine_description(load_at_start: tuple[float, float, float]) -> list[tuple[str, str]]:
    end = os.getloadavg()
    return [
        ("CPU model", _cpu_model()),
        ("nproc", str(os.cpu_count())),
        ("memory", _mem_total()),
        ("kernel", platform.release()),
        ("python", platform.python_version()),
        ("load average at start (1/5/15 min)", " / ".join(f"{x:.2f}" for x in load_at_start)),
        ("load average at end (1/5/15 min)", " / ".join(f"{x:.2f}" for x in end)),
    ]


BEGIN = "<!-- BEGIN GENERATED: python -m bench.run --write docs/benchmarks.md -->"
END = "<!-- END GENERATED -->"


def generated_section(results: Results, argv: Sequence[str], duration: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results.started))
    lines = [
        BEGIN,
        "",
        f"Run: `{' '.join(['python -m bench.run', *argv])}` — {when}, {duration:.0f} s.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {_md_cell(v)} |" for k, v in machine_description(results.load_at_start)),
        "",
        render_markdown(results),
        "",
        END,
    ]
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    """Replace the generated section of `path`, keeping the hand-written text."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = (text.rstrip() + "\n\n" if text else "") + section + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
