"""`tqstar evaluate`: metrics of run folders and one comparison table across them.

For each run: `metrics.json` (aggregates) and `metrics_per_prompt.jsonl` (or .parquet) in the run
folder. Across the runs: a rich table on the console, written as `comparison.csv` and
`comparison.md` with `reward.png` and `frontier.png` into the comparison folder.

This module computes (metrics from `tqstar.metrics`, `tqstar.embedder`, `tqstar.judge` and
`tqstar.stats`) and orchestrates; the table, markdown and plots are rendered by `tqstar.report`.

Every metric sees the same response: the recorded one cut at the first evaluate stop string
(`stop_strings` of conf/evaluate.yaml, "Human:" among them) or the run's own decoder.stop_strings.
Nothing here depends on time or order of evaluation, so evaluating a run twice gives the same file.

Two diagnostics of the value estimates read the per-token trace of a run decoded with
decoder.trace=true (None, shown blank, for a run or row without one); each is the mean over a
prompt's steps, then mean and standard error over prompts. `q_spread` is how far apart the k
candidates' values are at a step, max(q) - min(q): near zero, Q barely reorders the proposer's top-k.
`optimism_gap` is the Q of the chosen candidate, q[chosen], minus the reward decode recorded for the
final response (the row's `reward`, not the one recomputed here): positive, the value estimates
promised more than the response got. Candidates pruned by decoder.prune have q null in the trace and
are left out (the spread is over the valued candidates; the chosen one is always valued).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

from . import __version__
from .config import compose
from .embedder import Embedder, coherence
from .errors import ConfigError
from .judge import LLMJudge
from .methods import METHODS
from .metrics import best_of_n_kl, bootstrap_rates, diversity_scores, kl_estimate, paired_difference, sft_logprob_per_token, win_tie
from .report import print_table, table_rows, to_frame, write_markdown, write_plots
from .rewards.base import cut_at_stop
from .rows import GenerationRow
from .runs import CONFIG, GENERATIONS, METRICS, RunFolder, find_runs, write_json_atomic
from .stats import mean_and_stderr, mean_or_none

PER_PROMPT = "metrics_per_prompt"
JUDGE_CACHE = "judge_cache.jsonl"
COMPARISON = "comparison"
PER_PROMPT_FORMATS = ("jsonl", "parquet")
DIVERSITY_CONVENTION = (
    "ARGS: rep-n per response over tqstar.metrics.word_tokenize tokens (an offline port of nltk.word_tokenize), then averaged over prompts"
)


# ---------------------------------------------------------------------------------------------
# Config and input
# ---------------------------------------------------------------------------------------------


# Weighed rollouts' diagnostics (rows.VALUE_DIAGNOSTICS): per prompt, means over its steps; per run, means over prompts
VALUE_DIAGNOSTIC_KEYS = ("ess_fraction", "log_weight_var", "value_spread", "kl_jensen_gap")


def compose_evaluate(overrides: Iterable[str] = ()) -> DictConfig:
    """conf/evaluate.yaml with overrides, checked; ConfigError on any bad value."""
    cfg = compose(list(overrides), config_name="evaluate")
    margin = cfg.win_tie.margin
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
        raise ConfigError(f"win_tie.margin={margin!r} is not allowed: must be a number >= 0")
    if cfg.per_prompt_format not in PER_PROMPT_FORMATS:
        raise ConfigError(f"per_prompt_format={cfg.per_prompt_format!r} is not allowed; allowed: {', '.join(PER_PROMPT_FORMATS)}")
    stops = cfg.stop_strings
    if not all(isinstance(s, str) and s for s in stops):
        raise ConfigError(f"stop_strings={list(stops)!r} is not allowed: must be a list of non-empty strings")
    limit = cfg.judge.max_prompts
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"judge.max_prompts={limit!r} is not allowed: null or an integer >= 1")
    return cfg


@dataclass
class Run:
    """A run folder's config, status and generations rows (sorted by prompt index)."""

    path: Path  # resolved
    cfg: DictConfig
    status: dict
    rows: list[GenerationRow]
    given: str = ""  # the path as the caller named it (the DataFrame's `run` column, for joins)
    label: str = ""
    # Filled by evaluation:
    per_prompt: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    responses: list[str] = field(default_factory=list)
    reward_key: str = ""

    @property
    def method(self) -> str:
        return str(OmegaConf.select(self.cfg, "decoder.method", default="?"))


