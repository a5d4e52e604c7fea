"""The SmolLM2 experiment as a testbed (`tqstar.testbeds`): its build, names and `tqstar prepare smollm2`.

Its config block `smollm2:` holds `seed`, `cache_dir`, `recipe` (v3, v2 or v1) and `params` (`Smollm2Params` knobs over
that recipe, null keeps its value);
`smollm2:<model>` names a model folder of the build and `dataset=smollm2` its prompts. It trains no reward model.
"""

from __future__ import annotations

from pathlib import Path

from ..stats import format_mean_se
from ..testbeds import block_cache_dir, block_seed, check_name


class Smollm2Testbed:
    name = "smollm2"
    title = "SmolLM2 build"
    splits = ("train", "test")
    prepare_help = "Build the SmolLM2 experiment (SFT model, DPO baselines for direct and indirect transfer, premise checks); cached."
    overrides_help = "e.g. smollm2.seed=1 smollm2.params.n_train_prompts=16 (conf/smollm2/default.yaml lists the knobs)"
    prepare_flags: dict[str, str] = {}
    stored_defaults = {"recipe": "v1"}  # a block from before smollm2.recipe existed built recipe v1

    def params(self, block):
        """The recipe (`Smollm2Params`) a `smollm2` block sets: ``smollm2.params`` over the base ``smollm2.recipe``."""
        from .params import params_from_config

        return params_from_config(None) if block is None else params_from_config(block.get("params"), block.get("recipe"))

    def build_key(self, block) -> str:
        from .cache import build_dir

        return build_dir(seed=block_seed(block), cache_dir="/", params=self.params(block)).name

    def extra_identity(self, data: dict, block) -> dict:
        return {}

    def validate(self, block) -> None:
        self.params(block)  # smollm2.params: known knobs, values of the right kind

    def ensure(self, block, num_threads: int | None = None, progress: bool = True) -> Path:
        from .build import ensure_built

        return ensure_built(
            seed=block_seed(block), cache_dir=block_cache_dir(block), params=self.params(block), progress=progress, num_threads=num_threads
        )

    def find(self, block) -> Path | None:
        from .cache import find_built

        return find_built(seed=block_seed(block), cache_dir=block_cache_dir(block), params=self.params(block))

    def model_names(self, block) -> tuple[str, ...]:
        from .params import MODEL_NAMES

        return MODEL_NAMES

    def check_model(self, model: str, block, what: str) -> None:
        check_name(self, "model", model, self.model_names(block), what)

    def check_reward(self, reward: str, block, what: str) -> None:
        check_name(self, "reward model", reward, (), what)

    def resolve_reward(self, reward_cfg, block):
        from ..models import config_key

        source = str(reward_cfg.get("name_or_path"))
        self.check_reward(source.split(":", 1)[1], block, f"{config_key(reward_cfg, 'name_or_path')}={source!r}")

    def references(self, cfg, rows: list[dict]) -> list[dict]:
        return []

    def next_steps(self, block, run_path: Path) -> list[tuple[str, str]] | None:
        return None

    def prepare(self, cfg, flags: dict[str, bool], console) -> None:
        from .build import ensure_built
        from .cache import load_manifest

        block = cfg.smollm2
        folder = ensure_built(seed=int(block.seed), cache_dir=block.cache_dir, params=self.params(block), progress=True)
        print_summary(console, folder, load_manifest(folder))


def print_summary(console, folder, manifest: dict) -> None:
    """What a SmolLM2 build holds: where, how long each stage took, its pairs and DPO runs, the premise checks, the headline."""
    from rich.table import Table

    seconds = manifest.get("seconds") or {}
    console.print(f"SmolLM2 experiment: {folder} (built in {seconds.get('total', 0):.0f} s)")
    console.print("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items() if k != "total"), soft_wrap=True)
    if manifest.get("premise_seconds"):
        console.print("premise checks: " + ", ".join(f"{k} {v:.0f} s" for k, v in manifest["premise_seconds"].items()), soft_wrap=True)
    sizes = manifest.get("sizes") or {}
    if sizes.get("samples_ended_share") is not None:
        console.print(f"SFT samples that ended by themselves (EOS or a stop string): {sizes['samples_ended_share']:.0%}")
    for name, pairs in (manifest.get("pairs") or {}).items():
        run = (manifest.get("training") or {}).get(name) or {}
        console.print(
            f"{name}: {pairs['pairs']} pairs by {pairs['reward']} (of {pairs['prompts']} prompts; {pairs['near_ties']} near-ties, "
            f"mean gap {pairs['mean_gap']}); DPO beta {run.get('beta')}, {run.get('steps')} steps, final loss {run.get('final_loss')}, "
            f"reward accuracy {run.get('final_accuracy')}",
            soft_wrap=True,
        )
    premise = manifest.get("premise") or {}

    def pm(stat):
        return format_mean_se(stat.get("mean"), stat.get("se"), missing="") if stat else ""

    def gain(stat):
        return "" if not stat or stat.get("difference") is None else f"{stat['difference']:+.3f} ± {stat['se'] or 0:.3f}"

    table = Table(title="models on the held-out prompts (sampled, T=1; baselines against rho*_beta of the reward they were aligned to)")
    for column in ("model", "aligned to", "VADER r", "on-topic r_bl", "gain, own r", "E_rho*[r] IS", "KL to SFT", "KL(rho*‖SFT)", "slope"):
        table.add_column(column, justify="right")
    sft = premise.get("sft") or {}
    table.add_row("sft", "", pm(sft.get("target_reward")), pm(sft.get("baseline_reward")), "", "", "0", "", "")
    for name in ("dpo", "dpo_bl"):
        check = premise.get(name) or {}
        slope = check.get("implied_reward_slope") or {}
        sampled = check.get("sampled") or {}
        table.add_row(
            name,
            f"{'r' if check.get('reward') == 'target_reward' else 'r_bl'}, {check.get('beta', 0):g}",
            pm(sampled.get("target_reward")),
            pm(sampled.get("baseline_reward")),
            gain((check.get("gain_over_sft") or {}).get(check.get("reward"))),
            pm(check.get("optimum_reward")),
            pm(check.get("kl")),
            pm(check.get("optimum_kl")),
            "" if slope.get("slope") is None else f"{slope['slope']:.2f} ± {slope['se']:.2f}",
        )
    console.print(table)
    ended = [f"sft {sft['finished_frac']:.0%}"] if sft.get("finished_frac") is not None else []
    for name in ("dpo", "dpo_bl"):
        check = premise.get(name) or {}
        if check.get("finished_frac") is not None:
            optimum = (check.get("optimum_finished_frac") or {}).get("mean")
            ended.append(f"{name} {check['finished_frac']:.0%}" + ("" if optimum is None else f" (its rho*: {optimum:.0%})"))
    if ended:
        console.print("ended by themselves within the cap, held-out samples: " + ", ".join(ended), soft_wrap=True)
    head = manifest.get("headline") or {}
    if head.get("difference") is not None:
        z = "n/a" if head.get("z") is None else f"{head['z']:.1f}"
        verdict = "[green]passes[/]" if head.get("passes") else "[red]falls short[/]"
        console.print(
            f"headline: dpo - sft sampled VADER {head['difference']:+.3f} ± {head['se'] or 0:.3f} over {head['prompts']} prompts "
            f"= {z} s.e. (needs >= {head['threshold_se']:g}): {verdict}",
            soft_wrap=True,
        )


TESTBED = Smollm2Testbed()
