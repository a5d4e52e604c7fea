"""The SmolLM2 build's recipe knobs (`Smollm2Params`), its version and the models it writes.

Torch-free: the cache key and the config checks use these without importing any model library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ConfigError, did_you_mean
from .prompts import MAX_PROMPTS

# Bump whenever the recipe changes what a build writes (a new cache folder).
VERSION = 1

MODEL_NAMES = ("sft", "dpo", "dpo_bl")  # smollm2:<name> models: folders of the build
# A response ends at EOS (<|im_end|>) or at these, as in the presets (experiment=smollm2_offline):
# the HH turn marker, and the chat end marker in case a tokenizer does not treat it as EOS.
STOP_STRINGS = ("\n\nHuman:", "<|im_end|>")
PROMPT_FORMAT = "chat"  # the models see the chat template; the rewards see the HH prompt as written
# Every linear layer of a Llama block (transformers' LlamaAttention and LlamaMLP; SmolLM2 is a Llama): LoRA's targets.
LORA_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# Not LoRA targets: TRL computes log-probs from lm_head.weight directly, and the embedding is tied to it.
NOT_LORA_TARGETS = ("lm_head", "embed_tokens")
# An instruction may not hold the HH turn markers (it sits inside the Human turn).
HH_MARKERS = ("Human:", "Assistant:")
TARGET_REWARD = "vader"  # r: conf/reward/vader.yaml
BASELINE_REWARD = "tqstar.smollm2.rewards:on_topic"  # r_bl: conf/reward/smollm2_on_topic.yaml


@dataclass(frozen=True)
class Smollm2Params:
    """Every knob of the recipe (all of them enter the cache key). The defaults are recipe v3, sized for a 2-core CPU:
    at most 20 minutes on 2 quiet threads (BUILD_SECONDS), every answer asked to be one short sentence and DPO held to
    the chosen answers' endings (RPO) so most answers end within the cap. `RECIPES` holds the earlier recipes' values
    of the knobs that changed since (``smollm2.recipe=v2`` / ``v1``)."""

    # the SFT model: SmolLM2-135M-Instruct from the packaged GGUF (or any folder / hub id with a chat template)
    sft_source: str = "packaged:smollm2"
    # prompts (prompts.py): the held-out split is cut first, so it does not change with n_train_prompts
    n_train_prompts: int = 256
    n_test_prompts: int = 128
    # appended to every question of the prompt set (e.g. "Answer in one or two sentences."), so the SFT samples,
    # the DPO pairs, the premise checks and dataset=smollm2 decodes all see it; None: the questions as they are
    instruction: str | None = "Answer in one short sentence."
    # SFT samples on the train prompts, through the engine at temperature 1, scored by r and r_bl
    samples_per_prompt: int = 4
    max_new_tokens: int = 80
    # preference pairs: per prompt the best and the worst sample; pairs closer than the gap are skipped
    min_gap: float = 0.1  # target reward r (VADER compound, in [-1, 1])
    bl_min_gap: float = 0.05  # baseline reward r_bl (prompt-response cosine similarity)
    # True: samples cut at max_new_tokens are in no pair (both sides of a pair are whole answers); False: they are
    pairs_finished_only: bool = True
    # DPO (TRL's DPOTrainer) from the SFT model, once per reward
    beta: float = 0.1  # the DPO beta of dpo/ (its target is rho*_beta of r)
    bl_beta: float = 0.1  # the DPO beta of dpo_bl/ (experiment=smollm2_indirect sets decoder.beta_bl to it)
    epochs: int = 1
    max_steps: int | None = None  # a cap on optimiser steps per baseline (a quick trial); None: the epochs decide
    batch_size: int = 8  # pairs per step
    lr: float = 2.5e-4  # LoRA's; one epoch of 32 steps (3e-4: KL 3.7 nats against rho*_0.1's 1.0; v1, full fine-tuning: 1e-5)
    warmup_ratio: float = 0.1
    # LD-DPO (TRL's ld_alpha): each pair's log-probs count the tokens past the shorter response's length at this weight
    # (the reference's too), so a longer chosen answer earns less of the margin by its length alone; None: plain DPO
    ld_alpha: float | None = 0.0
    # RPO (TRL's loss_type ["sigmoid", "sft"]): the DPO loss plus this weight times the mean per-token NLL of the chosen
    # answers, whose last token is EOS (pairs_finished_only), so the policy keeps ending where its preferred answers
    # end; None: plain DPO
    rpo_alpha: float | None = 1.0
    train_embeddings: bool = False  # the tied embedding / LM-head matrix (28M of 135M parameters) stays frozen
    train_layers: int | None = 15  # train only the top this many transformer blocks (the rest frozen); None: all
    # LoRA (peft) for DPO: rank-r adapters on the blocks' linear layers (within train_layers), merged into the weights
    # after training, so the saved folder is a plain model; None: full fine-tuning of the blocks
    lora_rank: int | None = 16
    lora_alpha: float = 32.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # > 0 also leaves the model's own dropout on in training (TRL turns all dropout off otherwise)
    lora_target_modules: str = LORA_TARGET_MODULES  # comma-separated names of the linear layers that get adapters
    # DPO's forward and backward under bfloat16 autocast (torch.autocast; weights, adapters and Adam state stay
    # float32): on this AVX-512 bf16 CPU a step takes 0.6 of float32's (7.5 s against 12.3 s); False: float32 throughout
    bf16: bool = True
    # premise checks on the held-out prompts (tqstar.premise)
    premise_sft_samples: int = 8  # per test prompt: importance-sampling estimates of rho*_beta (16: about 4 CPU minutes more)
    premise_policy_samples: int = 2  # per test prompt and baseline: sampled reward, KL, implied reward
    premise_prompts: int | None = 64  # the premise checks run on the first this many held-out prompts (at most); None: all

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"smollm2.params.{name}={getattr(self, name)!r} is not allowed: {allowed}")

        for name in ("n_train_prompts", "max_new_tokens", "epochs", "batch_size", "premise_sft_samples"):
            need(getattr(self, name) >= 1, name, "must be an integer >= 1")
        for name in ("n_test_prompts", "samples_per_prompt", "premise_policy_samples"):
            need(getattr(self, name) >= 2, name, "must be an integer >= 2 (pairs and standard errors need two)")
        need(
            self.n_train_prompts + self.n_test_prompts <= MAX_PROMPTS,
            "n_train_prompts",
            f"train + test prompts ({self.n_train_prompts} + {self.n_test_prompts}) must be at most {MAX_PROMPTS}, the questions the prompt set holds",
        )
        for name in ("min_gap", "bl_min_gap"):
            need(getattr(self, name) >= 0, name, "must be a number >= 0")
        for name in ("beta", "bl_beta", "lr"):
            need(getattr(self, name) > 0, name, "must be a number > 0")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be a number in [0, 1)")
        need(self.ld_alpha is None or 0 <= self.ld_alpha <= 1, "ld_alpha", "must be null (plain DPO) or a number in [0, 1]")
        need(self.rpo_alpha is None or self.rpo_alpha > 0, "rpo_alpha", "must be null (plain DPO) or a number > 0")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be null (the epochs decide) or an integer >= 1")
        need(self.train_layers is None or self.train_layers >= 1, "train_layers", "must be null (all blocks) or an integer >= 1")
        need(
            self.premise_prompts is None or self.premise_prompts >= 2,
            "premise_prompts",
            "must be null (all held-out prompts) or an integer >= 2",
        )
        need(bool(self.sft_source), "sft_source", "a model folder, a hub id or packaged:smollm2")
        need(
            self.instruction is None or (bool(self.instruction.strip()) and not any(m in self.instruction for m in HH_MARKERS)),
            "instruction",
            "null (the questions as they are) or a non-empty text without the HH markers 'Human:' / 'Assistant:'",
        )
        need(self.lora_rank is None or self.lora_rank >= 1, "lora_rank", "must be null (full fine-tuning) or an integer >= 1")
        need(self.lora_alpha > 0, "lora_alpha", "must be a number > 0")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be a number in [0, 1)")
        modules = self.lora_modules
        need(
            bool(modules) and all(m.isidentifier() and m not in NOT_LORA_TARGETS for m in modules),
            "lora_target_modules",
            f"comma-separated names of linear layers in the blocks, e.g. {LORA_TARGET_MODULES!r} (not {' or '.join(NOT_LORA_TARGETS)})",
        )
        need(
            self.lora_rank is None or not self.train_embeddings,
            "train_embeddings",
            "must be false with lora_rank set (LoRA adapts the blocks' linear layers; the tied embedding stays frozen)",
        )

    def to_dict(self) -> dict:
        """The knobs (the build key hashes them; the manifest holds them), less the knobs added after recipe v1
        while at their default: a build of the v1 knobs keeps its key (and its runs their hashes)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k in LATER_KNOBS and v == LATER_KNOBS[k])}

    @property
    def lora_modules(self) -> list[str]:
        """``lora_target_modules`` as a list of layer names."""
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @property
    def baselines(self) -> dict[str, tuple[str, float]]:
        """Baseline name -> (the reward it is aligned to, its DPO beta)."""
        return {"dpo": ("target_reward", self.beta), "dpo_bl": ("baseline_reward", self.bl_beta)}