def load_run(path: str | Path) -> Run:
    """One run folder; ConfigError if it is missing, not a run, or has no generations."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"run folder {str(path)!r} does not exist")
    if not (path / CONFIG).is_file():
        raise ConfigError(f"{str(path)!r} is not a run folder (no {CONFIG})")
    folder = RunFolder(path)
    rows = folder.read_rows()
    if not rows:
        raise ConfigError(f"run folder {str(path)!r} has no generations ({GENERATIONS} missing or empty)")
    try:
        cfg = folder.config()
    except Exception as exc:  # noqa: BLE001 - a damaged config is bad input
        raise ConfigError(f"cannot read {path / CONFIG}: {str(exc).splitlines()[0]}") from None
    parsed = [GenerationRow.from_json(row, where=f"{path / GENERATIONS} row {number + 1}") for number, row in enumerate(rows)]
    rows = sorted(parsed, key=lambda r: (r.index or 0, str(r.prompt_id)))
    return Run(path.resolve(), cfg, folder.status(), rows, given=str(path))


def resolve_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Runs named directly, or found under folders holding runs (those without generations skipped)."""
    if not paths:
        raise ConfigError("name at least one run folder (or a folder holding runs)")
    runs: list[Run] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ConfigError(f"run folder {str(raw)!r} does not exist")
        if (path / CONFIG).is_file():
            found = [load_run(path)]
        else:
            found = []
            for folder in find_runs([path]):
                try:
                    found.append(load_run(folder.path))
                except ConfigError:
                    continue  # a run under a parent folder that wrote nothing yet
            if not found:
                raise ConfigError(f"no run folders with generations under {str(raw)!r}")
        for run in found:
            if run.path not in seen:
                seen.add(run.path)
                runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def base_label(cfg: DictConfig) -> str:
    decoder = cfg.decoder
    method = str(decoder.method)
    method_spec = METHODS.get(method)
    label = method
    if method_spec is None:  # a run of a method this version does not know: label it by name only
        return label
    if method_spec.needs_baseline_reward(str(decoder.get("transfer"))):
        label += "-indirect"
    if method_spec.uses_values:  # alpha matters
        label += f" α={float(decoder.alpha):g}"
    if method_spec.response_level:
        label += f" n={decoder.get('n')}"
    if decoder.get("selection") == "sample" or method_spec.sampled:
        label += f" T={float(decoder.get('temperature', 1.0)):g}"
    return label


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(data) if isinstance(data, list) else data}


def assign_labels(runs: list[Run]) -> None:
    """Short labels; runs that would share one get the config values that tell them apart."""
    for run in runs:
        run.label = base_label(run.cfg)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    for label, group in groups.items():
        if len(group) < 2:
            continue
        flats = [_flat(OmegaConf.to_container(r.cfg, resolve=True)) for r in group]
        keys = sorted({k for f in flats for k in f})
        differing = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
        differing.sort(key=lambda k: (not k.startswith("decoder."), k))
        for run, flat in zip(group, flats):
            extra = [f"{k.split('.')[-1]}={flat.get(k)}" for k in differing[:3]]
            run.label = f"{label} {' '.join(extra)}" if extra else label
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} [{run.path.name[-8:]}]"


# ---------------------------------------------------------------------------------------------
# Rewards, shared across runs
# ---------------------------------------------------------------------------------------------


