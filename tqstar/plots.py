"""Plots of evaluated runs (matplotlib, Agg backend): used by `tqstar evaluate` and sweeps.

Each function takes a DataFrame with one row per run (as `tqstar.evaluate.evaluate_runs` returns),
writes one PNG and returns its path. Missing values (NaN/None) are left out of a plot, never drawn
as zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
LABELS = {  # axis labels of the usual columns
    "reward_mean": "mean reward",
    "baseline_reward_mean": "mean baseline reward",
    "kl": "KL(decoder || SFT) per response (nats)",
    "sft_nll_per_token": "NLL per token under the SFT model (nats)",
    "sft_logprob_per_token": "log-likelihood per token under the SFT model",
    "diversity": "diversity",
    "coherence": "coherence",
    "win_tie_rate": "win + tie rate (%)",
    "alpha": "alpha",
    "tokens_mean": "tokens per response",
    "seconds_per_response": "seconds per response",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _finite(value) -> bool:
    try:
        return value is not None and float(value) == float(value) and abs(float(value)) != float("inf")
    except (TypeError, ValueError):
        return False


def _method_colors(methods: Sequence[str]) -> dict[str, str]:
    return {m: _COLORS[i % len(_COLORS)] for i, m in enumerate(dict.fromkeys(methods))}


def plot_reward_bars(
    df,
    path: str | Path,
    value: str = "reward_mean",
    err: str | None = "reward_stderr",
    label: str = "label",
    title: str | None = None,
    ylabel: str | None = None,
) -> Path:
    """One bar per run (coloured by method) with standard-error bars."""
    plt = _pyplot()
    path = Path(path)
    records = [r for r in df.to_dict("records") if _finite(r.get(value))]
    colors = _method_colors([str(r.get("method", "")) for r in records])
    width = max(4.5, 0.9 * len(records) + 2.0)
    fig, ax = plt.subplots(figsize=(width, 4.2))
    xs = list(range(len(records)))
    heights = [float(r[value]) for r in records]
    errors = [float(r[err]) if err and _finite(r.get(err)) else 0.0 for r in records]
    ax.bar(xs, heights, yerr=errors, capsize=4, color=[colors[str(r.get("method", ""))] for r in records], edgecolor="black", linewidth=0.6)
    ax.set_xticks(xs)
    crowded = len(records) > 3  # slanted labels only when they would collide
    ax.set_xticklabels([str(r[label]) for r in records], rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel(ylabel or LABELS.get(value, value))
    ax.set_xlabel("run" + ("  (error bars: ±1 standard error)" if err else ""))
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or LABELS.get(value, value))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_frontier(
    df,
    x: str,
    y: str,
    label_cols: Sequence[str],
    path: str | Path,
    xerr: str | None = None,
    yerr: str | None = None,
    group: str = "method",
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logx: bool = False,
    reference: tuple[Sequence[float], Sequence[float], str] | None = None,
    xmax: float | None = None,
) -> Path:
    """One point per run: `y` against `x`, points of one `group` (method) joined in order of x and
    each annotated with the values of `label_cols` (e.g. ["method", "alpha"] or ["label"]); `logx`
    puts x on a log scale (compute budgets); `reference` = (xs, ys, label) draws a curve behind the
    points (e.g. the optimum's frontier); `xmax` cuts the x axis (points beyond it are left out of view)."""
    plt = _pyplot()
    path = Path(path)
    records = [r for r in df.to_dict("records") if _finite(r.get(x)) and _finite(r.get(y))]
    colors = _method_colors([str(r.get(group, "")) for r in records])
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    if reference is not None:
        xs, ys, name = reference
        ax.plot(list(xs), list(ys), "k--", linewidth=1.5, label=name, zorder=1)
    for name, color in colors.items():
        points = sorted((r for r in records if str(r.get(group, "")) == name), key=lambda r: float(r[x]))
        xs, ys = [float(r[x]) for r in points], [float(r[y]) for r in points]
        ax.errorbar(
            xs,
            ys,
            xerr=[float(r[xerr]) if xerr and _finite(r.get(xerr)) else 0.0 for r in points],
            yerr=[float(r[yerr]) if yerr and _finite(r.get(yerr)) else 0.0 for r in points],
            fmt="o-" if len(points) > 1 else "o",
            color=color,
            capsize=3,
            label=name,
            markersize=6,
            linewidth=1.2,
        )
        for r in points:
            text = " ".join(piece for piece in (_format_label(c, r.get(c)) for c in label_cols) if piece)
            ax.annotate(text, (float(r[x]), float(r[y])), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(xlabel or LABELS.get(x, x))
    ax.set_ylabel(ylabel or LABELS.get(y, y))
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    if records or reference is not None:
        ax.legend(title=group, fontsize=8, title_fontsize=8, loc="best")
        ax.margins(x=0.15, y=0.12)
        if xmax is not None:
            ax.set_xlim(left=max(ax.get_xlim()[0], -0.03 * xmax), right=xmax)
    else:
        ax.text(0.5, 0.5, f"no run has both {x} and {y}", transform=ax.transAxes, ha="center", va="center")
    ax.set_title(title or f"{LABELS.get(y, y)} vs {LABELS.get(x, x)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _format_label(column: str, value) -> str:
    """'tqstar', 'α=2', 'top_k=10'; '' for a missing value (best-of-n has no alpha)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if column in ("label", "method"):
        return str(value)
    name = {"alpha": "α"}.get(column, column)
    return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