# Knobs added after recipe v1 and their defaults, under which a build is the v1 recipe (to_dict leaves them out).
LATER_KNOBS = {
    "instruction": None,
    "lora_rank": None,
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "lora_target_modules": LORA_TARGET_MODULES,
    "bf16": False,
    "pairs_finished_only": False,
    "premise_prompts": None,
    "ld_alpha": None,
    "rpo_alpha": None,
}

# Recipe v1 (the first, 2,776 s quiet, 46 min): full fine-tuning of every block in float32 on 400 prompts' pairs, the
# questions as they are, 48 tokens (3-7% of answers ended before the cap), premise checks on all 128 held-out prompts.
# Its values of the knobs recipe v2 changed; with them to_dict leaves the later knobs out, so v1 builds keep their key.
V1_RECIPE = {
    "n_train_prompts": 400,
    "instruction": None,
    "max_new_tokens": 48,
    "pairs_finished_only": False,
    "lr": 1e-5,
    "ld_alpha": None,
    "rpo_alpha": None,
    "train_layers": None,
    "lora_rank": None,
    "lora_alpha": 16.0,
    "bf16": False,
    "premise_policy_samples": 4,
    "premise_prompts": None,
}
# Recipe v2 (stop 25, 1,107 s quiet): v3 less RPO, with LD-DPO at half weight; its DPO baseline ended 61% of its
# answers within the cap (v3: 84%).
V2_RECIPE = {"ld_alpha": 0.5, "rpo_alpha": None}
RECIPES = {"v3": {}, "v2": V2_RECIPE, "v1": V1_RECIPE}  # smollm2.recipe: the base the smollm2.params overrides apply to

