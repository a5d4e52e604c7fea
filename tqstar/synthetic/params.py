"""The synthetic task's recipe knobs (`BuildParams`), its version and the names it builds.

Torch-free: the cache key is computed from these without importing any model library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..data.hh import HUMAN
from ..errors import ConfigError, did_you_mean

# Bump whenever the recipe changes what a build writes (a new cache folder). v4: preference samples
# and the greedy evaluation decode through tqstar.decoding.engine. v5: the baselines are reward-weighted
# distillations towards rho*_beta (a ladder of betas, and one for r_bl) instead of DPO on best-vs-worst
# pairs, and the build measures each baseline against rho*_beta (tqstar.premise). v6: 64 SFT samples per
# train prompt (was 16), 24 rows per prompt resampled from them by softmax(r/beta) and 4 epochs (v5 fitted
# weighted rows for 3: its strongest rung fell 0.03-0.065 short of E_rho*[r]); the manifest holds
# rho*_beta's reward-KL curve over beta.
VERSION = 6

STOP_STRINGS = (HUMAN,)  # a response ends at EOS or at the next human turn


def rung_name(beta: float) -> str:
    """The folder / model name of the baseline distilled towards rho*_beta of the target reward: rho0.25."""
    return f"rho{beta:g}"


@dataclass(frozen=True)
class BuildParams:
    """Every knob of the recipe (all of them enter the cache key)."""

    # data
    n_corpus: int = 6000  # SFT dialogues
    n_train_prompts: int = 512  # prompts/train.jsonl; the first n_distill_prompts get samples
    n_test_prompts: int = 128  # prompts/test.jsonl (held out)
    # model (LlamaConfig)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 256
    # SFT
    sft_epochs: int = 6
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    sft_warmup_frac: float = 0.05
    # SFT samples on the train prompts (sampled once at temperature 1, scored by both rewards)
    n_distill_prompts: int = 512
    samples_per_prompt: int = 64
    sample_max_new_tokens: int = 48
    # baselines: reward-weighted distillation towards rho*_beta, from the SFT model
    ladder_betas: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)  # target reward r: the study's knob
    baseline_reward_beta: float | None = 0.25  # r_bl: the indirect-transfer baseline rho_bl (presets set decoder.beta_bl to it);
    # None: no rho_bl (the demo build)
    distill_draws: int = 24  # rows per train prompt, resampled from its samples by softmax(r / beta)
    distill_epochs: int = 4
    distill_batch_size: int = 32
    distill_lr: float = 1e-3
    # evaluation on the test prompts: greedy rewards, and the premise checks from samples
    eval_max_new_tokens: int = 64
    premise_sft_samples: int = 64  # per test prompt: importance-sampling estimates of rho*_beta
    premise_policy_samples: int = 8  # per test prompt and baseline: sampled reward, KL, implied reward

    def to_dict(self) -> dict:
        """JSON-shaped (tuples as lists), so a manifest read back compares equal."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def rungs(self) -> dict[str, float]:
        """Baselines of the target reward: name -> beta."""
        return {rung_name(beta): float(beta) for beta in self.ladder_betas}

    @property
    def model_names(self) -> tuple[str, ...]:
        return ("sft", *self.rungs, *(("rho_bl",) if self.baseline_reward_beta is not None else ()))


MODEL_NAMES = BuildParams().model_names  # what the default build holds: sft, rho1, rho0.5, rho0.25, rho0.1, rho_bl
DEFAULT_BASELINE = rung_name(0.1)  # the strongest rung: the default baseline of direct transfer

# Named sizes of the recipe (`synthetic.size`, conf/synthetic/<size>.yaml): the same code path, other knobs, so
# another cache key. `full` is the testbed every results page uses (`tqstar decode`, `tqstar prepare synthetic`);
# `demo` is the one-minute build of `make demo` (experiment=demo). SFT training is most of a build's time, so the
# demo keeps the model and the SFT recipe and trains on a quarter of the corpus for 4 epochs instead of 6 (1/6 of
# the steps); it samples 32 responses on 64 train prompts (not 64 on 512), distils only the default baseline rho0.1
# (no other rung, no rho_bl: the demo decodes direct transfer) and evaluates on 16 held-out prompts. Its models are
# much weaker than the full build's: it shows the pipeline, not the results.
SIZES = {
    "full": BuildParams(),
    "demo": BuildParams(
        n_corpus=1500,
        n_train_prompts=64,
        n_test_prompts=16,
        sft_epochs=4,
        n_distill_prompts=64,
        samples_per_prompt=32,
        ladder_betas=(0.1,),  # DEFAULT_BASELINE only
        baseline_reward_beta=None,  # no rho_bl
        premise_sft_samples=32,
    ),
}
DEFAULT_SIZE = "full"
# Wall seconds of each size's build on a 2-core CPU machine: what the first-use line quotes (one source). full (recipe
# v6, quiet, README): SFT 204 s, samples 307 s, baselines 1,280 s, premise 124 s, about 2,000 s in all. demo: 47 s
# (SFT 23 s, samples 13 s, rho0.1 8 s, premise 3 s) on one torch thread (experiment=demo's num_threads) with the 2
# cores shared (load average ~2.5); make demo's decode, build included, took 51-53 s.
BUILD_SECONDS = {"full": 2000, "demo": 50}


def params_for(size: str | None) -> BuildParams:
    """The recipe of a named size (`synthetic.size`; None: the full build)."""
    size = DEFAULT_SIZE if size is None else str(size)
    if size not in SIZES:
        raise ConfigError(f"synthetic.size={size!r} is not allowed; {did_you_mean(size, list(SIZES))}")
    return SIZES[size]


def size_of(params: BuildParams) -> str | None:
    """The name of a named size whose recipe ``params`` is, else None (a custom recipe)."""
    return next((name for name, known in SIZES.items() if known == params), None)
