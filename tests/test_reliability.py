"""What happens when runs are killed, run twice at once, or fed bad input (issue: reliability)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ASSISTANT, HUMAN, WORDS

ROOT = Path(__file__).resolve().parents[1]


def write_prompts(path: Path, count: int) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            words = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 5))
            handle.write(json.dumps({"id": f"p{i}", "prompt": f"{HUMAN} {words}{ASSISTANT}"}) + "\n")
    return path


@pytest.fixture
def setup(tmp_path, saved_models):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 24)
    overrides = [
        f"sft.name_or_path={saved_models['sft']}",
        f"baseline.name_or_path={saved_models['dpo']}",
        "dataset=local",
        f"dataset.path={prompts}",
        f"output_dir={tmp_path / 'out'}",
        "experiment_name=t",
        "decoder=tqstar",
        "decoder.top_k=3",
        "decoder.max_new_tokens=8",
        "decoder.rollout.max_new_tokens=3",
        "decoder.batch_size=2",
        "device=cpu",
    ]
    return tmp_path, overrides


def cli(args, env=None, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "tqstar.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def run_cli(args, timeout=240):
    process = cli(args)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def rows_of(out_dir: Path) -> list[dict]:
    files = list(out_dir.rglob("generations.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def comparable(rows):
    return [(r["prompt_id"], r["response"], r["token_ids"]) for r in rows]


@pytest.mark.slow  # CLI subprocesses
def test_kill_9_then_rerun_resumes_without_loss_or_duplicates(setup):
    tmp_path, overrides = setup
    code, _, err = run_cli(["decode", *overrides, f"output_dir={tmp_path / 'clean'}"])
    assert code == 0, err
    expected = comparable(rows_of(tmp_path / "clean"))
    out = tmp_path / "out"
    for rows_before_kill, rows_on_disk in ((1, 1), (8, 9)):  # SIGKILL at known points: right after a row is on disk
        process = cli(["decode", *overrides], env={"TQSTAR_FAULT_KILL_AFTER_ROWS": str(rows_before_kill)})
        process.communicate(timeout=300)
        assert process.returncode == -signal.SIGKILL
        assert len(next(out.rglob("generations.jsonl")).read_text().splitlines()) == rows_on_disk
        status = json.loads(next(out.rglob("run.json")).read_text())  # always valid JSON
        assert status["status"] == "running"
    # A kill mid-write leaves a torn last line: simulate one, it must be cut and that prompt redone.
    generations = next(out.rglob("generations.jsonl"))
    with open(generations, "a") as handle:
        handle.write('{"index": 99, "prompt_id": "p1')
    code, _, err = run_cli(["decode", *overrides])
    assert code == 0, err
    rows = rows_of(out)
    assert comparable(rows) == expected
    assert len({r["prompt_id"] for r in rows}) == len(rows) == 24
    assert json.loads(next(out.rglob("run.json")).read_text())["status"] == "completed"


def test_a_cut_run_is_finished_by_a_rerun_without_loss_or_duplicates(setup, hydra_clean):
    """The kill -9 test's in-process twin: a run folder left "running" with some rows and a torn last line is
    finished by a rerun, which decodes only the missing prompts and ends with the rows of an uncut run."""
    from tqstar.config import compose
    from tqstar.decode import run_decode

    tmp_path, overrides = setup
    small = [*overrides, "dataset.limit=8"]
    expected = comparable(run_decode(compose([*small, f"output_dir={tmp_path / 'clean'}"])).rows)
    cut = run_decode(compose(small)).run
    lines = cut.generations_path.read_text().splitlines(keepends=True)
    cut.generations_path.write_text("".join(lines[:3]) + '{"index": 99, "prompt_id": "p1')
    cut.update_status(status="running")
    again = run_decode(compose(small))
    assert again.run.path == cut.path and again.new_rows == 5
    assert comparable(again.rows) == expected
    assert comparable(rows_of(tmp_path / "out")) == expected  # on disk: no torn line, no duplicate
    assert json.loads(next((tmp_path / "out").rglob("run.json")).read_text())["status"] == "completed"


@pytest.mark.slow  # CLI subprocesses
def test_second_process_on_the_same_run_folder_is_refused(setup):
    tmp_path, overrides = setup
    from tqstar.config import compose
    from tqstar.runs import RunFolder

    folder = RunFolder.for_config(compose(overrides)).path
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from tqstar.runs import RunFolder; r = RunFolder(sys.argv[1]); r.lock(); "
                "print('locked', flush=True); time.sleep(60)"
            ),
            str(folder),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(["decode", *overrides])
        assert code == 2
        assert "in use by pid" in err and len(err.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.communicate()
    assert not (folder / "generations.jsonl").exists()


def nan_reward(prompts, responses):
    return [float("nan") if "great" in r or "good" in r else 0.0 for r in responses]


def test_nan_reward_stops_with_the_prompt_and_value(setup, hydra_clean):
    from tqstar.config import compose
    from tqstar.decode import run_decode
    from tqstar.rewards import RewardValueError

    tmp_path, overrides = setup
    cfg = compose(overrides + ["reward.type=callable", "+reward.function=test_reliability:nan_reward", "decoder=args"])
    sys.path.insert(0, str(Path(__file__).parent))
    with pytest.raises(RewardValueError, match="returned nan for response"):
        run_decode(cfg)


def test_a_run_folder_in_use_is_refused_in_process(setup, hydra_clean):
    """The second-process test's in-process twin (the run folder's lock is held by another open file here):
    `tqstar decode` exits 2 with one line on stderr and writes nothing."""
    from typer.testing import CliRunner

    from tqstar.cli import app
    from tqstar.config import compose
    from tqstar.runs import RunFolder

    tmp_path, overrides = setup
    with RunFolder.for_config(compose(overrides)) as holder:
        result = CliRunner().invoke(app, ["decode", *overrides])
    assert result.exit_code == 2, result.output
    assert "in use by pid" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (holder.path / "generations.jsonl").exists()


BAD_INPUTS = ["empty_dataset", "broken_line", "non_utf8", "missing_column", "typo", "no_model", "unwritable", "range", "reward_bounds"]


def bad_input(case: str, tmp_path: Path) -> tuple[list[str], str]:
    """The overrides that make `tqstar decode` fail on bad input ``case``, and a needle of its one-line message."""
    data = tmp_path / "bad.jsonl"
    extra = []
    needle = ""
    if case == "empty_dataset":
        data.write_text("")
        extra, needle = [f"dataset.path={data}"], "no prompts"
    elif case == "broken_line":
        data.write_text('{"prompt": "a"}\n{"prompt": \n')
        extra, needle = [f"dataset.path={data}"], "line 2"
    elif case == "non_utf8":
        data.write_bytes(b'{"prompt": "caf\xe9"}\n')
        extra, needle = [f"dataset.path={data}"], "UTF-8"
    elif case == "missing_column":
        data.write_text('{"question": "a"}\n')
        extra, needle = [f"dataset.path={data}"], "question"
    elif case == "typo":
        extra, needle = ["decoder.top_kk=3"], "did you mean 'top_k'"
    elif case == "no_model":
        extra, needle = [f"sft.name_or_path={tmp_path / 'nowhere'}"], "does not exist"
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        extra, needle = [f"output_dir={tmp_path / 'file' / 'sub'}"], "not writable"
    elif case == "range":
        extra, needle = ["decoder.alpha=-2"], "decoder.alpha"
    elif case == "reward_bounds":  # a declaration VADER breaks at once (neutral or negative text): the value and bounds named
        extra, needle = ["reward.bounds=[0.5,1]"], "outside its declared bounds [0.5, 1.0]"
    return extra, needle


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_in_process(case, setup, hydra_clean):
    """Through the CLI app in this process (typer's CliRunner): exit code 2 and one line on stderr."""
    from typer.testing import CliRunner

    from tqstar.cli import app

    tmp_path, overrides = setup
    extra, needle = bad_input(case, tmp_path)
    result = CliRunner().invoke(app, ["decode", *overrides, *extra])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.slow  # CLI subprocesses: also no stray warning or log line of any library on the real stderr
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(case, setup):
    tmp_path, overrides = setup
    extra, needle = bad_input(case, tmp_path)
    code, out, err = run_cli(["decode", *overrides, *extra])
    assert code == 2, (out, err)
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_same_seed_same_generations_for_sampled_decoders(setup, hydra_clean):
    from tqstar.config import compose
    from tqstar.decode import run_decode

    tmp_path, overrides = setup
    sampled = overrides + ["decoder.selection=sample", "decoder.rollout.selection=sample", "dataset.limit=4", "decoder.seed=3"]
    first = run_decode(compose(sampled + [f"output_dir={tmp_path / 'a'}"])).rows
    second = run_decode(compose(sampled + [f"output_dir={tmp_path / 'b'}"])).rows
    assert comparable(first) == comparable(second)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=0, max_size=300))