class RewardBank:
    """Builds each distinct reward config once (a reward model loads once for all runs).

    `cfg` is the scored run's config: a reward model a testbed trains (`<testbed>:<name>`, e.g. a learned proxy)
    is the one next to the build that run's block of the testbed selects (tqstar.decode.resolve_reward), so that
    block is part of the key."""

    def __init__(self, device: str):
        self.device = device
        self._built: dict[str, Any] = {}

    @staticmethod
    def key(reward_cfg: DictConfig, cfg: Any = None) -> str:
        from .testbeds import block_of, prefix_of

        data = OmegaConf.to_container(reward_cfg, resolve=True)
        prefix = prefix_of(data.get("name_or_path") or "")
        if prefix:
            block = block_of(cfg, prefix)
            data = {"reward": data, prefix: OmegaConf.to_container(block, resolve=True) if block is not None else None}
        return json.dumps(data, sort_keys=True)

    def score(self, reward_cfg: DictConfig, prompts: list[str], responses: list[str], cfg: Any = None) -> list[float]:
        from .decode import resolve_reward
        from .rewards import build_reward

        key = self.key(reward_cfg, cfg)
        if key not in self._built:
            self._built[key] = build_reward(resolve_reward(reward_cfg, cfg), self.device)
        return self._built[key](prompts, responses)

    @staticmethod
    def describe(reward_cfg: DictConfig) -> str:
        kind = str(reward_cfg.get("type"))
        if kind == "callable":
            return str(reward_cfg.get("function"))
        if kind == "hf":
            return str(reward_cfg.get("name_or_path"))
        return kind


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def _stop_strings(ecfg: DictConfig, run: Run) -> list[str]:
    own = OmegaConf.select(run.cfg, "decoder.stop_strings", default=None) or []
    return list(dict.fromkeys([*ecfg.stop_strings, *own]))


def _reward_cfg(ecfg: DictConfig, run: Run, name: str) -> DictConfig | None:
    chosen = ecfg.get(name)
    return chosen if chosen is not None else run.cfg.get(name)


def _kl_kind(run: Run) -> str | None:
    """How this run's KL from the SFT model is estimated: from sampled log-probs, analytically, or not at all."""
    decoder = run.cfg.decoder
    if str(decoder.method) == "best_of_n":  # the analytic bound is best-of-n's own, not any response-level method's
        return "best_of_n_bound"
    if decoder.get("selection") == "sample" and any(r.policy_logprobs is not None for r in run.rows):
        return "logprobs"
    return None


def trace_diagnostics(row: GenerationRow) -> tuple[float | None, float | None]:
    """(q_spread, optimism_gap) of one generations row: per-step max(q) - min(q) and q[chosen] minus the
    row's recorded `reward`, each averaged over the steps of its trace; None without a trace (or reward).
    Candidates pruned by decoder.prune were never valued (q null): the spread is over the valued ones."""
    trace = row.trace
    if not trace:
        return None, None
    valued = [[q for q in step.get("q") or [] if q is not None] for step in trace]
    spreads = [max(qs) - min(qs) for qs in valued if qs]
    final = row.reward
    chosen = [step["q"][int(step["chosen"])] for step in trace if step.get("q")]
    gaps = [] if final is None else [q - float(final) for q in chosen if q is not None]
    return mean_or_none(spreads), mean_or_none(gaps)


def ended_share(stop_reasons: Iterable[str | None]) -> float | None:
    """The share of responses that ended by themselves (stop_reason eos or stop_string, not max_new_tokens),
    over the rows that record a stop_reason; None when none does (runs decoded before rows had one)."""
    known = [reason for reason in stop_reasons if reason is not None]
    return sum(reason != "max_new_tokens" for reason in known) / len(known) if known else None


def _forward_tokens(cost: dict | None) -> int | None:
    """Tokens the policy models read for a response (SFT and baseline, rollouts included)."""
    if not cost:
        return None
    return int(cost.get("sft_forward_tokens", 0)) + int(cost.get("baseline_forward_tokens", 0))


