"""Reporting of evaluated runs: the comparison DataFrame, its table (console and markdown) and plots.

Pure presentation of numbers `tqstar.evaluate` computed; nothing here computes a metric. Runs are
duck-typed (`RunLike`: label, method, cfg.decoder, metrics, settings, given, path) so this module
never imports `tqstar.evaluate`: evaluate imports report, not the reverse. The plots themselves are
drawn by `tqstar.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

from .stats import format_mean_se


class RunLike(Protocol):
    """What the report reads of an evaluated run (`tqstar.evaluate.Run` is one)."""

    path: Path
    cfg: Any  # its config; cfg.decoder is read
    given: str
    label: str
    metrics: dict
    settings: dict

    @property
    def method(self) -> str: ...


def to_frame(runs: Sequence[RunLike], reference: RunLike | None):
    """One DataFrame row per evaluated run: its decoder settings, metrics, reward name and path as given."""
    import pandas as pd

    records = []
    for run in runs:
        decoder = run.cfg.decoder
        records.append(
            {
                "label": run.label,
                "method": run.method,
                "alpha": decoder.get("alpha"),
                "top_k": decoder.get("top_k"),
                "selection": decoder.get("selection"),
                "is_reference": run is reference,
                **run.metrics,
                "reward_name": run.settings.get("reward"),
                "run": run.given or str(run.path),
            }
        )
    return pd.DataFrame.from_records(records)


TABLE_COLUMNS = [  # (header, how to render a row)
    ("run", lambda r: str(r["label"]) + (" (ref)" if r.get("is_reference") else "")),
    ("n", lambda r: f"{int(r['num_prompts'])}"),
    ("reward", lambda r: _pm(r.get("reward_mean"), r.get("reward_stderr"))),
    ("r_bl", lambda r: _pm(r.get("baseline_reward_mean"), r.get("baseline_reward_stderr"))),
    ("gold", lambda r: _pm(r.get("gold_reward_mean"), r.get("gold_reward_stderr"))),
    ("Δ reward vs ref", lambda r: _pm(r.get("reward_diff_vs_reference"), r.get("reward_diff_vs_reference_stderr"))),
    ("win/tie/lose %", lambda r: _wtl(r, "")),
    ("judge w/t/l %", lambda r: _wtl(r, "judge_")),
    ("diversity", lambda r: _num(r.get("diversity"), 3)),
    ("rep-2/3/4", lambda r: "/".join(_num(r.get(f"rep_{n}"), 1) for n in (2, 3, 4))),
    ("coherence", lambda r: _num(r.get("coherence"), 3)),
    ("SFT logp/tok", lambda r: _num(r.get("sft_logprob_per_token"), 3)),
    ("KL", lambda r: _num(r.get("kl"), 3) + (" (bound)" if r.get("kl_source") == "best_of_n_bound" else "")),
    ("Q spread", lambda r: _pm(r.get("q_spread"), r.get("q_spread_stderr"))),  # traced runs only
    ("optimism", lambda r: _pm(r.get("optimism_gap"), r.get("optimism_gap_stderr"))),
    ("tokens", lambda r: _num(r.get("tokens_mean"), 1)),
    ("chars", lambda r: _num(r.get("chars_mean"), 0)),
    ("s/resp", lambda r: _num(r.get("seconds_per_response"), 3)),
    ("tok/s", lambda r: _num(r.get("tokens_per_second"), 1)),
    ("fwd tok/resp", lambda r: _num(r.get("forward_tokens_per_response"), 0)),
    ("FLOPs/resp", lambda r: "–" if _missing(r.get("flops_per_response")) else f"{float(r['flops_per_response']):.2e}"),
]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _num(value, digits: int) -> str:
    return "–" if _missing(value) else f"{float(value):.{digits}f}"


def _pm(mean, stderr) -> str:
    return format_mean_se(mean, stderr)


def _wtl(row, prefix: str) -> str:
    if _missing(row.get(f"{prefix}win_rate")):
        return "–"
    return "/".join(f"{row[f'{prefix}{k}_rate']:.0f}" for k in ("win", "tie", "lose"))


def table_rows(df) -> list[list[str]]:
    records = df.to_dict("records")
    columns = [(h, f) for h, f in TABLE_COLUMNS if any(f(r) not in ("–", "–/–/–") for r in records) or h in ("run", "reward")]
    return [[h for h, _ in columns]] + [[f(r) for _, f in columns] for r in records]


def write_markdown(rows: list[list[str]], path: Path, title: str) -> None:
    escape = lambda cell: cell.replace("|", "\\|")  # noqa: E731
    lines = [
        f"# {title}",
        "",
        "| " + " | ".join(map(escape, rows[0])) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(rows[0]))) + "|",
    ]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows[1:]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


DROP_FIRST = (
    "chars",
    "tok/s",
    "fwd tok/resp",
    "rep-2/3/4",
    "s/resp",
    "Q spread",
    "optimism",
    "r_bl",
    "tokens",
    "judge w/t/l %",
)  # on a narrow terminal


def _natural_width(rows: list[list[str]]) -> int:
    return sum(max(len(row[i]) for row in rows) + 3 for i in range(len(rows[0]))) + 1


def print_table(console, rows: list[list[str]], title: str) -> None:
    """The comparison on the console: whole when piped, without the minor columns on a narrow terminal."""
    from rich.table import Table

    width = console.width if console.is_terminal else max(console.width, _natural_width(rows))
    dropped = []
    for header in DROP_FIRST:
        if _natural_width(rows) <= width or header not in rows[0]:
            continue
        i = rows[0].index(header)
        rows = [row[:i] + row[i + 1 :] for row in rows]
        dropped.append(header)
    table = Table(title=title)
    for i, header in enumerate(rows[0]):
        table.add_column(header, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows[1:]:
        table.add_row(*row)
    saved = console.width
    console.width = width  # piped or logged output has no terminal width to respect: one line per run
    try:
        console.print(table)
    finally:
        console.width = saved
    if dropped:
        console.print(f"(narrow terminal: {', '.join(dropped)} left out; the full table is in comparison.md)")


def write_plots(df, folder: Path, reward_names: Sequence[str]) -> list[Path]:
    """reward.png (mean reward per run) and frontier.png (reward vs KL, else vs SFT NLL per token) in `folder`."""
    from .plots import plot_frontier, plot_reward_bars

    written = [plot_reward_bars(df, folder / "reward.png", title=f"Mean reward ({', '.join(reward_names)})")]
    x = "kl" if df["kl"].notna().all() else "sft_nll_per_token"
    written.append(
        plot_frontier(
            df,
            x=x,
            y="reward_mean",
            label_cols=["label"],
            path=folder / "frontier.png",
            yerr="reward_stderr",
            title="Reward vs distance from the SFT model",
        )
    )
    return written
