"""The synthetic task as a testbed (`tqstar.testbeds`): its build, names, learned proxy reward and `tqstar prepare synthetic`.

Its config block `synthetic:` holds `seed`, `cache_dir` and `size` (a named recipe, params.SIZES); `synthetic:<model>`
names a model folder of the build, `synthetic:proxy` the learned proxy reward trained next to the full build
(proxy.py), and `dataset=synthetic` the build's prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..stats import format_mean_se
from ..testbeds import block_cache_dir, block_seed, check_name

PROXY_HELP = "Also build the learned proxy of the target reward (reward=synthetic_proxy); cached next to the task."


class SyntheticTestbed:
    name = "synthetic"
    title = "synthetic task"
    splits = ("train", "test")
    prepare_help = "Build the offline synthetic task (corpus, tokenizer, SFT model, distilled baselines); cached."
    overrides_help = "e.g. synthetic.seed=1; experiment=demo: the demo-sized build of make demo"
    prepare_flags = {"proxy": PROXY_HELP}
    stored_defaults: dict = {}

    # ------------------------------------------------------------------ the build a block selects

    def params(self, block):
        """The recipe (`BuildParams`) of the build a `synthetic` block names (`synthetic.size`)."""
        from .params import params_for

        return params_for(block.get("size") if block is not None else None)

    def build_key(self, block) -> str:
        from .cache import task_dir

        return task_dir(seed=block_seed(block), cache_dir="/", params=self.params(block)).name

    def extra_identity(self, data: dict, block) -> dict:
        from .proxy import PROXY_NAME, proxy_key

        return {"synthetic_proxy": proxy_key()} if f'"synthetic:{PROXY_NAME}"' in json.dumps(data, default=str) else {}

    def validate(self, block) -> None:
        self.params(block)  # synthetic.size: a named recipe

    def ensure(self, block, num_threads: int | None = None, progress: bool = True) -> Path:
        from .build import ensure_built

        return ensure_built(
            seed=block_seed(block), cache_dir=block_cache_dir(block), progress=progress, params=self.params(block), num_threads=num_threads
        )

    def find(self, block) -> Path | None:
        from .cache import is_built, task_dir

        folder = task_dir(seed=block_seed(block), cache_dir=block_cache_dir(block), params=self.params(block))
        return folder if is_built(folder) else None

    # ------------------------------------------------------------------ names

    def model_names(self, block) -> tuple[str, ...]:
        return self.params(block).model_names

    def check_model(self, model: str, block, what: str) -> None:
        from .params import MODEL_NAMES

        check_name(self, "model", model, MODEL_NAMES, what)
        self._check_size(block, model, what)

    def check_reward(self, reward: str, block, what: str) -> None:
        from .proxy import SYNTHETIC_REWARDS

        check_name(self, "reward model", reward, SYNTHETIC_REWARDS, what)
        self._check_size(block, None, what)

    def _check_size(self, block, model: str | None, what: str) -> None:
        """A named size other than full holds only some models and no proxy reward (``model`` None): one line
        naming what is missing and how to get the full build."""
        from ..errors import ConfigError
        from .params import DEFAULT_SIZE

        size = str((block.get("size") if block is not None else None) or DEFAULT_SIZE)
        if size == DEFAULT_SIZE:
            return
        names = self.model_names(block)
        if model is not None and model in names:
            return
        missing = f"no model {model!r}" if model is not None else "no proxy reward"
        raise ConfigError(
            f"{what}: the {size} build of the synthetic task (synthetic={size}) has {missing}, only {', '.join(names)}; "
            "use the full build: synthetic=default (built ahead by `tqstar prepare synthetic`)"
        )

    def resolve_reward(self, reward_cfg, block):
        """`synthetic:proxy` (type hf, conf/reward/synthetic_proxy.yaml) becomes a copy of the reward config naming
        its folder, the proxy trained next to the build of `block` (seed, cache_dir), built on first use."""
        from omegaconf import OmegaConf

        from ..models import config_key
        from .proxy import ensure_proxy

        key = config_key(reward_cfg, "name_or_path")
        source = str(reward_cfg.get("name_or_path"))
        self.check_reward(source.split(":", 1)[1], block, f"{key}={source!r}")
        folder = ensure_proxy(seed=block_seed(block), cache_dir=block_cache_dir(block), build_params=self.params(block))
        data = OmegaConf.to_container(reward_cfg, resolve=True)
        data["name_or_path"] = str(folder)
        if str(data.get("tokenizer") or "").startswith("synthetic:"):
            data["tokenizer"] = str(folder)
        mount = key.rpartition(".")[0] or "reward"
        return OmegaConf.create({mount: data})[mount]  # mounted as before: error messages keep naming `reward.<key>`

    # ------------------------------------------------------------------ the decode summary

    def references(self, cfg, rows: list[dict]) -> list[dict]:
        """The build's own greedy evaluation of its SFT model and of the config's baseline, when the run decoded
        exactly the prompts the build evaluated them on (all of its held-out prompts; `make demo` does):
        ``[{"model", "prompts", "reward": {"mean", "se", "n"}, "tokens", "max_new_tokens"}]``, else []. Reads only
        the cached build's files (never builds)."""
        if str(cfg.dataset.get("split", "test")) != "test" or not rows:
            return []
        from ..files import read_jsonl
        from .cache import load_manifest

        folder = self.find(cfg.get(self.name))
        if folder is None or not (folder / "prompts" / "test.jsonl").is_file():
            return []
        if sorted(str(p["id"]) for p in read_jsonl(folder / "prompts" / "test.jsonl")) != sorted(str(r["prompt_id"]) for r in rows):
            return []
        manifest = load_manifest(folder)
        evaluation = manifest.get("eval") or {}
        names = ["sft"]
        baseline = str(cfg.baseline.name_or_path) if cfg.get("baseline") is not None else ""
        if baseline.startswith("synthetic:") and baseline.split(":", 1)[1] != "sft":
            names.append(baseline.split(":", 1)[1])
        return [
            {
                "model": name,
                "prompts": evaluation[name]["target_reward"]["n"],
                "reward": evaluation[name]["target_reward"],
                "tokens": evaluation[name].get("mean_new_tokens"),
                "max_new_tokens": (manifest.get("eval_settings") or {}).get("max_new_tokens"),
            }
            for name in names
            if name in evaluation
        ]

    def next_steps(self, block, run_path: Path) -> list[tuple[str, str]] | None:
        """What to try after `make demo` (a run on the demo build): (command, what it does) rows."""
        if block is None or block.get("size") != "demo":
            return None
        from .params import BUILD_SECONDS

        return [
            (f"tqstar evaluate {run_path}", "every metric of the run (reward, diversity, coherence, cost) and a comparison table"),
            (
                "tqstar decode experiment=demo decoder=sft",
                "the same prompts without steering (or decoder=cd, decoder=args, decoder=best_of_n)",
            ),
            (f"tqstar evaluate {run_path.parent}", "the demo runs side by side"),
            (
                "tqstar prepare synthetic",
                f"the full testbed (about {BUILD_SECONDS['full'] / 60:.0f} min on 2 CPU cores, once): five baselines, "
                "128 held-out prompts; plain `tqstar decode` and the results pages use it",
            ),
        ]

    # ------------------------------------------------------------------ tqstar prepare synthetic

    def prepare(self, cfg, flags: dict[str, bool], console) -> None:
        from rich.table import Table

        from .build import ensure_built
        from .cache import load_manifest

        block = cfg.synthetic
        params = self.params(block)  # synthetic=demo: the demo build
        proxy = bool(flags.get("proxy"))
        if proxy:
            self._check_size(block, None, "--proxy")
        threads = cfg.get("num_threads")  # experiment=demo: 1
        folder = ensure_built(seed=int(block.seed), cache_dir=block.cache_dir, progress=True, params=params, num_threads=threads)
        if proxy:
            from .proxy import ensure_proxy

            ensure_proxy(seed=int(block.seed), cache_dir=block.cache_dir, progress=True, num_threads=threads)
        manifest = load_manifest(folder)
        console.print(f"synthetic task ({block.size} build): {folder} (built in {manifest['seconds']['total']:.0f} s)")
        premise = manifest.get("premise") or {}
        table = Table(title="baselines against rho*_beta on the held-out prompts (sampled, T=1)")
        for column in (
            "model",
            "reward, beta",
            "sampled reward",
            "E_rho*[r] (IS)",
            "KL to SFT",
            "KL(rho*‖SFT)",
            "implied slope",
            "greedy r",
        ):
            table.add_column(column, justify="right")

        for name, evaluation in manifest["eval"].items():
            check = premise.get(name, {})
            if name == "sft":
                cells = ["", _pm(check.get("target_reward")), "", "0", "", ""]
            else:
                slope = check.get("implied_reward_slope") or {}
                cells = [
                    f"{'r' if check.get('reward') == 'target_reward' else 'r_bl'}, {check.get('beta', 0):g}",
                    _pm(check.get("sampled_reward")),
                    _pm(check.get("optimum_reward")),
                    _pm(check.get("kl")),
                    _pm(check.get("optimum_kl")),
                    "" if slope.get("slope") is None else f"{slope['slope']:.2f} ± {slope['se']:.2f}",
                ]
            table.add_row(name, *cells, _pm(evaluation["target_reward"]))
        console.print(table)
        if block.size == "full":  # the proxy reward is trained next to the full build only
            console.print(proxy_summary(int(block.seed), block.cache_dir), soft_wrap=True)