def evaluate_run(run: Run, ecfg: DictConfig, rewards: RewardBank, embedder: Embedder | None) -> None:
    """Per-prompt values and aggregates of one run (no files written here)."""
    stops = _stop_strings(ecfg, run)
    prompts = [row.prompt for row in run.rows]
    run.responses = responses = [cut_at_stop(str(row.response), stops) for row in run.rows]
    reward_cfg = _reward_cfg(ecfg, run, "reward")
    if reward_cfg is None:
        raise ConfigError(f"run {run.path} has no reward in its config: choose one with -s reward=<name>")
    run.reward_key = rewards.key(reward_cfg, run.cfg)
    reward_values = rewards.score(reward_cfg, prompts, responses, run.cfg)
    baseline_cfg = _reward_cfg(ecfg, run, "baseline_reward")
    baseline_values = rewards.score(baseline_cfg, prompts, responses, run.cfg) if baseline_cfg is not None else [None] * len(prompts)
    gold_cfg = ecfg.get("gold_reward")  # a judge other than the guide: every run is scored by it too
    gold_values = rewards.score(gold_cfg, prompts, responses, run.cfg) if gold_cfg is not None else [None] * len(prompts)
    # ARGS scores an empty response as " ": same diversity, and the embedder gets a real input.
    texts = [response if response else " " for response in responses]
    coherence_values = coherence(prompts, texts, embedder) if embedder is not None else [None] * len(prompts)
    kl_kind = _kl_kind(run)

    per_prompt = []
    for row, response, reward, baseline, gold, coherent in zip(
        run.rows, responses, reward_values, baseline_values, gold_values, coherence_values
    ):
        kl = kl_estimate(row.policy_logprobs, row.sft_logprobs) if kl_kind == "logprobs" else None
        q_spread, optimism_gap = trace_diagnostics(row)
        per_prompt.append(
            {
                "index": row.index,
                "prompt_id": row.prompt_id,
                "reward": reward,
                "baseline_reward": baseline,
                "gold_reward": gold,
                **diversity_scores(response),
                "coherence": coherent,
                "sft_logprob_per_token": sft_logprob_per_token(row.sft_logprobs),
                "kl": kl,
                "q_spread": q_spread,
                "optimism_gap": optimism_gap,
                "num_tokens": row.num_tokens,
                "num_chars": len(response),
                "seconds": row.seconds,
                # cost of the response (decode's per-row record; runs decoded before it have none)
                "flops": (row.cost or {}).get("flops"),
                "forward_tokens": _forward_tokens(row.cost),
                # weighed rollouts (soft_transfer): the importance weights' diagnostics, means over the response's steps
                **{key: (row.value_diagnostics or {}).get(key) for key in VALUE_DIAGNOSTIC_KEYS},
                # the KL of what a soft-value decoder draws: the recorded KL less its Jensen gap (value_diagnostics)
                "kl_corrected": None
                if kl is None or (row.value_diagnostics or {}).get("kl_jensen_gap") is None
                else kl - row.value_diagnostics["kl_jensen_gap"],
            }
        )
    run.per_prompt = per_prompt

    column = lambda key: [p[key] for p in per_prompt]  # noqa: E731
    reward_mean, reward_stderr = mean_and_stderr(column("reward"))
    baseline_mean, baseline_stderr = mean_and_stderr(column("baseline_reward"))
    gold_mean, gold_stderr = mean_and_stderr(column("gold_reward"))
    coherence_mean, coherence_stderr = mean_and_stderr(column("coherence"))
    logprob_mean, logprob_stderr = mean_and_stderr(column("sft_logprob_per_token"))
    kl_mean, kl_stderr = mean_and_stderr(column("kl"))
    kl_corrected_mean, kl_corrected_stderr = mean_and_stderr(column("kl_corrected"))
    q_spread_mean, q_spread_stderr = mean_and_stderr(column("q_spread"))
    optimism_mean, optimism_stderr = mean_and_stderr(column("optimism_gap"))
    if kl_kind == "best_of_n_bound":
        kl_mean, kl_stderr = best_of_n_kl(int(run.cfg.decoder.n)), None
    tokens = [p["num_tokens"] for p in per_prompt if p["num_tokens"] is not None]
    seconds = [p["seconds"] for p in per_prompt if p["seconds"] is not None]
    counters = run.status.get("counters") or {}
    n = len(per_prompt)
    run.metrics = {
        "num_prompts": n,
        "reward_mean": reward_mean,
        "reward_stderr": reward_stderr,
        "baseline_reward_mean": baseline_mean,
        "baseline_reward_stderr": baseline_stderr,
        "gold_reward_mean": gold_mean,
        "gold_reward_stderr": gold_stderr,
        **{key: mean_or_none(column(key)) for key in ("rep_2", "rep_3", "rep_4", "diversity")},
        "coherence": coherence_mean,
        "coherence_stderr": coherence_stderr,
        "sft_logprob_per_token": logprob_mean,
        "sft_logprob_per_token_stderr": logprob_stderr,
        "sft_nll_per_token": None if logprob_mean is None else -logprob_mean,
        "kl": kl_mean,
        "kl_stderr": kl_stderr,
        "kl_source": kl_kind,
        "kl_corrected": kl_corrected_mean,  # soft-value decoders: kl less the Jensen gap of its value noise
        "kl_corrected_stderr": kl_corrected_stderr,
        "q_spread": q_spread_mean,
        "q_spread_stderr": q_spread_stderr,
        "optimism_gap": optimism_mean,
        "optimism_gap_stderr": optimism_stderr,
        "tokens_mean": mean_or_none(tokens),
        "ended_share": ended_share(row.stop_reason for row in run.rows),  # ended by EOS or a stop string, not the cap
        "chars_mean": mean_or_none(column("num_chars")),
        "seconds_per_response": mean_or_none(seconds),
        "tokens_per_second": (sum(tokens) / sum(seconds)) if seconds and sum(seconds) > 0 else None,
        "decode_seconds": (run.status.get("timings") or {}).get("decode_seconds"),
        **{key: counters.get(key) for key in ("sft_forward_tokens", "baseline_forward_tokens", "rollout_tokens", "reward_calls")},
        "rollout_tokens_per_response": (counters["rollout_tokens"] / n) if counters.get("rollout_tokens") is not None and n else None,
        "forward_tokens_per_response": mean_or_none(column("forward_tokens")),
        "flops_per_response": mean_or_none(column("flops")),
        **{key: mean_or_none(column(key)) for key in VALUE_DIAGNOSTIC_KEYS},
    }
    run.settings = {
        "reward": rewards.describe(reward_cfg),
        "reward_config": OmegaConf.to_container(reward_cfg, resolve=True),
        "baseline_reward": rewards.describe(baseline_cfg) if baseline_cfg is not None else None,
        "gold_reward": rewards.describe(gold_cfg) if gold_cfg is not None else None,
        "stop_strings": stops,
        "diversity": DIVERSITY_CONVENTION,
        "coherence_model": embedder.name if embedder is not None else None,
        "coherence_pooling": embedder.pooling if embedder is not None else None,
        "kl": {
            "logprobs": "mean over prompts of sum_t [log p_dec - log pi_sft] on the sampled responses",
            "best_of_n_bound": "log n - (n - 1) / n (analytic KL of best-of-n)",
            None: "not estimated: greedy decoding has no sampling distribution",
        }[kl_kind],
    }


