"""What a results page is computed from, read from a sweep folder or from the archive a report leaves behind.

A sweep folder (`outputs/sweeps/<name>`) holds results.csv (one row per point, from the sweep's aggregation)
and the run folders, each with run.json (provenance) and metrics_per_prompt.jsonl (from `tqstar evaluate`).
`tqstar report` reads it into a `StudyData` and writes, next to the page, an archive of exactly what the page
used (points.csv, per_prompt.csv.gz, curves.json, environment.json, and any extra input tables), so the page
can be regenerated from the repository alone: `tqstar report docs/results/<study>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from .. import testbeds
from ..errors import ConfigError
from ..runs import RunFolder
from ..stats import finite
from ..sweep import ARCHIVE_POINTS
from .analysis import SETTING_COLUMNS

POINTS = ARCHIVE_POINTS
PER_PROMPT = "per_prompt.csv.gz"
CURVES = "curves.json"
ENVIRONMENT = "environment.json"
# What a page reads of each prompt of each run (metrics_per_prompt.jsonl columns).
PER_PROMPT_COLUMNS = ("index", "prompt_id", "reward", "baseline_reward", "gold_reward", "coherence", "kl", "num_tokens", "seconds", "flops")
PER_PROMPT_COLUMNS += ("ess_fraction", "log_weight_var", "kl_corrected")  # weighed rollouts / the sampled soft value only
# what makes two points the same setting (with the seed): the pages' settings but the label (which depends on the
# other points), the response length and the settings read from run configs (`read_sweep`: two points of one arm
# may differ only in beta_bl). Only columns every source's points.csv has count (older archives lack those read
# from run configs)
SAME_SETTING = tuple(c for c in SETTING_COLUMNS if c != "label") + ("max_new_tokens",)
SAME_SETTING += ("beta", "rollout_top_k", "proposal", "beta_bl", "self_normalize")


@dataclass
class StudyData:
    """Everything a page may use. `per_prompt` and `curves` are None where the source lacks them (a page
    then says which of its sections it cannot compute and why); `tables` holds extra inputs by name."""

    name: str
    points: object  # pandas.DataFrame, one row per sweep point
    environment: dict
    source: str
    per_prompt: object | None = None  # pandas.DataFrame: run, prompt_id, index, reward, ...
    curves: dict | None = None  # curve name -> {seed: [[kl, reward, beta], ...]}
    tables: dict = field(default_factory=dict)  # name -> pandas.DataFrame


def is_archive(folder: Path) -> bool:
    return (Path(folder) / ENVIRONMENT).is_file()


def load(folder: str | Path, name: str) -> StudyData:
    """A study's data from a sweep folder (results.csv and run folders) or from a report's archive."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{str(folder)!r} is not a folder (give a sweep folder such as outputs/sweeps/{name}, or docs/results/{name})")
    if is_archive(folder):
        return read_archive(folder, name)
    if (folder / "results.csv").is_file():
        return read_sweep(folder, name)
    raise ConfigError(f"{str(folder)!r} holds neither a sweep's results.csv nor a report archive ({ENVIRONMENT})")


def normalise_points(points):
    """Columns every page relies on: `run` as the run folder's name, `n` (best-of-N), `baseline` as text and
    a `label` that tells apart the points of one arm that differ only by their baseline model."""
    points = points.rename(columns={"selection_x": "selection"}).copy()
    points["run"] = [Path(str(run)).name for run in points["run"]]
    points["baseline"] = points["baseline"].astype(object).fillna("") if "baseline" in points else ""
    if "n" not in points.columns and "point" in points.columns:  # aggregated before the n column existed
        points["n"] = points["point"].str.extract(r"decoder\.n=(\d+)")[0].astype(float)
    if "arm" not in points.columns or points["arm"].isna().all():
        points["arm"] = points["method"]
    points["arm"] = points["arm"].fillna(points["method"])
    several = {arm for arm, group in points.groupby("arm") if group["baseline"].nunique() > 1}
    points["label"] = [
        f"{arm} ({str(b).split(':', 1)[-1]})" if arm in several and b else str(arm) for arm, b in zip(points["arm"], points["baseline"])
    ]
    return points


