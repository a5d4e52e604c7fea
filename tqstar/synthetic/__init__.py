"""The offline synthetic task: corpus, tokenizer, SFT model and DPO baselines, built once and cached.

Importing this package is cheap (no torch / transformers until a build runs). The modules, each
importing only from those before it: corpus, rewards, params, tokenizer -> cache -> training,
generation -> distill -> evaluation -> build (the recipe and its folder layout are described there).
"""

from .build import ensure_built
from .cache import load_manifest, task_dir
from .params import DEFAULT_BASELINE, MODEL_NAMES, BuildParams
from .rewards import baseline_reward, target_reward

__all__ = [
    "DEFAULT_BASELINE",
    "MODEL_NAMES",
    "BuildParams",
    "ensure_built",
    "load_manifest",
    "task_dir",
    "target_reward",
    "baseline_reward",
]