def _pm(stat) -> str:
    return format_mean_se(stat.get("mean"), stat.get("se"), missing="") if stat else ""


def proxy_summary(seed: int, cache_dir) -> str:
    """One line on the learned proxy reward of the task: where it is and how well it orders held-out pairs like r."""
    from .cache import load_manifest
    from .proxy import find_proxy

    folder = find_proxy(seed=seed, cache_dir=cache_dir)
    if folder is None:
        return "proxy reward (reward=synthetic_proxy): not built; `tqstar prepare synthetic --proxy` builds it (or its first use)"
    m = load_manifest(folder)
    held = m.get("heldout") or {}

    def num(value, fmt=".3f"):
        return "n/a" if value is None else format(value, fmt)

    return (
        f"proxy reward (reward=synthetic_proxy): {folder}\n"
        f"  held-out pairwise accuracy vs r {num(held.get('accuracy'))} on {held.get('pairs', 0)} pairs "
        f"({held.get('samples', 0)} SFT samples of {held.get('prompts', 0)} test prompts); "
        f"corr with r: Pearson {num(held.get('pearson'))}, Spearman {num(held.get('spearman'))}; "
        f"trained on {m.get('pairs', {}).get('train', 0)} pairs in {num(m.get('seconds', {}).get('train'), '.0f')} s"
    )


TESTBED = SyntheticTestbed()