# ---------------------------------------------------------------------------------------------
# Win-tie against a reference
# ---------------------------------------------------------------------------------------------


def _paired(run: Run, reference: Run) -> list[tuple[int, int]]:
    """(row in run, row in reference) for the prompts both have, in the reference's order."""
    where = {str(row.prompt_id): i for i, row in enumerate(run.rows)}
    pairs = []
    for j, ref_row in enumerate(reference.rows):
        i = where.get(str(ref_row.prompt_id))
        if i is None:
            continue
        if run.rows[i].prompt != ref_row.prompt:
            raise ConfigError(
                f"prompt_id {ref_row.prompt_id!r} has different prompts in {run.path} and the reference "
                f"{reference.path}: win-tie needs runs on the same prompt set"
            )
        pairs.append((i, j))
    return pairs


def compare_to_reference(runs: list[Run], reference: Run, ecfg: DictConfig, rewards: RewardBank, notes: list[str], transport=None) -> None:
    """Win / tie / lose of each run against the reference, judged by the reference's reward (and an LLM judge if set)."""
    margin = float(ecfg.win_tie.margin)
    judge = _make_judge(ecfg, transport, notes)
    reference_cfg = _reward_cfg(ecfg, reference, "reward")
    for run in runs:
        if run is reference:
            continue
        pairs = _paired(run, reference)
        if not pairs:
            notes.append(f"{run.label}: no prompts shared with the reference; no win-tie")
            continue
        ref_values = [reference.per_prompt[j]["reward"] for _, j in pairs]
        if run.reward_key == reference.reward_key:
            values = [run.per_prompt[i]["reward"] for i, _ in pairs]
        else:  # one judge for both sides: the reference's reward scores this run's responses too
            values = rewards.score(
                reference_cfg,
                [run.rows[i].prompt for i, _ in pairs],
                [run.responses[i] for i, _ in pairs],
                reference.cfg,
            )
        result = win_tie(values, ref_values, margin)
        outcomes = result.pop("outcomes")
        for (i, _), outcome in zip(pairs, outcomes):
            run.per_prompt[i]["win_vs_reference"] = outcome
        run.metrics.update({key: result[key] for key in ("win_rate", "tie_rate", "lose_rate", "win_tie_rate")})
        run.metrics.update(bootstrap_rates(outcomes, seed=int(ecfg.win_tie.bootstrap_seed), n_boot=int(ecfg.win_tie.bootstrap)))
        run.metrics["win_tie_n"] = result["n"]
        diff, diff_se = paired_difference(values, ref_values)
        run.metrics["reward_diff_vs_reference"], run.metrics["reward_diff_vs_reference_stderr"] = diff, diff_se
        if run.metrics.get("gold_reward_mean") is not None:
            gold = paired_difference(
                [run.per_prompt[i]["gold_reward"] for i, _ in pairs], [reference.per_prompt[j]["gold_reward"] for _, j in pairs]
            )
            run.metrics["gold_reward_diff_vs_reference"], run.metrics["gold_reward_diff_vs_reference_stderr"] = gold
        run.settings["win_tie"] = {"reference": str(reference.path), "by": RewardBank.describe(reference_cfg), "margin": margin}
        if judge is not None:
            _judge_run(run, reference, pairs, judge, ecfg)


