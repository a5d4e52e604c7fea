"""Sweeps: grid expansion, resume, aggregation, executors; shard-and-merge equals an unsplit decode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_reliability import ROOT, write_prompts

from tqstar.config import ConfigError, compose
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


def test_sweep_runs_resumes_and_aggregates(tiny, hydra_clean, monkeypatch):
    tmp_path, base = tiny
    grid = base + ["decoder=tqstar,args", "decoder.alpha=0.5,2"]
    folder, points = sweep_folder(grid, None)
    calls = []
    from tqstar import sweep as sweep_module

    original = sweep_module.run_point

    def interrupted(point, where):
        calls.append(point)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the sweep is stopped after two points
        return original(point, where)

    monkeypatch.setattr(sweep_module, "run_point", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid)
    monkeypatch.setattr(sweep_module, "run_point", lambda p, w: calls.append(p) or original(p, w))
    table = run_sweep(grid)
    assert len(table) == 4
    for column in ("method", "alpha", "top_k", "run", "reward_mean", "reward_stderr", "diversity", "coherence", "sft_logprob_per_token"):
        assert column in table.columns
    assert set(table["method"]) == {"tqstar", "args"}
    assert (folder / "results.csv").exists() and (folder / "results.parquet").exists()
    assert (folder / "reward_vs_alpha.png").exists() and (folder / "frontier.png").exists()
    # Finished points were skipped the second time: their run folders gained no rows.
    for run in table["run"]:
        rows = (tmp_path / run if not run.startswith("/") else __import__("pathlib").Path(run)) / "generations.jsonl"
        assert len(rows.read_text().splitlines()) == 6
    again = run_sweep(grid)
    assert list(again["reward_mean"]) == list(table["reward_mean"])


def test_local_executor_runs_points_in_worker_processes(tiny, hydra_clean):
    tmp_path, base = tiny
    grid = base + ["decoder=sft,args", "decoder.alpha=1,2", "dataset.limit=3"]
    table = run_sweep(grid, executor="local", jobs=2)
    assert len(table) == 4 and table["reward_mean"].notna().all()
    folder, _ = sweep_folder(grid, None)
    assert list((folder / "submitit").glob("*_result.pkl"))


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
    from tqstar.decode import run_decode
    from tqstar.runs import merge_shards

    tmp_path, base = tiny
    base = base + ["decoder=tqstar", "decoder.selection=sample", "decoder.seed=5"]
    unsplit = run_decode(compose(base + [f"output_dir={tmp_path / 'whole'}"])).rows
    shards = [run_decode(compose(base + [f"dataset.shard={i}/3"])).run.path for i in range(3)]
    code = subprocess.run([sys.executable, "-m", "tqstar.cli", "merge", *map(str, shards)], cwd=ROOT, capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    merged = merge_shards(shards)
    rows = merged.read_rows()
    keep = ("index", "prompt_id", "response", "token_ids", "reward")
    assert [{k: r[k] for k in keep} for r in rows] == [{k: r[k] for k in keep} for r in unsplit]
    assert json.loads((merged.path / "run.json").read_text())["status"] == "completed"
    with pytest.raises(ConfigError, match="do not cover"):
        merge_shards(shards[:2])