def read_sweep(folder: Path, name: str) -> StudyData:
    import pandas as pd

    points = pd.read_csv(folder / "results.csv")
    points = normalise_points(points)
    runs = [RunFolder(folder / run) for run in points["run"]]
    missing = [run.path.name for run in runs if not run.path.is_dir()]
    if missing:
        raise ConfigError(f"{len(missing)} run folder(s) of {folder}/results.csv are missing, e.g. {missing[0]}")
    # settings a page needs that results.csv does not carry
    extra = {"beta": [], "rollout_top_k": [], "proposal": [], "beta_bl": [], "self_normalize": []}
    rows, builds = [], {}
    for run in runs:
        cfg = run.config()
        for testbed, seed, build in testbeds.builds_read(OmegaConf.to_container(cfg, resolve=False)):
            builds[build] = (testbed, seed)
        extra["beta"].append(cfg.decoder.get("beta"))
        extra["rollout_top_k"].append((cfg.decoder.get("rollout") or {}).get("top_k"))
        # where the rollouts come from: soft_transfer's rollout.proposal; "" for methods that do not weigh rollouts
        weighs = str(cfg.decoder.method) == "soft_transfer"
        extra["proposal"].append(str((cfg.decoder.get("rollout") or {}).get("proposal")) if weighs else "")
        # indirect transfer's importance weights exp((r - r_bl) / beta_bl), and whether its estimator self-normalises
        indirect = str(cfg.decoder.method) == "tqstar" and str(cfg.decoder.get("transfer")) == "indirect"
        extra["beta_bl"].append(float(cfg.decoder.beta_bl) if indirect else None)
        extra["self_normalize"].append(bool(cfg.decoder.get("self_normalize")) if indirect or weighs else None)
        rows += [{"run": run.path.name, **{k: r.get(k) for k in PER_PROMPT_COLUMNS}} for r in per_prompt_rows(run.path)]
    for column, values in extra.items():
        points[column] = values
    per_prompt = pd.DataFrame(rows) if rows else None
    if per_prompt is not None:
        per_prompt["prompt_id"] = per_prompt["prompt_id"].astype(str)
    tables = {}
    truths = sorted((folder / "ground_truth").glob("seed*.json")) if (folder / "ground_truth").is_dir() else []
    if truths:  # scripts/soft_ground_truth.py --sweep: per-state splits of the recorded KL (the soft_transfer page)
        tables["ground_truth"] = pd.DataFrame(
            [{"seed": int(path.stem[4:]), **row} for path in truths for row in json.loads(path.read_text())["rows"]]
        )
    premise = builds_premise(builds)
    if premise:  # each baseline of the builds the runs decoded on against its optimum, as the build measured it
        tables["premise"] = pd.DataFrame(premise)
    sweep = json.loads((folder / "sweep.json").read_text()) if (folder / "sweep.json").is_file() else {}
    environment = environment_of([run.status() for run in runs], [run.path.name for run in runs])
    environment.update(source=f"sweep folder {folder}", executor=sweep.get("executor"))
    invocations = sweep.get("invocations") or []
    if invocations:  # every invocation of a resumed sweep
        environment.update(
            sweep_seconds=round(sum(i["seconds"] for i in invocations), 2),
            sweep_invocations=len(invocations),
            sweep_invocation_list=invocations,  # what a later merge with this folder's archive counts once
        )
        # points decoded by invocations from before they were recorded: their time is not in the sum
        unrecorded = len(points) - sum(int(i.get("points_decoded") or 0) for i in invocations)
        if unrecorded > 0:
            environment["notes"].append(
                f"{unrecorded} of the {len(points)} points were decoded by sweep invocations whose wall time was not recorded "
                "(stopped before they ended, or from before sweep.json kept every invocation): the sweep wall time above leaves them out"
            )
    elif sweep.get("seconds") is not None:  # a sweep folder from before invocations were recorded: its last one only
        environment.update(sweep_seconds=sweep["seconds"], sweep_invocations="last")
    return StudyData(name=name, points=points, environment=environment, source=str(folder), per_prompt=per_prompt, tables=tables)


