"""Run folders: naming, resume, torn lines, atomic status, one writer at a time."""

from __future__ import annotations

import json

import pytest

from tqstar.config import ConfigError, compose
from tqstar.identity import config_hash
from tqstar.runs import RunFolder


@pytest.fixture
def cfg(tmp_path, hydra_clean):
    return compose([f"output_dir={tmp_path}", "experiment_name=exp"])


def test_folder_name_and_config(cfg, tmp_path):
    run = RunFolder.for_config(cfg)
    assert run.path.parent == tmp_path / "exp"
    stamp_date, stamp_time, method, digest = run.path.name.split("-")
    assert len(stamp_date) == 8 and len(stamp_time) == 6
    assert (method, digest) == (cfg.decoder.method, config_hash(cfg))
    assert (run.path / "config.yaml").read_text().startswith("experiment_name: exp")


def test_same_config_same_folder(cfg):
    assert RunFolder.for_config(cfg).path == RunFolder.for_config(cfg).path


def test_torn_last_line_is_cut_and_rows_kept(cfg):
    run = RunFolder.for_config(cfg)
    run.append({"prompt_id": "a", "reward": 1.0})
    run.append({"prompt_id": "b", "reward": 2.0})
    with open(run.generations_path, "a") as handle:
        handle.write('{"prompt_id": "c", "rew')
    assert [r["prompt_id"] for r in run.read_rows()] == ["a", "b"]
    assert [r["prompt_id"] for r in run.read_rows(repair=True)] == ["a", "b"]
    assert run.generations_path.read_text().endswith('"reward": 2.0}\n')
    run.append({"prompt_id": "c", "reward": 3.0})
    assert [r["prompt_id"] for r in run.read_rows()] == ["a", "b", "c"]


def test_status_is_atomic_json(cfg):
    run = RunFolder.for_config(cfg)
    run.update_status(status="running", counters={"x": 1})
    run.update_status(status="completed")
    data = json.loads(run.run_json_path.read_text())
    assert data["status"] == "completed" and data["counters"] == {"x": 1}
    assert not list(run.path.glob(".run.json.*"))


def test_second_writer_is_refused(cfg):
    first, second = RunFolder.for_config(cfg), RunFolder.for_config(cfg)
    with first:
        with pytest.raises(ConfigError, match="in use by pid"):
            second.lock()
    second.lock()  # released with the first: a dead holder blocks nobody
    second.unlock()


def test_unwritable_output_dir(tmp_path, hydra_clean):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        RunFolder.for_config(compose([f"output_dir={blocker}/sub"]))