def test_fuzz_prompts_round_trip_through_decode_and_write(text, tokenizer, sft_model, tmp_path_factory):
    """Any string (unicode, whitespace, control characters, long): no crash, and the row reads back equal."""
    from tqstar.decoding.engine import Decoder
    from tqstar.decoding.settings import DecoderSettings
    from tqstar.runs import RunFolder

    from conftest import positive_words_reward

    prompt = f"{HUMAN} {text}{ASSISTANT}"
    decoder = Decoder(
        sft_model, tokenizer, reward=positive_words_reward, settings=DecoderSettings(method="args", top_k=2, max_new_tokens=3)
    )
    generation = decoder.decode([prompt])[0]
    run = RunFolder(tmp_path_factory.mktemp("fuzz"))
    row = {"prompt_id": "x", "prompt": prompt, "response": generation.response, "token_ids": generation.token_ids}
    run.append(row)
    assert run.read_rows() == [row]


def test_response_costs_add_up_to_the_run_counters(setup, hydra_clean):
    """Every row records its cost; the run's counters are their sums; FLOPs = 2 x parameters x tokens."""
    from tqstar.config import compose
    from tqstar.decode import run_decode

    tmp_path, overrides = setup
    result = run_decode(compose([*overrides, "dataset.limit=5"]))
    status = result.run.status()
    counters, sizes = status["counters"], status["parameters"]
    assert sizes["sft"] > 0 and sizes["baseline"] > 0 and sizes["reward"] == 0  # VADER is no network
    assert "0 FLOPs" in status["flops_note"]
    keys = ("sft_forward_tokens", "baseline_forward_tokens", "rollout_tokens", "reward_calls", "reward_tokens", "flops")
    for key in (*keys, "candidates_valued", "candidates_pruned"):
        assert counters[key] == sum(row["cost"][key] for row in result.rows), key
    for row in result.rows:
        cost = row["cost"]
        assert cost["flops"] == 2 * (sizes["sft"] * cost["sft_forward_tokens"] + sizes["baseline"] * cost["baseline_forward_tokens"])
        assert cost["rollout_tokens"] > 0 and cost["reward_calls"] > row["num_tokens"]  # a candidate or more a step, plus the final score
        # VADER declares bounds [-1, 1] (conf/reward/vader.yaml), so greedy TQ* prunes: each of the k = 3 candidates
        # of a step is valued or pruned, and each valued one is one reward call
        assert cost["candidates_valued"] + cost["candidates_pruned"] == 3 * row["num_tokens"]
        assert cost["reward_calls"] == cost["candidates_valued"] + 1
