"""scripts/gpu_smoke_checks.py, the Python side of scripts/gpu_smoke.sh: its checks on tiny CPU models (the dry
profile's sizes, or smaller), a failure recorded rather than raised, and the JSON / Markdown report. Seconds; the checks
that load SmolLM2 or drive the CLI are in the slow tier (make test-slow runs the whole dry smoke run as well)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    if "gpu_smoke_checks" in sys.modules:
        return sys.modules["gpu_smoke_checks"]
    spec = importlib.util.spec_from_file_location("gpu_smoke_checks", ROOT / "scripts" / "gpu_smoke_checks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke_checks"] = module
    spec.loader.exec_module(module)
    return module


smoke = _load()


@pytest.fixture
def dry():
    return copy.deepcopy(smoke.profile("dry"))


def test_the_oracle_check_finds_equal_tokens_in_float32(dry, tmp_path):
    """The engine against the oracle on a tiny Llama and GPT-NeoX in float32 (2 prompts, sft and tqstar): every
    prompt's tokens equal, the record saved with its cases."""
    dry["oracle"].update(dtypes=("float32",))
    rec = smoke.run_check("oracle", dry, tmp_path)
    assert rec["status"] == "ok" and rec["error"] is None, rec.get("traceback")
    cases = rec["results"]["cases"]
    assert {(c["model"], c["method"]) for c in cases} == {(f"tiny {f}", m) for f in ("llama", "gpt_neox") for m in ("sft", "tqstar")}
    assert all(c["tokens_equal"] and c["differing"] == 0 and c["response_tokens"] > 0 for c in cases)
    assert rec["results"]["by_dtype"] == {"float32": {"prompts": 8, "differing": 0}}
    saved = json.loads((tmp_path / "checks" / "oracle.json").read_text())
    assert saved["status"] == "ok" and saved["results"]["cases"] == cases


def test_first_difference():
    assert smoke.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert smoke.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert smoke.first_difference([1, 2], [1, 2, 3]) == 2


def test_the_pythia_shaped_check_gives_a_planned_and_a_measured_peak(dry, tmp_path):
    """A tiny GPT-NeoX in place of Pythia-6.9B, the hh_pythia preset's decoder (k=10, L=20) and reward settings: the
    plan's peak and a measured one (on the CPU: the process's peak RSS, ru_maxrss, said so in the record), tokens/s,
    and the plan's weights are exactly the models built (parameters x 4 bytes, float32)."""
    rec = smoke.run_check("pythia_shaped", dry, tmp_path)
    assert rec["status"] == "ok", rec.get("traceback")
    results = rec["results"]
    assert results["planned"]["peak_bytes"] > 0
    assert results["measured"]["peak_bytes"] > 0 and results["measured"]["how"].startswith("ru_maxrss")
    assert results["measured_over_planned"] > 0
    assert results["tokens_per_s"] > 0 and results["response_tokens"] == 2 * 3
    assert results["settings"]["top_k"] == 10 and results["settings"]["rollout_max_new_tokens"] == 20
    items = results["planned"]["items"]
    for mount in ("sft", "baseline", "reward"):
        assert items[f"weights {mount}"] == 4 * results["parameters"][mount]
    assert "KV rollout chunk: 20 of 20 rows x 20 positions (shared prefix)" in items


def test_the_plan_of_the_pythia_configuration_counts_pythia_6_9b():
    """The GPU's sizes, planned without building anything: the preset's hh_pythia overrides on models of Pythia-6.9B's
    configuration in bfloat16 on cuda:0 plan 2 x 6,857,302,016 parameters (Pythia-6.9B's count) and a classifier."""
    tokenizer = smoke.word_tokenizer(smoke.PYTHIA_6_9B["vocab_size"])
    assert smoke.vocab_size_of(tokenizer) == 50432
    configs = {"sft": smoke.neox_config(smoke.PYTHIA_6_9B, tokenizer), "reward": smoke.neox_config(smoke.PYTHIA_6_9B, tokenizer, True)}
    configs["baseline"] = configs["sft"]
    from tqstar.config import compose, validate

    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for mount, config in configs.items():
            folders[mount] = Path(tmp) / mount
            config.save_pretrained(folders[mount])
        overrides = smoke.pythia_overrides(folders, "cuda:0", "bfloat16", 8, 16)
        entry = smoke.planned_peak(validate(compose(overrides)), 512, "cuda:0")
    assert entry["items"]["weights sft"] == entry["items"]["weights baseline"] == 2 * 6_857_302_016
    assert entry["items"]["weights reward"] < entry["items"]["weights sft"]  # a one-logit head instead of the LM head
    assert 40 * 2**30 < entry["peak_bytes"] < 60 * 2**30
    prompts = smoke.random_token_prompts(tokenizer, 2, 512)
    assert [len(tokenizer(p)["input_ids"]) for p in prompts] == [512, 512]


