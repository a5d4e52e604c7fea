"""The offline synthetic task: corpus, tokenizer, SFT model and DPO baselines, built once and cached.

Importing this package is cheap (no torch / transformers until a build runs).
"""

from .build import MODEL_NAMES, BuildParams, ensure_built, load_manifest, task_dir
from .rewards import baseline_reward, target_reward

__all__ = ["MODEL_NAMES", "BuildParams", "ensure_built", "load_manifest", "task_dir", "target_reward", "baseline_reward"]
