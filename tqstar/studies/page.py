"""A results page as it is written: Markdown with an environment header, tables also saved as CSV, figures as
PNG, and the checks the page's prose may state. Nothing here computes a statistic (see `analysis`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..stats import format_mean_se


def fmt(mean, se=None, digits: int = 3) -> str:
    """'0.123 ± 0.004', '0.123', or '–' for a missing value."""
    return format_mean_se(mean, se, digits)


def fmt_across(row, metric: str, digits: int = 3, spread: bool = True) -> str:
    """A metric of an across-seeds row: mean ± s.e. across seeds [min, max of the seeds' values]."""
    mean = row.get(metric)
    text = fmt(mean, row.get(f"{metric}_se_seeds"), digits)
    low, high = row.get(f"{metric}_min"), row.get(f"{metric}_max")
    if spread and text != "–" and row.get("seeds", 1) > 1 and low is not None and not (isinstance(low, float) and math.isnan(low)):
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def markdown_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_lines(env: dict) -> list[str]:
    """The page's header: where, when and with what its runs ran, and whether other work shared the machine."""

    def listed(key, empty="not recorded"):
        values = env.get(key) or []
        return ", ".join(str(v) for v in values) if values else empty

    lines = [f"- source: {env.get('source', 'unknown')}"]
    if env.get("runs") is not None:
        dates = env.get("dates")
        lines.append(f"- runs: {env['runs']}" + (f", dated {dates[0]} to {dates[1]} (run ids)" if dates else ""))
    lines.append(f"- git commit: {listed('git_commits')}")
    lines.append(f"- machine: {listed('hosts')}; CPU: {listed('cpus')}; CPUs: {listed('cpu_count')}; threads per run: {listed('threads')}")
    if env.get("devices"):
        lines.append(f"- devices: {listed('devices')}")
    versions = env.get("versions") or {}
    if versions:
        lines.append("- libraries: " + ", ".join(f"{lib} {'/'.join(map(str, v))}" for lib, v in versions.items()))
    else:
        lines.append("- libraries: not recorded")
    start, end = env.get("load_at_start"), env.get("load_at_end")
    if start:
        cpus = max(env.get("cpu_count") or [0]) or None
        shared = start[1] >= 0.5 or (end is not None and cpus is not None and end[1] > cpus)
        verdict = (
            "other work shared the machine for some runs (the sweep's own parallel jobs count): times are upper bounds"
            if shared
            else "quiet at every run's start"
        )
        lines.append(
            f"- load (1-min average) at run start {start[0]:g}-{start[1]:g}"
            + (f", at run end {end[0]:g}-{end[1]:g}" if end else "")
            + f": {verdict}"
        )
    else:
        lines.append("- load: not recorded")
    if env.get("sweep_seconds"):
        count = env.get("sweep_invocations")
        which = {None: "", "last": ", its last invocation only", "some": ", some sources' last invocation only"}.get(
            count, f", {count} invocations summed" if count != 1 else ""
        )
        lines.append(f"- sweep wall time: {env['sweep_seconds']:.0f} s (executor {env.get('executor')}{which})")
    lines += [f"- note: {note}" for note in env.get("notes") or []]
    return lines


@dataclass
class Page:
    """Sections in order; `save` writes the Markdown, each table's CSV and each figure."""

    study: str
    title: str
    environment: dict
    parts: list[str] = field(default_factory=list)
    tables: dict = field(default_factory=dict)  # name -> DataFrame (written as <study>/<name>.csv)
    figures: dict = field(default_factory=dict)  # name -> callable(path) drawing the PNG
    checks: list[str] = field(default_factory=list)

    def text(self, markdown: str) -> None:
        self.parts.append(markdown.strip())

    def table(self, name: str, header: list[str], rows: list[list[str]], frame=None, align: list[str] | None = None) -> None:
        """A Markdown table, and its numbers in full precision as `<study>/<name>.csv` (the frame given)."""
        self.parts.append(markdown_table(header, rows, align))
        if frame is not None:
            self.tables[name] = frame
            self.parts.append(f"(numbers: [{self.study}/{name}.csv]({self.study}/{name}.csv))")

    def figure(self, name: str, caption: str, draw: Callable[[Path], object]) -> None:
        self.figures[name] = draw
        self.parts.append(f"![{caption}]({self.study}/{name}.png)")

    def check(self, statement: str) -> None:
        """A sentence the page's code established (e.g. what holds on every seed); listed under 'Checks'."""
        self.checks.append(statement)

    def missing(self, what: str, why: str) -> None:
        self.parts.append(f"*{what}: not computed: {why}.*")

    def markdown(self) -> str:
        head = [
            f"# {self.title}",
            "",
            f"Written by `tqstar report` from the archive [{self.study}/]({self.study}/) (its inputs); do not edit by hand: "
            f"regenerate with `tqstar report <that folder>` or `tqstar report --all`.",
            "",
            "## Environment",
            "",
            *environment_lines(self.environment),
        ]
        body = []
        for part in self.parts:
            body += ["", part]
        checks = ["", "## Checks", "", *[f"- {c}" for c in self.checks]] if self.checks else []
        return "\n".join(head + body + checks) + "\n"

    def save(self, out: Path) -> list[Path]:
        folder = out / self.study
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, frame in self.tables.items():
            frame.to_csv(folder / f"{name}.csv", index=False)
            written.append(folder / f"{name}.csv")
        for name, draw in self.figures.items():
            draw(folder / f"{name}.png")
            written.append(folder / f"{name}.png")
        page = out / f"{self.study}.md"
        page.write_text(self.markdown())
        return [page, *written]