def test_shared_prefix_on_and_off_give_the_same_tokens_in_float32(dry, tmp_path):
    rec = smoke.run_check("shared_prefix", dry, tmp_path)
    assert rec["status"] == "ok", rec.get("traceback")
    assert rec["results"]["tokens_equal"] and rec["results"]["seconds_on"] > 0 and rec["results"]["seconds_off"] > 0


def test_a_failing_check_is_recorded_not_raised(dry, tmp_path, monkeypatch):
    def broken(p, rec, save):
        rec["results"]["before"] = 1
        save()
        raise RuntimeError("CUDA out of memory (pretend)")

    monkeypatch.setitem(smoke.CHECKS, "broken", broken)
    rec = smoke.run_check("broken", dry, tmp_path)
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: CUDA out of memory (pretend)"
    assert rec["results"] == {"before": 1} and "Traceback" in rec["traceback"]
    assert json.loads((tmp_path / "checks" / "broken.json").read_text())["status"] == "failed"
    assert smoke.run_check("no_such_check", dry, tmp_path)["status"] == "failed"


def test_the_report_records_timeouts_and_skips_and_writes_json_and_a_table(tmp_path):
    """Records from checks/<name>.json; a check whose process was killed (incomplete record, or none) is failed with
    its exit code from <name>.rc, a check skipped for the budget is skipped; the JSON and the table say so."""
    checks = tmp_path / "checks"
    checks.mkdir()
    ok = {"name": "oracle", "device": "cpu", "dtype": "float32", "sizes": {}, "seconds": 1.5, "status": "ok", "error": None}
    (checks / "oracle.json").write_text(json.dumps({**ok, "results": {"a": 1}, "summary": "float32: 0/8 | differ"}))
    (checks / "pythia_shaped.json").write_text(
        json.dumps({**ok, "name": "pythia_shaped", "status": "incomplete", "results": {"planned": 1}})
    )
    (checks / "pythia_shaped.rc").write_text("124\n120\n")
    (checks / "bench_ratio.rc").write_text("skipped\nout of the time budget (SMOKE_BUDGET=450 s)\n")
    (checks / "shared_prefix.rc").write_text("1\n60\n")
    names = ["oracle", "pythia_shaped", "bench_ratio", "shared_prefix"]
    records = smoke.load_records(tmp_path, names)
    by = {r["name"]: r for r in records}
    assert by["oracle"]["status"] == "ok"
    assert by["pythia_shaped"]["status"] == "failed"
    assert by["pythia_shaped"]["error"] == "no result: timed out after 120 s (partial results kept)"
    assert by["bench_ratio"]["status"] == "skipped" and "time budget" in by["bench_ratio"]["summary"]
    assert by["shared_prefix"]["status"] == "failed" and by["shared_prefix"]["error"] == "no result: exit code 1"
    report = smoke.write_report(records, tmp_path, {"dry": True, "profile": "dry", "wall_s": 3.0})
    assert report["ok"] is False
    saved = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert saved["dry"] is True and [c["name"] for c in saved["checks"]] == names
    table = (tmp_path / "gpu_smoke.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) == len(names) and "0/8 \\| differ" in rows[0]
    assert smoke.write_report([records[0]], tmp_path / "ok", {"dry": False})["ok"] is True


@pytest.mark.slow  # loads SmolLM2's tokenizer and runs bench_decode.py's main (about 7 s)
def test_the_bench_ratio_check_reads_the_benchmarks_ratio(dry, tmp_path):
    rec = smoke.run_check("bench_ratio", dry, tmp_path)
    assert rec["status"] == "ok", rec.get("traceback")
    assert rec["results"]["reference_over_engine"] > 0 and rec["results"]["all_identical"] is True


@pytest.mark.slow  # composes, validates and plans 4 configs through the CLI (about 9 s)
def test_the_cli_check_validates_and_plans_every_decode_check(dry, tmp_path):
    rec = smoke.run_check("cli", dry, tmp_path)
    assert rec["status"] == "ok", rec.get("error")
    assert len(rec["results"]["commands"]) == 2 * 2 * len(smoke.DECODE_CHECKS)
