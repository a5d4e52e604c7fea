"""Sweeps: grid expansion, resume, aggregation, executors; shard-and-merge equals an unsplit decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_reliability import write_prompts

from tqstar.config import ConfigError, compose, group_options
from tqstar.sweep import expand_grid, run_sweep, sweep_folder


def test_grid_expansion_uses_hydra_grammar():
    points = expand_grid(["decoder=tqstar,cd", "decoder.alpha=range(1,3)", "decoder.top_k=choice(5,10)", "dataset.limit=4"])
    assert len(points) == 2 * 2 * 2
    assert points[0] == ["decoder=tqstar", "decoder.alpha=1", "decoder.top_k=5", "dataset.limit=4"]
    assert points[-1] == ["decoder=cd", "decoder.alpha=2", "decoder.top_k=10", "dataset.limit=4"]
    assert expand_grid(["decoder.alpha=2"]) == [["decoder.alpha=2"]]


def test_grid_errors_are_config_errors(hydra_clean):
    with pytest.raises(ConfigError, match="cannot parse"):
        expand_grid(["decoder.alpha=[1,"])
    with pytest.raises(ConfigError, match="did you mean 'alpha_method'"):
        run_sweep([], name="alpha_methd")
    with pytest.raises(ConfigError, match="executor"):
        run_sweep(["decoder.alpha=1,2"], executor="cluster")


@pytest.fixture
def tiny(tmp_path, saved_models):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
    return tmp_path, [
        f"sft.name_or_path={saved_models['sft']}",
        f"baseline.name_or_path={saved_models['dpo']}",
        "dataset=local",
        f"dataset.path={prompts}",
        f"output_dir={tmp_path / 'out'}",
        "decoder.top_k=3",
        "decoder.max_new_tokens=5",
        "decoder.rollout.max_new_tokens=2",
        "device=cpu",
    ]


@pytest.mark.parametrize(
    "axes, prompts",
    [
        pytest.param(["decoder=tqstar,args", "dataset.limit=3"], 3, id="2-points"),
        pytest.param(["decoder=tqstar,args", "decoder.alpha=0.5,2"], 6, id="4-points", marks=pytest.mark.slow),
    ],
)
def test_sweep_runs_resumes_and_aggregates(axes, prompts, tiny, hydra_clean, monkeypatch):
    tmp_path, base = tiny
    grid = base + axes
    folder, points = sweep_folder(grid, None)
    calls = []
    from tqstar import sweep as sweep_module

    original = sweep_module.run_point

    def interrupted(point, where):
        calls.append(point)
        if len(calls) == len(points) // 2 + 1:
            raise KeyboardInterrupt  # the sweep is stopped after half its points
        return original(point, where)

    monkeypatch.setattr(sweep_module, "run_point", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid)
    monkeypatch.setattr(sweep_module, "run_point", lambda p, w: calls.append(p) or original(p, w))
    table = run_sweep(grid)
    assert len(table) == len(points)
    for column in ("method", "alpha", "top_k", "run", "reward_mean", "reward_stderr", "diversity", "coherence", "sft_logprob_per_token"):
        assert column in table.columns
    assert set(table["method"]) == {"tqstar", "args"}
    assert (folder / "results.csv").exists() and (folder / "results.parquet").exists()
    assert (folder / "reward_vs_alpha.png").exists() and (folder / "frontier.png").exists()
    # Finished points were skipped the second time: their run folders gained no rows.
    for run in table["run"]:
        rows = (tmp_path / run if not run.startswith("/") else __import__("pathlib").Path(run)) / "generations.jsonl"
        assert len(rows.read_text().splitlines()) == prompts
    # Asked again, a finished run loads no model and keeps the record it was made with (commit, threads, load, time).
    records = {run: (Path(run) if run.startswith("/") else tmp_path / run).joinpath("run.json").read_text() for run in table["run"]}
    import tqstar.decode as decode_module

    monkeypatch.setattr(decode_module, "build_decoder", lambda *a, **k: pytest.fail("a finished run loaded its models again"))
    again = run_sweep(grid)
    assert list(again["reward_mean"]) == list(table["reward_mean"])
    assert {run: (Path(run) if run.startswith("/") else tmp_path / run).joinpath("run.json").read_text() for run in table["run"]} == records
    # every finished invocation's wall time is kept (the interrupted one never finished)
    invocations = json.loads((folder / "sweep.json").read_text())["invocations"]
    assert len(invocations) == 2 and invocations[-1]["points_decoded"] == 0 and invocations[0]["points_decoded"] >= 1


def test_only_named_arms_run(tiny, hydra_clean, monkeypatch):
    tmp_path, base = tiny
    from tqstar import sweep as sweep_module

    named = {"grid": base + ["dataset.limit=2"], "arms": {"sft": ["decoder=sft"], "args": ["decoder=args"]}}
    monkeypatch.setattr(sweep_module, "load_named_sweep", lambda name: named)
    table = run_sweep([], name="two_arms", only_arms=["args"])
    assert set(table["arm"]) == {"args"} and len(table) == 1
    with pytest.raises(ConfigError, match="has no arm 'arg'; did you mean 'args'"):
        run_sweep([], name="two_arms", only_arms=["arg"])


def test_a_fresh_clone_continues_a_study_from_its_archive(tiny, hydra_clean, monkeypatch):
    """--skip-archived: the points a report archive holds (by run identity) are left out, so a clone without the
    run folders decodes only the rest; a path that is no archive is a config error."""
    import shutil

    from tqstar import sweep as sweep_module
    from tqstar.studies.sources import load, write_archive

    tmp_path, base = tiny
    named = {"grid": base + ["dataset.limit=2"], "arms": {"sft": ["decoder=sft"], "args": ["decoder=args", "decoder.alpha=1,2"]}}
    monkeypatch.setattr(sweep_module, "load_named_sweep", lambda name: named)
    first = run_sweep([], name="study", only_arms=["sft"])
    folder, points = sweep_folder(named["grid"], "study", named["arms"])
    archive = tmp_path / "results" / "study"
    write_archive(load(folder, "study"), archive)
    assert sweep_module.archived(points, folder, archive) == [p for p in points if "decoder=sft" in p]
    shutil.rmtree(folder)  # a fresh clone: the page's archive, no run folders
    ran = []
    original = sweep_module.run_point
    monkeypatch.setattr(sweep_module, "run_point", lambda p, w: ran.append(p) or original(p, w))
    table = run_sweep([], name="study", skip_archived=archive)
    assert set(table["arm"]) == {"args"} and len(table) == 2 and all("decoder=sft" not in p for p in ran)
    assert run_sweep([], name="study", only_arms=["sft"], skip_archived=archive) is None  # nothing left to run
    assert len(first) == 1
    with pytest.raises(ConfigError, match="not a report archive"):
        run_sweep([], name="study", skip_archived=tmp_path)


@pytest.mark.slow  # submitit worker processes
def test_local_executor_runs_points_in_worker_processes(tiny, hydra_clean):
    tmp_path, base = tiny
    grid = base + ["decoder=sft,args", "decoder.alpha=1,2", "dataset.limit=3"]
    table = run_sweep(grid, executor="local", jobs=2)
    assert len(table) == 4 and table["reward_mean"].notna().all()
    folder, _ = sweep_folder(grid, None)
    assert list((folder / "submitit").glob("*_result.pkl"))


def test_a_gold_reward_scores_every_point_beside_its_guide(tiny, hydra_clean):
    """gold_reward: every run is also scored by another reward config. With the guide's own reward as the
    gold the columns agree exactly; with the zero reward they are 0; the over-optimisation plot is written."""
    tmp_path, base = tiny
    grid = base + ["decoder=args", "decoder.alpha=1,4", "dataset.limit=3"]
    table = run_sweep(grid, gold_reward="vader")  # the runs' own reward is vader too
    assert list(table["gold_reward_mean"]) == pytest.approx(list(table["reward_mean"]))
    folder, _ = sweep_folder(grid, None)
    assert (folder / "gold_vs_guide.png").exists()
    assert json.loads((folder / "sweep.json").read_text())["gold_reward"] == "vader"
    zero = run_sweep(grid, gold_reward="zero")  # finished points are not decoded again, only re-scored
    assert list(zero["gold_reward_mean"]) == [0.0, 0.0] and list(zero["reward_mean"]) == list(table["reward_mean"])
    with pytest.raises(ConfigError, match="gold_reward='vadr' is not a reward config"):
        run_sweep(grid, gold_reward="vadr")


def test_slurm_executor_gets_partition_gpus_and_time(tmp_path, monkeypatch):
    import os

    from tqstar.sweep import SweepSpec, _executor

    fake_bin = tmp_path / "bin"  # submitit looks for srun to decide it is on a cluster
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    spec = SweepSpec(grid=[], executor="slurm", jobs=3, slurm={"partition": "gpu", "gpus_per_node": 2, "timeout_min": 90})
    executor = _executor(spec, tmp_path)
    params = executor._executor.parameters  # submitit's own view of what sbatch will get
    assert params["partition"] == "gpu" and params["gpus_per_node"] == 2 and params["time"] == 90
    assert params["array_parallelism"] == 3


def test_shard_and_merge_equals_the_unsplit_run(tiny, hydra_clean):
    from typer.testing import CliRunner

    from tqstar.cli import app
    from tqstar.decode import run_decode
    from tqstar.runs import merge_shards

    tmp_path, base = tiny
    base = base + ["decoder=tqstar", "decoder.selection=sample", "decoder.seed=5"]
    unsplit = run_decode(compose(base + [f"output_dir={tmp_path / 'whole'}"])).rows
    shards = [run_decode(compose(base + [f"dataset.shard={i}/3"])).run.path for i in range(3)]
    code = CliRunner().invoke(app, ["merge", *map(str, shards)])
    assert code.exit_code == 0, code.output
    merged = merge_shards(shards)
    rows = merged.read_rows()
    keep = ("index", "prompt_id", "response", "token_ids", "reward")
    assert [{k: r[k] for k in keep} for r in rows] == [{k: r[k] for k in keep} for r in unsplit]
    assert json.loads((merged.path / "run.json").read_text())["status"] == "completed"
    with pytest.raises(ConfigError, match="do not cover"):
        merge_shards(shards[:2])


def test_arms_are_a_union_of_grids_with_the_shared_grid_last():
    from tqstar.sweep import expand_arms

    arms = {"sft": ["decoder=sft"], "tqstar": ["decoder=tqstar", "decoder.alpha=1,2"], "again": ["decoder=sft"]}
    points = expand_arms(["dataset.limit=4", "synthetic.seed=0,1"], arms)
    assert [(arm, point) for arm, point in points] == [
        ("sft", ["decoder=sft", "dataset.limit=4", "synthetic.seed=0"]),
        ("sft", ["decoder=sft", "dataset.limit=4", "synthetic.seed=1"]),
        ("tqstar", ["decoder=tqstar", "decoder.alpha=1", "dataset.limit=4", "synthetic.seed=0"]),
        ("tqstar", ["decoder=tqstar", "decoder.alpha=1", "dataset.limit=4", "synthetic.seed=1"]),
        ("tqstar", ["decoder=tqstar", "decoder.alpha=2", "dataset.limit=4", "synthetic.seed=0"]),
        ("tqstar", ["decoder=tqstar", "decoder.alpha=2", "dataset.limit=4", "synthetic.seed=1"]),
    ]  # the duplicate arm adds nothing
    # a shared (e.g. command-line) override replaces the arm's value of the same key
    assert expand_arms(["decoder.alpha=5"], {"t": ["decoder=tqstar", "decoder.alpha=1,2"]}) == [
        ("t", ["decoder=tqstar", "decoder.alpha=5"])
    ]
    assert expand_arms(["decoder.alpha=1,2"], None) == [("", ["decoder.alpha=1"]), ("", ["decoder.alpha=2"])]


def test_across_seeds_reports_the_spread_over_build_seeds():
    import pandas as pd

    from tqstar.sweep import across_seeds

    table = pd.DataFrame(
        {
            "arm": ["cd"] * 3 + ["sft"] * 3,
            "method": ["cd"] * 3 + ["sft"] * 3,
            "alpha": [1.0] * 6,
            "top_k": [10] * 6,
            "seed": [0, 1, 2] * 2,
            "reward_mean": [0.5, 0.7, 0.9, 0.1, 0.1, 0.4],
        }
    )
    out = across_seeds(table).set_index("arm")
    assert out.loc["cd", "seeds"] == 3
    assert out.loc["cd", "reward_mean"] == pytest.approx(0.7)
    assert out.loc["cd", "reward_mean_se_seeds"] == pytest.approx(0.2 / 3**0.5)
    assert (out.loc["cd", "reward_mean_min"], out.loc["cd", "reward_mean_max"]) == (0.5, 0.9)
    assert out.loc["sft", "reward_mean"] == pytest.approx(0.2)


@pytest.mark.slow
def test_transfer_study_quick_end_to_end(full_build_cache, tmp_path, hydra_clean):
    """Every kind of arm of the transfer study (greedy, sampled over alpha, rungs, indirect, exact-Q*) runs,
    aggregates and plots; a rerun finds every point done."""
    from tqstar.sweep import load_named_sweep

    overrides = [f"synthetic.cache_dir={full_build_cache}", f"output_dir={tmp_path}"]
    table = run_sweep(overrides, name="transfer_study_quick")
    arms = set(load_named_sweep("transfer_study_quick")["arms"])
    assert set(table["arm"]) == arms and table["reward_mean"].notna().all()
    assert sorted(table.loc[table["arm"] == "tqstar", "baseline"]) == ["synthetic:rho0.1", "synthetic:rho1"]
    folder = tmp_path / "sweeps" / "transfer_study_quick"
    assert (folder / "results.csv").is_file() and (folder / "frontier.png").is_file()
    again = run_sweep(overrides, name="transfer_study_quick")
    assert len(again) == len(table)
    assert json.loads((folder / "sweep.json").read_text())["results"] and all(
        r["new_rows"] == 0 for r in json.loads((folder / "sweep.json").read_text())["results"]
    )


def covering(points: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Some of an expansion's (arm, point)s: each arm's first point (so every arm's keys compose together), then,
    greedily, the point with the most overrides not yet seen until every override of the sweep has been seen."""
    kept, seen = [], set()
    for arm, point in points:
        if arm not in {a for a, _ in kept}:
            kept.append((arm, point))
            seen |= set(point)
    left = [item for item in points if item not in kept]
    while left:
        best = max(left, key=lambda item: len(set(item[1]) - seen))
        if not set(best[1]) - seen:
            break
        kept.append(best)
        seen |= set(best[1])
        left.remove(best)
    return kept