def _make_judge(ecfg: DictConfig, transport, notes: list[str]) -> LLMJudge | None:
    judge_cfg = ecfg.judge
    if not judge_cfg.base_url or not judge_cfg.model:
        notes.append("LLM judge skipped: set judge.base_url and judge.model (an OpenAI-compatible endpoint) to use it")
        return None
    kwargs = {"transport": transport} if transport is not None else {}
    return LLMJudge(
        base_url=str(judge_cfg.base_url),
        model=str(judge_cfg.model),
        api_key=os.environ.get(str(judge_cfg.api_key_env or "")) or None,
        temperature=float(judge_cfg.temperature),
        max_tokens=int(judge_cfg.max_tokens),
        timeout=float(judge_cfg.timeout),
        seed=int(judge_cfg.seed),
        **kwargs,
    )


def _judge_run(run: Run, reference: Run, pairs: list[tuple[int, int]], judge: LLMJudge, ecfg: DictConfig) -> None:
    """Judge verdicts for the first judge.max_prompts shared prompts; cached in the run folder by request."""
    limit = ecfg.judge.max_prompts
    pairs = pairs[: int(limit)] if limit is not None else pairs
    judge.use_cache(run.path / JUDGE_CACHE)
    outcomes, unparsed = [], 0
    for i, j in pairs:
        verdict = judge.compare(run.rows[i].prompt, run.responses[i], reference.responses[j], key=str(run.rows[i].prompt_id))
        run.per_prompt[i]["judge_score"] = verdict.score
        run.per_prompt[i]["judge_reference_score"] = verdict.reference_score
        if verdict.score is None:
            unparsed += 1
        else:
            outcomes.append((verdict.score, verdict.reference_score))
    result = win_tie([a for a, _ in outcomes], [b for _, b in outcomes], 0.0)
    run.metrics.update({f"judge_{key}": result[key] for key in ("win_rate", "tie_rate", "lose_rate", "win_tie_rate")})
    run.metrics["judge_n"] = result["n"]
    run.metrics["judge_unparsed"] = unparsed
    run.settings["judge"] = {"base_url": judge.base_url, "model": judge.model, "temperature": judge.temperature}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None (metrics.json stays valid JSON)."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_run_metrics(run: Run, ecfg: DictConfig) -> Path:
    decoder = run.cfg.decoder
    data = {
        "run": str(run.path),
        "label": run.label,
        "method": run.method,
        "alpha": decoder.get("alpha"),
        "top_k": decoder.get("top_k"),
        "selection": decoder.get("selection"),
        "status": run.status.get("status", "unknown"),
        "tqstar_version": __version__,
        "metrics": run.metrics,
        "settings": run.settings,
    }
    path = run.path / METRICS
    write_json_atomic(path, _clean(data))
    fmt = str(ecfg.per_prompt_format)
    target = run.path / f"{PER_PROMPT}.{fmt}"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if fmt == "parquet":
        import pandas as pd

        pd.DataFrame(run.per_prompt).to_parquet(tmp, index=False)
    else:
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in run.per_prompt:
                handle.write(json.dumps(_clean(row), ensure_ascii=False) + "\n")
    os.replace(tmp, target)
    other = run.path / f"{PER_PROMPT}.{'jsonl' if fmt == 'parquet' else 'parquet'}"
    if other.exists():  # never leave a stale per-prompt file of another format beside fresh metrics
        other.unlink()
    return path


