"""The offline synthetic task: corpus, tokenizer, SFT model and distilled baselines, built once and cached;
and, next to a build, a learned proxy of its target reward (proxy.py, ``reward=synthetic_proxy``).

Importing this package is cheap (no torch / transformers until a build runs). The modules, each
importing only from those before it: corpus, rewards, params, tokenizer -> cache -> training,
generation -> distill -> evaluation -> build -> proxy -> testbed (the recipe and its folder layout are
described in build.py; the proxy's in proxy.py; what the registry asks of it in testbed.py; what every
testbed's build shares, from cache folders to sampling through the engine, in tqstar.builds).
"""

from .build import ensure_built
from .cache import load_manifest, task_dir
from .params import DEFAULT_BASELINE, MODEL_NAMES, BuildParams
from .proxy import ProxyParams, ensure_proxy
from .rewards import baseline_reward, target_reward

__all__ = [
    "DEFAULT_BASELINE",
    "MODEL_NAMES",
    "BuildParams",
    "ProxyParams",
    "ensure_built",
    "ensure_proxy",
    "load_manifest",
    "task_dir",
    "target_reward",
    "baseline_reward",
]