def test_covering_keeps_every_arm_and_every_override():
    points = [("a", [f"x={x}", f"y={y}", "z=1"]) for x in range(3) for y in range(2)] + [("b", ["x=0"]), ("b", ["x=0"])]
    kept = covering(points)
    assert len(kept) == 4 and [arm for arm, _ in kept] == ["a", "b", "a", "a"]
    assert {o for _, p in points for o in p} == {o for _, p in kept for o in p}


def _validate_named_sweep(name, folder, every_point: bool):
    from tqstar.sweep import expand_arms, load_named_sweep, point_config

    named = load_named_sweep(name)
    points = expand_arms(named.get("grid", []), named.get("arms"))
    assert points
    for _, point in points if every_point else covering(points):
        point_config(point, folder / "sweeps" / name)


@pytest.mark.parametrize("name", group_options("sweep"))
def test_every_override_of_every_named_sweep_validates(name, tmp_path, hydra_clean):
    """A point of each arm, and points enough to try every value of the sweep (about a third of the points); a
    value valid in one arm but not in another is left to the slow tier, which validates every point."""
    _validate_named_sweep(name, tmp_path, every_point=False)


@pytest.mark.slow  # a Hydra compose per point: ~25 s over all named sweeps
@pytest.mark.parametrize("name", group_options("sweep"))
def test_every_point_of_every_named_sweep_validates(name, tmp_path, hydra_clean):
    _validate_named_sweep(name, tmp_path, every_point=True)