def premise_rows(seed: int, manifest: dict) -> list[dict]:
    """One row per baseline of a build's manifest (its `premise` section: the synthetic and SmolLM2 testbeds')."""
    rows = []
    for name, check in manifest["premise"].items():
        if name == "sft":
            continue
        rows.append(
            {
                "seed": seed,
                "baseline": name,
                "reward": check["reward"],
                "beta": check["beta"],
                "sampled_reward": check["sampled_reward"]["mean"],
                "sampled_reward_se": check["sampled_reward"]["se"],
                "optimum_reward": check["optimum_reward"]["mean"],
                "optimum_reward_se": check["optimum_reward"]["se"],
                "gap": check["sampled_reward"]["mean"] - check["optimum_reward"]["mean"],
                "kl": check["kl"]["mean"],
                "optimum_kl": check["optimum_kl"]["mean"],
                "implied_slope": check["implied_reward_slope"]["slope"],
                "sft_reward": manifest["premise"]["sft"][check["reward"]]["mean"],
                # the share of sampled answers that end by themselves within the cap (builds that record it)
                "ended": check.get("finished_frac"),
                "optimum_ended": (check.get("optimum_finished_frac") or {}).get("mean"),
                "sft_ended": manifest["premise"]["sft"].get("finished_frac"),
                "build_seconds": (manifest.get("seconds") or {}).get("total"),
            }
        )
    return rows


def builds_premise(builds: dict) -> list[dict]:
    """The premise rows (`premise_rows`) of each build in `builds` ({folder: (testbed, seed)}) whose manifest has a
    premise section, with the testbed and the build's folder name. A manifest from an older build version that lacks
    a field is left out: this table is context beside a page's own runs, never what its claims rest on."""
    from ..builds import load_manifest

    rows = []
    for build, (testbed, seed) in sorted(builds.items(), key=lambda item: (item[1], str(item[0]))):
        manifest = load_manifest(build)
        if not manifest.get("premise"):
            continue
        try:
            rows += [{"testbed": testbed, "build": Path(build).name, **row} for row in premise_rows(seed, manifest)]
        except (KeyError, TypeError):
            continue
    return rows


def per_prompt_rows(run: Path) -> list[dict]:
    """A run's metrics_per_prompt rows (jsonl or parquet, as `tqstar evaluate` wrote them)."""
    jsonl, parquet = run / "metrics_per_prompt.jsonl", run / "metrics_per_prompt.parquet"
    if jsonl.is_file():
        return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    if parquet.is_file():
        import pandas as pd

        return pd.read_parquet(parquet).to_dict("records")
    raise ConfigError(f"run {run} has no metrics_per_prompt file: run `tqstar evaluate {run}` first")


def _span(values: list) -> list | None:
    kept = finite(values)
    return [min(kept), max(kept)] if kept else None


def environment_of(statuses: list[dict], run_ids: list[str]) -> dict:
    """What the run folders say of where and when they ran: dates (from the run ids), git commits, hosts,
    CPU models, threads, library versions and the machine's load at each run's start and end."""
    dates = sorted(f"{r[:4]}-{r[4:6]}-{r[6:8]} {r[9:11]}:{r[11:13]}" for r in run_ids if len(r) > 15 and r[:8].isdigit())
    versions: dict[str, list] = {}
    for status in statuses:
        for lib, version in (status.get("versions") or {}).items():
            versions.setdefault(lib, [])
            if version not in versions[lib]:
                versions[lib].append(version)

    def distinct(key):
        return sorted({str(s[key]) for s in statuses if s.get(key) is not None})

    return {
        "runs": len(statuses),
        "dates": [dates[0], dates[-1]] if dates else None,
        "git_commits": distinct("git_commit"),
        "hosts": distinct("host"),
        "cpus": distinct("cpu"),
        "threads": sorted({int(s["threads"]) for s in statuses if s.get("threads") is not None}),
        "cpu_count": sorted({int(s["load_at_start"]["cpu_count"]) for s in statuses if (s.get("load_at_start") or {}).get("cpu_count")}),
        "devices": distinct("device"),
        "versions": versions,
        "load_at_start": _span([(s.get("load_at_start") or {}).get("load_1min") for s in statuses]),
        "load_at_end": _span([(s.get("load_at_end") or {}).get("load_1min") for s in statuses]),
        "notes": [],
    }


