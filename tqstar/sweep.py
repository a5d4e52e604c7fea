"""`tqstar sweep`: a grid of decodes, resumable, aggregated, plotted; inline, local processes or Slurm.

The grid uses Hydra's override grammar (`decoder=tqstar,cd decoder.alpha=0.5,1,2`,
`decoder.top_k=range(5,11,5)`, `choice(...)`), or a named sweep in `conf/sweep/<name>.yaml`.
Every point is an ordinary decode whose run folder lives in the sweep folder; a point's folder is
found again from its config hash, so rerunning a sweep skips finished points and resumes partial
ones. Inline, each model is loaded once per process and reused across points.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from .config import compose, conf_dir, did_you_mean, group_options, validate
from .errors import ConfigError
from .methods import METHODS
from .testbeds import names as testbed_names
from .testbeds import prefix_of

EXECUTORS = ("inline", "local", "slurm")
ARCHIVE_POINTS = "points.csv"  # a report archive's table of points (tqstar.studies.sources writes it)


@dataclass
class SweepSpec:
    grid: list[str]  # overrides, some with several values (applied to every arm)
    name: str | None = None
    arms: dict[str, list[str]] = field(default_factory=dict)  # name -> a grid of its own; points = union over arms
    executor: str = "inline"
    jobs: int = 2  # local: processes at once
    slurm: dict = field(default_factory=dict)  # partition, gpus_per_node, timeout_min, cpus_per_task, mem_gb, ...
    gold_reward: str | None = None  # a reward config that also scores every run (gold columns; the guide is the run's own)


def expand_grid(overrides: Sequence[str]) -> list[list[str]]:
    """All points of the grid: the product of every override's values, in the order given."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise ConfigError(f"cannot parse sweep override: {str(exc).splitlines()[0]}") from None
    axes: dict[str, list[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise ConfigError(f"'{override.input_line}': only lists, range() and choice() can be swept (no intervals)")
            axes[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(point) for point in itertools.product(*axes.values())]


def expand_arms(grid: Sequence[str], arms: dict[str, list[str]] | None) -> list[tuple[str, list[str]]]:
    """(arm, point) for every point: without arms, the grid's product (arm ""); with arms, the union
    over arms of the product of the arm's own overrides and then the shared grid (so a command-line
    override wins over both). Points that compose the same overrides twice are kept once."""
    if not arms:
        return [("", point) for point in expand_grid(grid)]
    seen: set[tuple[str, ...]] = set()
    out: list[tuple[str, list[str]]] = []
    for arm, overrides in arms.items():
        for point in expand_grid(list(overrides) + list(grid)):
            key = tuple(sorted(point))
            if key not in seen:
                seen.add(key)
                out.append((arm, point))
    return out


def load_named_sweep(name: str) -> dict:
    path = conf_dir() / "sweep" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no named sweep '{name}'; {did_you_mean(name, group_options('sweep'))}")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    allowed = ("grid", "arms", "executor", "jobs", "slurm", "description", "gold_reward")
    unknown = set(data) - set(allowed)
    if unknown:
        raise ConfigError(f"conf/sweep/{name}.yaml: unknown key(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
    arms = data.get("arms") or {}
    if not isinstance(arms, dict) or not all(isinstance(v, list) for v in arms.values()):
        raise ConfigError(f"conf/sweep/{name}.yaml: arms must map a name to a list of overrides")
    return data


def sweep_id(grid: Sequence[str]) -> str:
    return "sweep-" + hashlib.sha256("\n".join(grid).encode()).hexdigest()[:8]


def sweep_folder(grid: Sequence[str], name: str | None, arms: dict[str, list[str]] | None = None) -> tuple[Path, list[list[str]]]:
    """The sweep's folder (placed by the grid's own output_dir, if it sets one) and its points."""
    points = [point for _, point in expand_arms(grid, arms)]
    if not points:
        raise ConfigError("the sweep grid is empty")
    first = compose(points[0])
    folder = Path(str(first.output_dir)).expanduser() / "sweeps" / (name or sweep_id(grid))
    return folder, points


def point_config(point: Sequence[str], folder: Path):
    """A point's validated config, its run folder placed inside the sweep folder."""
    cfg = validate(compose(list(point) + [f"output_dir={folder.parent}", f"experiment_name={folder.name}"]))
    return cfg


def archived(points: list[list[str]], folder: Path, archive: str | Path) -> list[list[str]]:
    """The points a report archive (`docs/results/<study>`, as `tqstar report` leaves it) already holds: a run of the
    same identity, whose folder name ends in the point's config hash. So a fresh clone continues a study whose run
    folders it does not have, and a point whose config has changed since (a new key, a new build recipe) runs again."""
    import pandas as pd

    from .identity import config_hash

    path = Path(archive) / ARCHIVE_POINTS
    if not path.is_file():
        raise ConfigError(f"{str(archive)!r} is not a report archive with points (no {ARCHIVE_POINTS}); give docs/results/<study>")
    hashes = {str(run).rsplit("-", 1)[-1] for run in pd.read_csv(path, usecols=["run"])["run"]}
    return [point for point in points if config_hash(point_config(point, folder)) in hashes]


def run_point(point: list[str], folder: str) -> dict:
    """Decode one grid point (also the function submitit runs in a worker process)."""
    from .decode import run_decode

    cfg = point_config(point, Path(folder))
    result = run_decode(cfg)
    return {"point": point, "run": str(result.run.path), "rows": len(result.rows), "new_rows": result.new_rows, "seconds": result.seconds}


def _executor(spec: SweepSpec, folder: Path):
    import submitit

    logs = folder / "submitit"
    if spec.executor == "local":
        executor = submitit.LocalExecutor(folder=str(logs))
        executor.update_parameters(timeout_min=int(spec.slurm.get("timeout_min", 24 * 60)))
        return executor
    executor = submitit.AutoExecutor(folder=str(logs), cluster="slurm")
    params = {"timeout_min": int(spec.slurm.get("timeout_min", 240))}
    for key in ("slurm_partition", "gpus_per_node", "cpus_per_task", "mem_gb", "slurm_account", "slurm_qos"):
        short = key.removeprefix("slurm_")
        if spec.slurm.get(short) is not None:
            params[key] = spec.slurm[short]
    params["slurm_array_parallelism"] = int(spec.jobs)
    executor.update_parameters(**params)
    return executor


def run_points(points: list[list[str]], folder: Path, spec: SweepSpec, console=None) -> list[dict]:
    """Run every point with the chosen executor; a failing point is reported, the others go on."""
    results: list[dict] = []
    if spec.executor == "inline":
        for number, point in enumerate(points, 1):
            if console:
                console.print(f"[{number}/{len(points)}] {' '.join(point)}")
            try:
                results.append(run_point(point, str(folder)))
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad point must not lose the others
                results.append({"point": point, "error": f"{type(exc).__name__}: {exc}"})
        return results
    return _run_jobs(points, _executor(spec, folder), folder, spec, console)


def _run_jobs(points: list[list[str]], executor, folder: Path, spec: SweepSpec, console=None, poll_seconds: float = 2.0) -> list[dict]:
    """Submit every point as a job and collect the results (in the order the jobs end). slurm: all at once (its
    array parallelism caps them). local: submitit has no cap of its own, so at most `spec.jobs` run at a time and the
    next point starts as soon as any job ends (a point already finished ends in seconds and frees its slot)."""
    results: list[dict] = []
    pending = list(points)
    cap = spec.jobs if spec.executor == "local" else len(points)
    running: list[tuple[list[str], Any]] = []
    if console:
        console.print(
            f"{len(points)} job(s) for the {spec.executor} executor, {min(cap, len(points))} at a time; logs in {folder / 'submitit'}"
        )
    while pending or running:
        while pending and len(running) < cap:
            point = pending.pop(0)
            running.append((point, executor.submit(run_point, point, str(folder))))
        done = [job.done() for _, job in running]  # asked once per job: one that ends meanwhile waits for the next round
        ended = [pair for pair, is_done in zip(running, done) if is_done]
        running = [pair for pair, is_done in zip(running, done) if not is_done]
        if not ended:
            time.sleep(poll_seconds)
            continue
        for point, job in ended:
            try:
                results.append(job.result())
            except Exception as exc:  # noqa: BLE001
                results.append(
                    {"point": point, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"}
                )
    return results


def _point_columns(cfg) -> dict[str, Any]:
    d = cfg.decoder
    testbed = cfg.get(cfg.dataset.name) if cfg.dataset.name in testbed_names() else None  # the build the prompts come from
    return {
        "seed": int(testbed.seed) if testbed is not None else None,
        "baseline": str(cfg.baseline.name_or_path) if METHODS[str(d.method)].needs_baseline else "",
        "method": str(d.method),
        "transfer": str(d.transfer) if d.method == "tqstar" else "",
        "alpha": float(d.alpha),
        "top_k": int(d.top_k),
        "n": int(d.n) if METHODS[str(d.method)].response_level else None,
        "selection": str(d.selection),
        "rollout_len": int(d.rollout.max_new_tokens),
        "rollout_num": int(d.rollout.num),
        "max_new_tokens": int(d.max_new_tokens),
    }


def aggregate(
    folder: Path, points: list[list[str]], console=None, arms: dict[str, list[str]] | None = None, grid=None, gold_reward: str | None = None
):
    """results.csv / results.parquet: one row per point, config columns then metrics; table and plots.
    With `gold_reward` (a reward config name) every run is also scored by it: gold_reward_* columns and
    gold_vs_guide.png (over-optimisation of the guide in view).

    When the points span several build seeds (of the testbed whose prompts they decode), also results_across_seeds.csv: per setting
    (every config column but the seed), the mean over seeds of each point's mean reward with the
    standard error across seeds, the seeds' minimum and maximum, and how many seeds ran."""
    import pandas as pd

    from .evaluate import evaluate_runs
    from .runs import RunFolder

    arm_of = {tuple(point): arm for arm, point in expand_arms(grid, arms)} if arms else {}
    run_paths, config_rows = [], []
    for point in points:
        cfg = point_config(point, folder)
        run = RunFolder.for_config(cfg)
        if run.status().get("status") != "completed":
            continue
        run_paths.append(str(run.path))
        config_rows.append({"arm": arm_of.get(tuple(point), ""), "point": " ".join(point), "run": str(run.path), **_point_columns(cfg)})
    if not run_paths:
        raise ConfigError(f"no completed points in {folder} to aggregate")
    gold = [f"reward@gold_reward={gold_reward}"] if gold_reward else []
    metrics = evaluate_runs(run_paths, overrides=gold, console=None, comparison_dir=folder / "evaluation")
    configs = pd.DataFrame(config_rows)
    metrics = metrics.copy()
    metrics["run"] = metrics["run"].astype(str)
    shared = [c for c in configs.columns if c in metrics.columns and c != "run"]  # the point's own columns win
    table = configs.merge(metrics.drop(columns=shared), on="run", how="left")
    table.to_csv(folder / "results.csv", index=False)
    table.to_parquet(folder / "results.parquet", index=False)
    if table["seed"].nunique(dropna=True) > 1:
        across_seeds(table).to_csv(folder / "results_across_seeds.csv", index=False)
    plot_sweep(table, folder)
    if console:
        print_table(table, console)
    return table


SETTING_COLUMNS = (
    "arm",
    "baseline",
    "method",
    "transfer",
    "alpha",
    "top_k",
    "n",
    "selection",
    "rollout_len",
    "rollout_num",
    "max_new_tokens",
)
ACROSS_SEEDS = (
    "reward_mean",
    "gold_reward_mean",
    "kl",
    "diversity",
    "coherence",
    "sft_logprob_per_token",
    "seconds_per_response",
    "flops_per_response",
)


def across_seeds(table):
    """One row per setting: each metric's mean over seeds, its standard error across seeds, min and max."""
    import pandas as pd

    from .stats import mean_and_stderr

    keys = [c for c in SETTING_COLUMNS if c in table.columns]
    rows = []
    for values, group in table.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        row["seeds"] = int(group["seed"].nunique())
        for metric in ACROSS_SEEDS:
            if metric not in group.columns:
                continue
            mean, se = mean_and_stderr(group[metric].tolist())
            row[f"{metric}"], row[f"{metric}_se_seeds"] = mean, se
            finite = group[metric].dropna()
            row[f"{metric}_min"] = finite.min() if len(finite) else None
            row[f"{metric}_max"] = finite.max() if len(finite) else None
        rows.append(row)
    return pd.DataFrame(rows)


def _col(table, *names):
    for name in names:
        if name in table.columns:
            return name
    return None


def print_table(table, console) -> None:
    from rich.table import Table

    view = Table(title="sweep results")
    reward = _col(table, "reward_mean", "reward")
    stderr = _col(table, "reward_stderr", "reward_se")
    extra = [c for c in ("diversity", "coherence", "sft_logprob_per_token", "kl", "mean_tokens", "s_per_response") if c in table.columns]
    labels = [
        c for c in ("arm", "seed", "baseline") if c in table.columns and table[c].astype(str).replace({"None": "", "nan": ""}).ne("").any()
    ]
    for name in [*labels, "method", "alpha", "top_k", reward, *extra]:
        if name:
            view.add_column(name, justify="right")
    for _, row in table.sort_values([*labels, "method", "alpha", "top_k"], key=lambda c: c.astype(str)).iterrows():
        cells = [_short(str(row[c])) for c in labels] + [str(row["method"]), f"{row['alpha']:g}", str(row["top_k"])]
        if reward:
            cells.append(f"{row[reward]:.3f}" + (f" ± {row[stderr]:.3f}" if stderr else ""))
        cells += [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in extra]
        view.add_row(*cells)
    console.print(view)


def _short(label: str) -> str:
    """A label without its testbed prefix (`<testbed>:<model>` -> `<model>`): the table's title names the sweep."""
    return label.split(":", 1)[1] if prefix_of(label) else label


def _curves(table):
    """(frame, reward column, error column) to plot: across seeds when several ran, with a `curve`
    column naming each line (the arm, else method and k)."""
    if "seed" in table.columns and table["seed"].nunique(dropna=True) > 1:
        table, reward, stderr = across_seeds(table), "reward_mean", "reward_mean_se_seeds"
    else:
        reward, stderr = _col(table, "reward_mean", "reward"), _col(table, "reward_stderr", "reward_se")
        table = table.copy()
    arms = table["arm"].astype(str) if "arm" in table.columns else None
    by_method = table["method"].astype(str) + " (k=" + table["top_k"].astype(str) + ")"
    table["curve"] = arms.where(arms != "", by_method) if arms is not None else by_method
    return table, reward, stderr


def plot_sweep(table, folder: Path) -> list[Path]:
    """reward vs alpha per method; reward vs distance from SFT (the frontier); diversity and coherence vs alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, reward, stderr = _curves(table)
    # KL needs sampled decoding; greedy sweeps use the SFT log-likelihood of the responses instead.
    distance = "kl" if "kl" in table.columns and table["kl"].notna().all() else _col(table, "sft_logprob_per_token")
    written = []
    panels = [(reward, "mean target reward")] + [(c, c) for c in ("diversity", "coherence") if c in table.columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, (column, label) in zip(axes[0], panels):
        for curve, group in table.groupby("curve", sort=False):
            group = group.sort_values("alpha")
            yerr = group[stderr] if (column == reward and stderr) else None
            axis.errorbar(group["alpha"], group[column], yerr=yerr, marker="o", capsize=3, label=str(curve))
        axis.set_xlabel("alpha")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("sweep: metrics against alpha")
    fig.tight_layout()
    path = folder / "reward_vs_alpha.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    if distance:
        from .plots import plot_frontier

        xlabel = {
            "kl": "KL(decoder || SFT) estimate per response",
            "sft_logprob_per_token": "log p_SFT per token (higher = closer to SFT)",
        }[distance]
        written.append(
            plot_frontier(
                table,
                x=distance,
                y=reward,
                label_cols=["alpha"],
                path=folder / "frontier.png",
                yerr=stderr,
                group="curve",
                title="reward against distance from the SFT model"
                + (" (mean ± s.e. over build seeds)" if "seeds" in table.columns else ""),
                xlabel=xlabel,
                ylabel="mean target reward",
            )
        )
    gold = "gold_reward_mean"
    if gold in table.columns and table[gold].notna().any():
        written.append(plot_gold_vs_guide(table, reward, gold, folder / "gold_vs_guide.png"))
    if "flops_per_response" in table.columns and table["flops_per_response"].notna().any():
        from .plots import plot_frontier

        written.append(
            plot_frontier(
                table,
                x="flops_per_response",
                y=reward,
                label_cols=[],
                path=folder / "reward_vs_flops.png",
                yerr=stderr,
                group="curve",
                title="reward against compute (2 x parameters x tokens per response)",
                xlabel="FLOPs per response (log scale)",
                ylabel="mean target reward",
                logx=True,
            )
        )
    return written


def plot_gold_vs_guide(table, guide: str, gold: str, path: Path) -> Path:
    """Over-optimisation in view: the gold reward of each point against the reward that guided it (the run's
    own), one line per curve in the order of its strength knob (alpha, or best-of-N's n). A line that bends
    down while the guide's reward still rises is the guide being gamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4.5))
    for curve, group in table.groupby("curve", sort=False):
        knob = "n" if "n" in group.columns and group["method"].eq("best_of_n").all() else "alpha"
        group = group.sort_values(knob)
        axis.plot(group[guide], group[gold], marker="o", label=str(curve))
        for _, row in group.iterrows():
            axis.annotate(f"{row[knob]:g}", (row[guide], row[gold]), fontsize=6, alpha=0.7, xytext=(2, 2), textcoords="offset points")
    axis.set_xlabel("guide reward (the reward each run decoded with)")
    axis.set_ylabel("gold reward")
    axis.set_title("gold against guide reward (labels: alpha, or n for best-of-N)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_sweep(
    overrides: Sequence[str],
    name: str | None = None,
    executor: str | None = None,
    jobs: int | None = None,
    slurm: dict | None = None,
    console=None,
    gold_reward: str | None = None,
    only_arms: Sequence[str] | None = None,
    skip_archived: str | Path | None = None,
):
    """Expand, run (skipping finished points), aggregate. Returns the results table. `only_arms` runs those arms
    of a named sweep and no others (e.g. arms added to a study since its page was written; `tqstar report` merges
    the new sweep folder with the page's archive). `skip_archived` (a report archive) leaves out the points it holds
    (`archived`), so a study continues on a fresh clone."""
    spec = SweepSpec(grid=list(overrides))
    if name:
        named = load_named_sweep(name)
        spec = SweepSpec(
            grid=list(named.get("grid", [])) + list(overrides),
            name=name,
            arms={str(k): [str(o) for o in v] for k, v in (named.get("arms") or {}).items()},
            executor=named.get("executor", "inline"),
            jobs=int(named.get("jobs", 2)),
            slurm=dict(named.get("slurm") or {}),
            gold_reward=named.get("gold_reward"),
        )
    if only_arms:
        if not spec.arms:
            raise ConfigError("--arm selects arms of a named sweep with arms (give --name)")
        unknown = [arm for arm in only_arms if arm not in spec.arms]
        if unknown:
            raise ConfigError(f"sweep {spec.name!r} has no arm {unknown[0]!r}; {did_you_mean(unknown[0], list(spec.arms))}")
        spec.arms = {arm: overrides for arm, overrides in spec.arms.items() if arm in only_arms}
    if executor:
        spec.executor = executor
    if jobs:
        spec.jobs = jobs
    if gold_reward:
        spec.gold_reward = gold_reward
    if spec.gold_reward:
        if spec.gold_reward not in group_options("reward"):
            raise ConfigError(
                f"gold_reward={spec.gold_reward!r} is not a reward config; {did_you_mean(spec.gold_reward, group_options('reward'))}"
            )
    if slurm:
        spec.slurm.update({k: v for k, v in slurm.items() if v is not None})
    if spec.executor not in EXECUTORS:
        raise ConfigError(f"executor={spec.executor!r} is not allowed; {did_you_mean(spec.executor, EXECUTORS)}")
    if spec.jobs < 1:
        raise ConfigError(f"jobs={spec.jobs} is not allowed: must be >= 1")
    folder, points = sweep_folder(spec.grid, spec.name, spec.arms)
    for point in points:  # every point is checked before anything runs
        point_config(point, folder)
    if skip_archived:
        done = archived(points, folder, skip_archived)
        points = [point for point in points if point not in done]
        if console:
            console.print(
                f"{len(done)} point(s) already in {skip_archived}: skipped (a page of both: `tqstar report {skip_archived} {folder}`)"
            )
        if not points:
            if console:
                console.print("nothing left to run")
            return None
    folder.mkdir(parents=True, exist_ok=True)
    started, began = time.perf_counter(), datetime.now().isoformat(timespec="seconds")
    # every invocation's wall time, so a sweep resumed over several sessions reports its whole cost
    earlier = json.loads((folder / "sweep.json").read_text()).get("invocations", []) if (folder / "sweep.json").is_file() else []
    (folder / "sweep.json").write_text(
        json.dumps(
            {
                "grid": spec.grid,
                "arms": spec.arms,
                "points": points,
                "executor": spec.executor,
                "gold_reward": spec.gold_reward,
                "invocations": earlier,  # kept if this one is interrupted
            },
            indent=2,
        )
        + "\n"
    )
    if console:
        console.print(f"sweep {folder} : {len(points)} point(s), executor {spec.executor}")
    results = run_points(points, folder, spec, console)
    failed = [r for r in results if "error" in r]
    summary = {
        "grid": spec.grid,
        "arms": spec.arms,
        "points": points,
        "executor": spec.executor,
        "gold_reward": spec.gold_reward,
        "results": results,
        "seconds": round(time.perf_counter() - started, 2),
        "failed": len(failed),
    }
    ran = sum(1 for r in results if r.get("new_rows"))
    # `started` tells this invocation apart from its twin when a page merges an archive with the same folder again
    invocation = {"seconds": summary["seconds"], "points": len(points), "points_decoded": ran, "started": began}
    summary["invocations"] = earlier + [invocation]
    (folder / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = aggregate(folder, points, console, spec.arms, spec.grid, spec.gold_reward)
    if console:
        console.print(f"results: {folder / 'results.csv'} ({summary['seconds']:.0f} s)")
        for failure in failed:
            console.print(f"[red]failed[/]: {' '.join(failure['point'])}: {failure['error']}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(points)} sweep points failed (rerun the same sweep to retry them)")
    return table