def comparison_folder(runs: list[Run], chosen: str | Path | None) -> Path:
    """The option's folder, else <common parent of the runs>/comparison (inside the run for a single run)."""
    if chosen:
        return Path(chosen).expanduser()
    if len(runs) == 1:
        return runs[0].path / COMPARISON
    return Path(os.path.commonpath([str(run.path.parent) for run in runs])) / COMPARISON


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


@contextmanager
def _quiet_transformers():
    """No weight-loading progress bars in the middle of the evaluate output."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def evaluate_runs(
    paths: Sequence[str | Path],
    overrides: Iterable[str] = (),
    reference: str | Path | None = None,
    console=None,
    comparison_dir: str | Path | None = None,
    transport=None,
    out_dir: str | Path | None = None,
):
    """Evaluate run folders; write metrics.json (+ per-prompt values) into each and a comparison table.

    `paths`: run folders or folders holding runs. `overrides`: conf/evaluate.yaml overrides (e.g.
    ["reward=vader"]). `reference`: a run to compute win-tie rates against (evaluated too, and shown
    in the table). `comparison_dir` (alias `out_dir`) overrides the config's. `transport` replaces
    the LLM judge's HTTP call (tests). Returns one DataFrame row per run; its `run` column holds each
    path as given (or as found under a given folder).
    """
    comparison_dir = comparison_dir or out_dir
    ecfg = compose_evaluate(overrides)
    runs = resolve_runs(list(paths))
    reference = reference if reference is not None else ecfg.get("reference")
    reference_run = None
    if reference:
        resolved = Path(reference).expanduser().resolve()
        reference_run = next((run for run in runs if run.path == resolved), None) or load_run(reference)
        runs = [reference_run] + [run for run in runs if run is not reference_run]  # the reference heads the table
    assign_labels(runs)
    notes: list[str] = []
    for run in runs:
        state = run.status.get("status", "unknown")
        if state != "completed":
            notes.append(f"{run.label}: run status is {state!r}; evaluated the {len(run.rows)} prompts written so far")
    rewards = RewardBank(str(ecfg.device))
    embedder = None
    if ecfg.coherence.enabled:
        cc = ecfg.coherence
        with _quiet_transformers():
            embedder = Embedder.load(
                str(cc.model),
                str(cc.pooling),
                device=cc.device or str(ecfg.device),
                max_length=cc.max_length,
                batch_size=int(cc.batch_size),
            )
    for run in runs:
        evaluate_run(run, ecfg, rewards, embedder)
    if reference_run is not None:
        compare_to_reference(runs, reference_run, ecfg, rewards, notes, transport=transport)
    elif len(runs) > 1:
        notes.append("win-tie rates: pass --reference RUN")
    if any(run.metrics.get("kl_source") is None for run in runs):
        notes.append("KL is estimated only for sampled decoders (decoder.selection=sample) and best-of-n")
    for run in runs:
        write_run_metrics(run, ecfg)

    df = to_frame(runs, reference_run)
    folder = comparison_folder(runs, comparison_dir or ecfg.get("comparison_dir"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = table_rows(df)
    rewards_used = sorted({str(run.settings.get("reward")) for run in runs})
    title = f"{len(runs)} run{'s' if len(runs) != 1 else ''}, reward: {', '.join(rewards_used)}"
    df.to_csv(folder / "comparison.csv", index=False)
    write_markdown(rows, folder / "comparison.md", title)
    written = [folder / "comparison.csv", folder / "comparison.md"]
    if ecfg.plots:
        written += write_plots(df, folder, rewards_used)
    if console is not None:
        print_table(console, rows, title)
        for note in dict.fromkeys(notes):
            console.print(f"note: {note}", soft_wrap=True)
        console.print(f"metrics: {METRICS} and {PER_PROMPT}.{ecfg.per_prompt_format} in each run folder")
        console.print(f"comparison: {', '.join(str(p) for p in written)}", soft_wrap=True)
    return df