# Wall seconds of the default build on a quiet 2-core CPU machine (2 threads; README): what its first-use line quotes.
BUILD_SECONDS = 1097


FIELDS = tuple(f.name for f in dataclasses.fields(Smollm2Params))
# The fields whose default is None, by the type a value must have (the annotations are strings: "int | None").
OPTIONAL_TYPES = {
    f.name: {"str": str, "float": float}.get(str(f.type).split(" ")[0], int) for f in dataclasses.fields(Smollm2Params) if f.default is None
}


def _fits(value: Any, default: Any) -> bool:
    """Whether a config value has the type of a field's default (an int where a float is expected is fine);
    ``default`` is the type itself for a field whose default is None."""
    if isinstance(default, type):
        return isinstance(value, (int, float) if default is float else default) and not isinstance(value, bool)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, int) and not isinstance(default, bool):
        return isinstance(value, int)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def params_from_config(node: Any, recipe: str | None = None) -> Smollm2Params:
    """`Smollm2Params` from the config's ``smollm2.params`` (conf/smollm2/default.yaml) over the base ``recipe``
    (``smollm2.recipe``: v3, the defaults, v2 or v1; None: v3): null keeps the base's value; a key that is no field, a
    value of the wrong type or an unknown recipe is a ConfigError."""
    recipe = "v3" if recipe is None else recipe
    if recipe not in RECIPES:
        raise ConfigError(f"smollm2.recipe={recipe!r} is not a recipe; {did_you_mean(str(recipe), list(RECIPES))}")
    base = RECIPES[recipe]
    if node is None:
        return Smollm2Params(**base)
    data = dict(node.items()) if hasattr(node, "items") else None
    if data is None:
        raise ConfigError(f"smollm2.params={node!r} is not allowed: a mapping of Smollm2Params fields")
    defaults = Smollm2Params()
    given: dict[str, Any] = {}
    for name, value in data.items():
        if name not in FIELDS:
            raise ConfigError(f"smollm2.params.{name} is not a recipe knob; {did_you_mean(name, FIELDS)}")
        if value is None:
            continue
        default = getattr(defaults, name)
        if default is None:
            default = OPTIONAL_TYPES[name]
        if name == "lora_target_modules" and isinstance(value, Sequence) and not isinstance(value, str):
            value = ",".join(str(v) for v in value)  # a list of names in the config
        if not _fits(value, default):
            kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
            kind = kind.get(default if isinstance(default, type) else type(default), "an integer")
            raise ConfigError(f"smollm2.params.{name}={value!r} is not allowed: must be {kind}")
        given[name] = float(value) if isinstance(default, float) or default is float else value
    return Smollm2Params(**{**base, **given})