def read_archive(folder: Path, name: str) -> StudyData:
    import pandas as pd

    environment = json.loads((folder / ENVIRONMENT).read_text())
    points = pd.read_csv(folder / POINTS) if (folder / POINTS).is_file() else pd.DataFrame()
    if len(points):
        points["baseline"] = points["baseline"].astype(object).fillna("") if "baseline" in points else ""
    per_prompt = pd.read_csv(folder / PER_PROMPT, dtype={"prompt_id": str}) if (folder / PER_PROMPT).is_file() else None
    curves = json.loads((folder / CURVES).read_text()) if (folder / CURVES).is_file() else None
    tables = {}
    for path in sorted((folder / "inputs").glob("*.csv")) if (folder / "inputs").is_dir() else []:
        tables[path.stem] = pd.read_csv(path)
    return StudyData(
        name=name, points=points, environment=environment, source=str(folder), per_prompt=per_prompt, curves=curves, tables=tables
    )


def merge(parts: list[StudyData]) -> StudyData:
    """Several sources of one study as one (`tqstar report <archive> <sweep folder>`): e.g. a page's archive and a
    sweep that ran arms or seeds added since. Later sources win: a run in several is read from the last, and so is
    a setting decoded again (the same seed and `SAME_SETTING`, in another run folder); an input table row of a seed
    that a later source has is replaced by that source's. Curves (the builds' optima) are the exception: a seed's
    curve comes from the first source that has it, so an archive's points keep the curve they were measured against
    when a later sweep reads today's builds; a later source adds the seeds the earlier lack. The environment spans
    every source's runs."""
    import pandas as pd

    if len(parts) == 1:
        return parts[0]
    names = {part.name for part in parts}
    if len(names) > 1:
        raise ConfigError(f"these sources are of different studies ({', '.join(sorted(names))}); merge sources of one study")
    frames = [part.points for part in parts if len(part.points)]
    points = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(points):
        # a run read twice, or a setting decoded again (same arm, seed and settings): the later source's
        setting = [c for c in ("seed", *SAME_SETTING) if all(c in frame.columns for frame in frames)]  # in every source
        points = points.drop_duplicates(subset=["run"], keep="last")
        points = points[~points[setting].map(_setting_value).duplicated(keep="last")].reset_index(drop=True)
    runs_of = [set(part.points["run"]) if len(part.points) else set() for part in parts]
    kept = set(points["run"]) if len(points) else set()
    rows = []
    for i, part in enumerate(parts):
        if part.per_prompt is None:
            continue
        later = set().union(*runs_of[i + 1 :])  # runs a later source reads again
        rows.append(part.per_prompt[~part.per_prompt["run"].isin(later) & part.per_prompt["run"].isin(kept)])
    per_prompt = pd.concat(rows, ignore_index=True) if rows else None
    curves = None  # the builds' own curves: the first source's stay (its points were measured against them)
    for part in parts:
        for name, by_seed in (part.curves or {}).items():
            curves = curves or {}
            kept = curves.setdefault(name, {})
            kept.update({seed: curve for seed, curve in by_seed.items() if seed not in kept})
    tables: dict = {}
    for part in parts:
        for name, table in part.tables.items():
            if name in tables and "seed" in table and "seed" in tables[name]:
                kept = tables[name][~tables[name]["seed"].isin(set(table["seed"]))]
                tables[name] = pd.concat([kept, table], ignore_index=True).sort_values("seed", kind="stable").reset_index(drop=True)
            else:
                tables[name] = table
    environment = merge_environments([part.environment for part in parts])
    environment["runs"] = len(points)
    return StudyData(
        name=parts[0].name,
        points=points,
        environment=environment,
        source=" + ".join(part.source for part in parts),
        per_prompt=per_prompt,
        curves=curves,
        tables=tables,
    )


