"""`make demo`: the demo-sized synthetic build (synthetic.size=demo, experiment=demo), the one line every build
prints when it starts, and the one-line error for a model the demo build does not hold.

Fast tests stand in for the builds (monkeypatched, nothing trains); the slow one runs the real `experiment=demo`
decode, build included, into a temporary cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict
from typer.testing import CliRunner

from tqstar.cli import app
from tqstar.config import compose, validate
from tqstar.identity import config_hash, same_run
from tqstar.synthetic import cache
from tqstar.synthetic.params import BUILD_SECONDS, DEFAULT_BASELINE, MODEL_NAMES, SIZES, BuildParams, params_for


def _fake_manifest(out: Path) -> dict:
    return {"task": "synthetic", "seconds": {"total": 0.0}, "eval": {}, "premise": {}}


# ----------------------------------------------------------------------------- the preset and its build key


def test_demo_preset_resolves_to_the_demo_build():
    cfg = validate(compose(["experiment=demo"]))
    demo = SIZES["demo"]
    assert cfg.synthetic.size == "demo" and cfg.experiment_name == "demo"
    assert cfg.decoder.method == "tqstar" and cfg.decoder.transfer == "direct"
    assert cfg.dataset.name == "synthetic" and cfg.dataset.limit == demo.n_test_prompts  # all its held-out prompts
    assert cfg.decoder.max_new_tokens == demo.eval_max_new_tokens  # the build's greedy rewards compare
    for mount in ("sft", "baseline"):
        assert str(cfg[mount].name_or_path).split(":", 1)[1] in demo.model_names
    assert demo.model_names == ("sft", DEFAULT_BASELINE)
    # another recipe, another build key and another run hash; the full build's key is the one it always was
    assert cache.task_dir(0, "/", demo).name != cache.task_dir(0, "/", params_for("full")).name
    assert params_for("full") == BuildParams() and params_for(None) == BuildParams()
    full = validate(compose(["experiment=demo", "synthetic=default"]))
    assert full.synthetic.size == "full" and config_hash(full) != config_hash(cfg)
    assert config_hash(validate(compose(["experiment=demo", "synthetic.size=full"]))) == config_hash(full)
    assert config_hash(validate(compose(["synthetic.size=demo"]))) == config_hash(validate(compose(["synthetic=demo"])))


def test_the_size_key_leaves_full_build_hashes_as_they_were():
    """Runs made before `synthetic.size` existed are still found: size=full is left out of the run hash."""
    cfg = compose([])
    older = OmegaConf.to_container(cfg, resolve=True)
    del older["synthetic"]["size"], older["choices"]
    assert same_run(older, cfg)
    assert "num_threads" in cfg and config_hash(compose(["num_threads=1"])) == config_hash(cfg)  # placement, not identity


def test_bad_size_and_threads_are_one_line_config_errors():
    runner = CliRunner()
    for override, text in (("synthetic.size=tiny", "synthetic.size='tiny' is not allowed"), ("num_threads=0", "num_threads=0")):
        result = runner.invoke(app, ["decode", override, "--show-config"])
        assert result.exit_code == 2 and text in result.output and len(result.output.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- names the demo build lacks


@pytest.mark.parametrize(
    "overrides, missing",
    [
        (["baseline=synthetic_rho_bl"], "no model 'rho_bl'"),
        (["baseline.name_or_path=synthetic:rho1"], "no model 'rho1'"),
        (["decoder.transfer=indirect", "baseline=synthetic_rho_bl"], "no model 'rho_bl'"),
        (["reward=synthetic_proxy"], "no proxy reward"),
    ],
)
def test_a_name_missing_from_the_demo_build_is_exit_2(tmp_path, overrides, missing):
    args = ["decode", "experiment=demo", *overrides, f"synthetic.cache_dir={tmp_path}", f"output_dir={tmp_path / 'out'}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0] and "use the full build" in lines[0], lines
    assert not (tmp_path / "synthetic").exists() and not (tmp_path / "out").exists()  # failed before any build or run folder


def test_prepare_proxy_on_the_demo_build_is_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["prepare", "synthetic", "experiment=demo", f"synthetic.cache_dir={tmp_path}", "--proxy"])
    assert result.exit_code == 2 and "no proxy reward" in result.output and "use the full build" in result.output
    assert not (tmp_path / "synthetic").exists()


def test_the_full_build_still_holds_every_name():
    assert set(MODEL_NAMES) == {"sft", "rho1", "rho0.5", "rho0.25", "rho0.1", "rho_bl"}
    assert BuildParams(baseline_reward_beta=None).model_names == ("sft", "rho1", "rho0.5", "rho0.25", "rho0.1")


# ----------------------------------------------------------------------------- the first-use line


def _lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


@pytest.mark.parametrize("size, minutes", [("demo", None), ("full", "33 min")])
def test_a_synthetic_build_started_by_decode_says_so_once(tmp_path, monkeypatch, capsys, size, minutes):
    from tqstar import decode
    from tqstar.synthetic import build

    calls = []
    monkeypatch.setattr(build, "_build", lambda out, seed, params, bar: calls.append(params) or _fake_manifest(out))
    cfg = validate(compose(["experiment=demo", f"synthetic.size={size}", f"synthetic.cache_dir={tmp_path}"]))
    folder = decode.builds(cfg)["synthetic"]
    assert calls == [params_for(size)] and folder == cache.task_dir(0, tmp_path, params_for(size))
    err = capsys.readouterr().err
    lines = _lines(err, "building ")
    assert len(lines) == 1, err
    line = lines[0]
    ahead = "`tqstar prepare synthetic`" if size == "full" else "`tqstar prepare synthetic experiment=demo`"
    assert ahead in line and "2-core" in line
    assert (minutes or f"{BUILD_SECONDS['demo']:.0f} s") in line
    # found in the cache: nothing built, nothing printed
    assert decode.builds(cfg)["synthetic"] == folder and len(calls) == 1
    assert "building" not in capsys.readouterr().err


def test_the_proxy_build_says_so_once(tmp_path, monkeypatch, capsys):
    from tqstar.synthetic import proxy

    cache.build_once(cache.task_dir(0, tmp_path), _fake_manifest)  # a (stand-in) full build: only the proxy is built
    calls = []
    monkeypatch.setattr(proxy, "_build_proxy", lambda out, task, seed, params, bar: calls.append(task) or {"task": "synthetic-proxy"})
    folder = proxy.ensure_proxy(seed=0, cache_dir=tmp_path)
    err = capsys.readouterr().err
    lines = _lines(err, "building ")
    assert len(calls) == 1 and len(lines) == 1, err
    assert "proxy reward" in lines[0] and "`tqstar prepare synthetic --proxy`" in lines[0] and "5 min" in lines[0]
    assert proxy.ensure_proxy(seed=0, cache_dir=tmp_path) == folder and len(calls) == 1
    assert "building" not in capsys.readouterr().err


def test_the_smollm2_build_says_so_once(tmp_path, monkeypatch, capsys):
    from tqstar.smollm2 import build

    calls = []
    monkeypatch.setattr(build, "_build", lambda out, seed, params, bar: calls.append(params) or {"task": "smollm2"})
    folder = build.ensure_built(seed=0, cache_dir=tmp_path)
    err = capsys.readouterr().err
    lines = _lines(err, "building ")
    assert len(calls) == 1 and len(lines) == 1, err
    assert "SmolLM2" in lines[0] and "`tqstar prepare smollm2`" in lines[0] and "18 min" in lines[0]  # BUILD_SECONDS: recipe v3
    assert build.ensure_built(seed=0, cache_dir=tmp_path) == folder and len(calls) == 1
    assert "building" not in capsys.readouterr().err


def test_a_quiet_build_prints_nothing(tmp_path, capsys):
    cache.build_once(tmp_path / "x", _fake_manifest)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- the summary's reference rows


def test_the_builds_own_rewards_show_when_the_run_decoded_all_its_prompts(tmp_path):
    from tqstar.decode import build_evaluation
    from tqstar.files import write_jsonl

    ids = [f"test-{i}" for i in range(SIZES["demo"].n_test_prompts)]

    def fake(out: Path) -> dict:
        write_jsonl(out / "prompts" / "test.jsonl", ({"id": i, "prompt": "p"} for i in ids))
        reward = {"mean": 0.5, "se": 0.1, "n": len(ids)}
        return {
            "eval": {name: {"target_reward": reward, "mean_new_tokens": 12.0} for name in ("sft", DEFAULT_BASELINE)},
            "eval_settings": {"max_new_tokens": 64},
        }

    cache.build_once(cache.task_dir(0, tmp_path, SIZES["demo"]), fake)
    cfg = compose(["experiment=demo", f"synthetic.cache_dir={tmp_path}"])
    rows = [{"prompt_id": i} for i in reversed(ids)]
    refs = build_evaluation(cfg, rows)
    assert [r["model"] for r in refs] == ["sft", DEFAULT_BASELINE] and refs[0]["max_new_tokens"] == 64
    assert build_evaluation(cfg, rows[:-1]) == []  # other prompts: nothing to compare with
    with open_dict(cfg):
        cfg.synthetic.size = "full"  # the full build is not in this cache
    assert build_evaluation(cfg, rows) == []


# ----------------------------------------------------------------------------- the real thing


@pytest.mark.slow
def test_make_demo_end_to_end(tmp_path):
    """`tqstar decode experiment=demo` from an empty cache: the demo build, then TQ* on its held-out prompts (~1 min)."""
    cache_dir, out = tmp_path / "cache", tmp_path / "out"
    env = {**os.environ, "TQSTAR_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("tqstar")), "decode", "experiment=demo", f"output_dir={out}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_lines(proc.stderr, "building ")) == 1 and "demo-sized synthetic testbed" in proc.stderr
    for text in (
        "tqstar (this run)",
        "sft (greedy)",
        f"{DEFAULT_BASELINE} (greedy)",
        "what next",
        "tqstar evaluate",
        "tqstar prepare synthetic",
    ):
        assert text in proc.stdout, proc.stdout
    (folder,) = [p for p in (cache_dir / "synthetic").iterdir() if p.is_dir()]  # the demo build only
    assert folder == cache.task_dir(0, cache_dir, SIZES["demo"])
    manifest = cache.load_manifest(folder)
    assert manifest["params"] == SIZES["demo"].to_dict() and set(manifest["eval"]) == {"sft", DEFAULT_BASELINE}
    assert not (folder / "rho_bl").exists() and (folder / DEFAULT_BASELINE / "config.json").is_file()
    (run,) = (out / "demo").glob("*-tqstar-*")
    rows = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == SIZES["demo"].n_test_prompts and all(r["response"] for r in rows)
    print(f"make demo: {seconds:.0f} s, build {manifest['seconds']['total']:.0f} s")