def test_the_local_executor_keeps_its_job_slots_full(tmp_path):
    """At most `jobs` run at once, and a slot is refilled as soon as any job ends (not when its whole wave has):
    a point that ends at once (already decoded) lets the next start beside a long one. A failing job is reported."""
    from tqstar.sweep import SweepSpec, _run_jobs

    clock = {"t": 0}
    started: list[tuple[str, int]] = []

    class Job:
        def __init__(self, point):
            self.point, self.ends = point, clock["t"] + {"quick": 0, "long": 5}.get(point[0].split("-")[0], 2)

        def done(self):
            return clock["t"] >= self.ends

        def result(self):
            if self.point[0] == "bad-1":
                raise RuntimeError("decode failed\nValueError: boom")
            return {"point": self.point}

    class Executor:
        def submit(self, fn, point, folder):
            started.append((point[0], clock["t"]))
            return Job(point)

    def tick(seconds):
        clock["t"] += 1

    import tqstar.sweep as sweep_module

    points = [["long-1"], ["quick-1"], ["mid-1"], ["bad-1"], ["mid-2"]]
    original = sweep_module.time.sleep
    sweep_module.time.sleep = tick
    try:
        results = _run_jobs(points, Executor(), tmp_path, SweepSpec(grid=[], executor="local", jobs=2))
    finally:
        sweep_module.time.sleep = original
    # long-1 and quick-1 start at 0; quick-1 ends at once, so mid-1 starts at 0 beside long-1; bad-1 when mid-1 ends
    assert started == [("long-1", 0), ("quick-1", 0), ("mid-1", 0), ("bad-1", 2), ("mid-2", 4)]
    assert sorted(r["point"][0] for r in results) == ["bad-1", "long-1", "mid-1", "mid-2", "quick-1"]
    assert next(r for r in results if r["point"] == ["bad-1"])["error"] == "RuntimeError: ValueError: boom"