def _setting_value(value) -> str:
    """A setting as text that reads the same from a sweep folder and from an archive's CSV ('' for a missing one)."""
    if value is None or value != value or value == "":
        return ""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def merge_environments(environments: list[dict]) -> dict:
    """One header for several sources: lists joined, spans widened, sweep times summed, sources named."""

    def union(key):
        out: list = []
        for env in environments:
            out += [v for v in env.get(key) or [] if v not in out]
        return sorted(out)

    def span(key):
        spans = [env[key] for env in environments if env.get(key)]
        return [min(s[0] for s in spans), max(s[1] for s in spans)] if spans else None

    versions: dict[str, list] = {}
    for env in environments:
        for lib, values in (env.get("versions") or {}).items():
            versions.setdefault(lib, [])
            versions[lib] += [v for v in values if v not in versions[lib]]
    notes: list = []
    for env in environments:
        notes += [n for n in env.get("notes") or [] if n not in notes]
    out = {
        "runs": None,
        "dates": span("dates"),
        **{key: union(key) for key in ("git_commits", "hosts", "cpus", "threads", "cpu_count", "devices")},
        "versions": versions,
        "load_at_start": span("load_at_start"),
        "load_at_end": span("load_at_end"),
        "notes": notes,
        "source": _each_once((env.get("source", "unknown") for env in environments), "; "),
    }
    timed = [env for env in environments if env.get("sweep_seconds")]
    if timed:
        # an invocation is counted once however many sources list it (an archive merged again with the sweep folder
        # it came from lists that folder's invocations twice); a source's time that no list itemises (archives from
        # before invocations were listed) is added as it is
        listed: dict[str, dict] = {}
        unlisted_seconds, unlisted_count = 0.0, 0
        for env in timed:
            own = env.get("sweep_invocation_list") or []
            listed.update({json.dumps(i, sort_keys=True): i for i in own})
            unlisted_seconds += env["sweep_seconds"] - sum(i["seconds"] for i in own)
            count = env.get("sweep_invocations")
            unlisted_count = unlisted_count + count - len(own) if isinstance(count, int) and isinstance(unlisted_count, int) else "some"
        out["sweep_seconds"] = round(unlisted_seconds + sum(i["seconds"] for i in listed.values()), 2)
        out["sweep_invocations"] = unlisted_count + len(listed) if isinstance(unlisted_count, int) else "some"
        if listed:
            out["sweep_invocation_list"] = list(listed.values())
        out["executor"] = _each_once((env.get("executor") for env in timed), ", ")
    return out


def _each_once(values, sep: str) -> str:
    """The values joined by `sep`, each name once, where a value may already be such a joined list."""
    return sep.join(dict.fromkeys(part for value in values for part in str(value).split(sep)))


def write_archive(data: StudyData, folder: Path) -> list[Path]:
    """What the page was computed from, next to it: regenerating from here gives the same page."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if len(data.points):
        data.points.to_csv(folder / POINTS, index=False)
        written.append(folder / POINTS)
    if data.per_prompt is not None:
        data.per_prompt.to_csv(folder / PER_PROMPT, index=False, compression={"method": "gzip", "mtime": 0})
        written.append(folder / PER_PROMPT)
    if data.curves is not None:
        (folder / CURVES).write_text(json.dumps(data.curves, indent=1) + "\n")
        written.append(folder / CURVES)
    if data.tables:
        (folder / "inputs").mkdir(exist_ok=True)
        for table_name, table in data.tables.items():
            table.to_csv(folder / "inputs" / f"{table_name}.csv", index=False)
            written.append(folder / "inputs" / f"{table_name}.csv")
    (folder / ENVIRONMENT).write_text(json.dumps(data.environment, indent=1) + "\n")
    written.append(folder / ENVIRONMENT)
    return written


def synthetic_curves(seeds, cache_dir: str | None = None) -> dict | None:
    """rho*_beta's reward-KL curve of each seed's synthetic build (its manifest's premise.sft.optimum_curve),
    from KL 0 (the SFT model) upwards; None when a build of the current recipe is missing or has no curve."""
    from ..synthetic import load_manifest, task_dir
    from ..synthetic.cache import is_built

    curves = {}
    for seed in seeds:
        folder = task_dir(int(seed), cache_dir)
        if not is_built(folder):
            return None
        sft = (load_manifest(folder).get("premise") or {}).get("sft") or {}
        curve = (sft.get("optimum_curve") or {}).get("target_reward")
        if not curve:
            return None
        points = [[0.0, float(sft["target_reward"]["mean"]), None]]
        curves[str(int(seed))] = points + sorted([float(p["kl"]), float(p["reward"]), float(p["beta"])] for p in curve)
    return {"rho*_beta": curves}
