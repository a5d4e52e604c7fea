"""Device discipline (issue 26): every tensor our decoding, rewards and model loading make takes its device from
its inputs or its model, so that on a GPU nothing lands on the CPU by accident (a cross-device error, or a silent
slow copy).

On a CPU-only machine every tensor is on the CPU, so a forgotten `device=` cannot fail here by itself. The tests
instead watch torch's factory functions through a `TorchFunctionMode` (`FactoryWatch`): a factory call (torch.tensor,
zeros, full, arange, rand, ...) made without a `device=` argument, whose call site (the first Python frame outside
torch) lies in tqstar/decoding/, tqstar/rewards/ or tqstar/models.py, is what would put a tensor on the CPU on a GPU
box. Calls inside torch or transformers are not ours and are not counted; `*_like` and `Tensor.new_*` inherit their
device and are not factories here. A self-test plants an offender under the watched paths, so the guard cannot pass
silently.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import tqstar
from tqstar.decoding.engine import Decoder
from tqstar.decoding.reference import reference_decode
from tqstar.decoding.settings import DecoderSettings
from tqstar.rewards import FunctionReward
from tqstar.rewards.hf import HFClassifierReward

from conftest import ASSISTANT, HUMAN, positive_words_reward

PACKAGE = Path(tqstar.__file__).resolve().parent
WATCHED_DIRS = (PACKAGE / "decoding", PACKAGE / "rewards")
WATCHED_FILES = (PACKAGE / "models.py",)
TORCH_DIR = Path(torch.__file__).resolve().parent

# Factories that place their result on the default device (the CPU) unless told otherwise.
FACTORIES = frozenset(
    f
    for f in (
        torch.tensor,
        torch.as_tensor,
        torch.asarray,
        torch.scalar_tensor,
        torch.zeros,
        torch.ones,
        torch.full,
        torch.empty,
        torch.empty_strided,
        torch.arange,
        torch.range,
        torch.linspace,
        torch.logspace,
        torch.eye,
        torch.rand,
        torch.randn,
        torch.randint,
        torch.randperm,
        torch.tril_indices,
        torch.triu_indices,
    )
)

PROMPTS = [f"{HUMAN} the movie was bad{ASSISTANT}", f"{HUMAN} at first the food was awful but then it was great{ASSISTANT}"]


def watched(filename: str) -> bool:
    path = Path(filename).resolve()
    return path in WATCHED_FILES or any(path.is_relative_to(folder) for folder in WATCHED_DIRS)


def call_site(depth: int = 2):
    """The first frame outside torch (and outside this module's watch code): who called the torch function."""
    frame = sys._getframe(depth)
    here = Path(__file__).resolve()
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if not path.is_relative_to(TORCH_DIR) and path != here:
            return frame
        frame = frame.f_back
    return None


class FactoryWatch(TorchFunctionMode):
    """Records every factory call without `device=` whose call site is in the watched paths: (file:line, function)."""

    def __init__(self):
        super().__init__()
        self.offenders: list[str] = []
        self.factory_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            self.factory_calls += 1
            if kwargs.get("device") is None:
                frame = call_site()
                if frame is not None and watched(frame.f_code.co_filename):
                    rel = Path(frame.f_code.co_filename).resolve().relative_to(PACKAGE.parent)
                    self.offenders.append(f"{rel}:{frame.f_lineno} torch.{func.__name__}")
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- the guard's own tests


def _run_planted(filename: Path, source: str):
    namespace = {"torch": torch}
    exec(compile(source, str(filename), "exec"), namespace)  # noqa: S102 - a frame whose file is under the watched paths
    like = torch.ones(1, device="cpu")
    with FactoryWatch() as watch:
        namespace["make"](like)
    return watch


PLANTED = """
def make(like):
    a = torch.zeros(3, dtype=torch.long)          # offender: no device
    b = torch.tensor([1, 2], device=like.device)  # fine
    c = torch.zeros_like(like)                    # fine: inherits
    d = like.new_full((2,), 1.0)                  # fine: inherits
    e = torch.arange(4)                           # offender
    return a, b, c, d, e
"""


@pytest.mark.parametrize("where", ["decoding/_planted.py", "rewards/_planted.py", "models.py"])
def test_the_watch_reports_a_factory_call_without_a_device_in_a_watched_file(where):
    """A planted offender (code compiled as if it lived in a watched file; no file is written) is reported, with its
    line; calls with a device and the `*_like` / `new_*` forms are not."""
    watch = _run_planted(PACKAGE / where, PLANTED)
    rel = f"tqstar/{where}"
    assert watch.offenders == [f"{rel}:3 torch.zeros", f"{rel}:7 torch.arange"]
    assert watch.factory_calls == 3  # zeros, tensor, arange


def test_the_watch_ignores_code_outside_the_watched_paths():
    assert _run_planted(PACKAGE / "cli_planted.py", PLANTED).offenders == []
    assert _run_planted(Path(__file__), PLANTED).offenders == []


# ----------------------------------------------------------------------------- every method, watched


def _bounded_reward(prompts, responses):
    return [max(-1.0, min(1.0, v / 3)) for v in positive_words_reward(prompts, responses)]


def _length_reward(prompts, responses):
    return [0.1 * len(r.split()) for r in responses]


def _classifier_reward(**kwargs):
    from test_reward_prefix_cache import make_bpe_tokenizer, make_classifier

    classifier = make_classifier("gpt_neox", len(make_bpe_tokenizer()), seed=5).double()
    return HFClassifierReward(classifier, make_bpe_tokenizer(), stop_strings=[HUMAN], **kwargs)


CASES = [
    ("sft greedy", dict(method="sft")),
    ("sft sampled top-k", dict(method="sft", selection="sample", sample_top_k=5)),
    ("baseline greedy", dict(method="baseline")),
    ("baseline sampled", dict(method="baseline", selection="sample")),
    ("best_of_n", dict(method="best_of_n", n=2, selection="sample")),
    ("args greedy", dict(method="args")),
    ("args sampled", dict(method="args", selection="sample")),
    ("cd greedy, pruned, reused", dict(method="cd", reward="bounded")),
    ("cd sampled rollouts", dict(method="cd", selection="sample", rollout_selection="sample", rollout_num=2, rollout_top_k=5)),
    ("cd soft value", dict(method="cd", value="soft", beta=0.5, reward="bounded")),
    ("tqstar direct greedy, pruned, reused", dict(method="tqstar", reward="bounded")),
    ("tqstar direct, copied prefix", dict(method="tqstar", reward="bounded", shared_prefix=False)),
    ("tqstar direct sampled", dict(method="tqstar", selection="sample", rollout_selection="sample", rollout_num=2)),
    ("tqstar indirect greedy", dict(method="tqstar", transfer="indirect")),
    (
        "tqstar indirect self-normalised",
        dict(method="tqstar", transfer="indirect", self_normalize=True, rollout_selection="sample", rollout_num=2, reward="bounded"),
    ),
    ("cd, HF classifier with the prefix cache", dict(method="cd", reward="hf")),
    ("tqstar indirect, HF classifier both", dict(method="tqstar", transfer="indirect", reward="hf", baseline_reward="hf")),
    ("args, HF classifier without the prefix cache", dict(method="args", reward="hf_plain")),
]


def _make_decoder(sft_model, baseline_model, tokenizer, reward="words", baseline_reward="length", **settings):
    rewards = {
        "words": lambda: positive_words_reward,
        "length": lambda: _length_reward,
        "bounded": lambda: FunctionReward(_bounded_reward, bounds=(-1.0, 1.0)),
        "hf": lambda: _classifier_reward(output="probability", prefix_cache=True),
        "hf_plain": lambda: _classifier_reward(prefix_cache=False),
    }
    defaults = dict(top_k=4, max_new_tokens=5, rollout_max_new_tokens=3, batch_size=2, alpha=1.0, seed=3)
    return Decoder(
        sft_model,
        tokenizer,
        reward=rewards[reward](),
        baseline_model=baseline_model,
        baseline_reward=rewards[baseline_reward](),
        settings=DecoderSettings(**{**defaults, **settings}),
    )


def test_no_watched_code_makes_a_tensor_without_a_device(sft_model, baseline_model, tokenizer, saved_models):
    """Every method of the registry (greedy and sampled, pruning and rollout reuse on, shared and copied prefixes,
    direct and indirect transfer, an HF classifier reward with its prefix cache), the reference oracle and the model
    loader run under the watch: no factory call in tqstar/decoding/, tqstar/rewards/ or tqstar/models.py lacks a
    device."""
    from omegaconf import OmegaConf

    from tqstar import models

    decoders = [(name, _make_decoder(sft_model, baseline_model, tokenizer, **settings)) for name, settings in CASES]
    offenders: dict[str, list[str]] = {}
    with FactoryWatch() as watch:
        for name, decoder in decoders:
            decoder.decode(PROMPTS)
            if decoder.settings.selection == "greedy" and decoder.settings.rollout_selection == "greedy":
                reference_decode(
                    PROMPTS[0], sft_model, tokenizer, decoder.reward, decoder.settings, baseline_model, decoder.baseline_reward
                )
            offenders.update({name: sorted(set(watch.offenders))} if watch.offenders else {})
            watch.offenders = []
        models.clear_cache()
        models.load_model(OmegaConf.create({"name_or_path": str(saved_models["sft"]), "device": "cpu"}), "cpu")
        offenders.update({"load_model": sorted(set(watch.offenders))} if watch.offenders else {})
    models.clear_cache()
    assert watch.factory_calls > 0  # the mode saw the decodes at all
    sites = {site: sorted(name for name, found in offenders.items() if site in found) for found in offenders.values() for site in found}
    assert sites == {}, "factory calls without device= (site: cases):\n" + "\n".join(f"{k}: {v}" for k, v in sorted(sites.items()))


# ----------------------------------------------------------------------------- the hh_pythia placement, on a CPU


class PlacementWatch(TorchFunctionMode):
    """Tags tensors with a virtual device and reports any torch call whose tensor arguments carry two tags.

    Each model's parameters and buffers carry the device its config names (e.g. 'cuda:0', 'cuda:1'), although all
    really sit on the CPU; the output of a call whose tagged arguments share one tag carries that tag too. An explicit
    move (`.to(...)`, `.cpu()`, `.cuda()`) and a factory call drop the tag: their real device is whatever the code
    named, which a CPU run cannot tell apart. A mix of tags is what would be a cross-device error on the real boxes."""

    MOVES = frozenset({"to", "cpu", "cuda"})

    def __init__(self, models: list[tuple[str, torch.nn.Module]]):
        super().__init__()
        self.tags: dict[int, tuple[weakref.ref, str]] = {}
        self.mixes: list[str] = []
        self.tagged_calls: dict[str, int] = {}
        for tag, model in models:
            for tensor in (*model.parameters(), *model.buffers()):
                self._tag(tensor, tag)

    def _tag(self, tensor: torch.Tensor, tag: str) -> None:
        self.tags[id(tensor)] = (weakref.ref(tensor), tag)

    def tag_of(self, tensor: torch.Tensor) -> str | None:
        entry = self.tags.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _moves(self, name: str, args, kwargs) -> bool:
        """`.cpu()`, `.cuda()`, and `.to(...)` given a device (not a dtype only)."""
        if name not in self.MOVES:
            return False
        if name != "to":
            return True
        return "device" in kwargs or any(isinstance(a, (torch.device, str, int, torch.Tensor)) for a in args[1:])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tags = {tag for tag in map(self.tag_of, inputs) if tag is not None}
        name = getattr(func, "__name__", str(func))
        if len(tags) > 1:
            frame = call_site()
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"
            self.mixes.append(f"{name} mixes {sorted(tags)} at {where}")
        elif tags and self._moves(name, args, kwargs):
            if any(result is t for t in inputs):  # already there: on a CPU every move is a no-op returning its input
                result = result.view_as(result)  # an untagged alias, as the moved copy would be
        elif tags and func not in FACTORIES:
            (tag,) = tags
            self.tagged_calls[tag] = self.tagged_calls.get(tag, 0) + 1
            for out in tree_flatten(result)[0]:
                if isinstance(out, torch.Tensor) and self.tag_of(out) is None:
                    self._tag(out, tag)
        return result


def test_the_placement_watch_reports_a_tensor_crossing_between_models(sft_model):
    """Self-test: token ids the policy computed fed to a model tagged with another device are reported; the same ids
    moved explicitly (`.to`), or fed to a model of the same tag, are not."""
    from test_reward_prefix_cache import make_classifier

    classifier = make_classifier("llama", 16, seed=1).double()
    ids = torch.tensor([[3, 4, 5]], device="cpu")
    with torch.no_grad(), PlacementWatch([("cuda:0", sft_model), ("cuda:1", classifier)]) as watch:
        chosen = sft_model(input_ids=ids).logits.argmax(-1).clamp(max=15)
        assert watch.tag_of(chosen) == "cuda:0"
        sft_model(input_ids=chosen)
        classifier(input_ids=chosen.to("cpu"))
        assert watch.mixes == []
        classifier(input_ids=chosen)
    assert watch.mixes and all("'cuda:0', 'cuda:1'" in mix for mix in watch.mixes)


def _hh_pythia(overrides: list[str]):
    from tqstar.config import compose, validate

    cfg = compose(["experiment=hh_pythia", *overrides])
    validate(cfg)
    return cfg


@pytest.fixture
def hh_pythia_tiny(saved_models, tmp_path, hydra_clean):
    """The hh_pythia preset with its three checkpoints swapped for tiny local ones, float32, short decodes; returns
    (the preset's own device per mount, the overrides that point it at the tiny models)."""
    from test_rewards import save_reward_model

    preset = _hh_pythia([])
    placement = {mount: str(preset[mount].device) for mount in ("sft", "baseline", "reward")}
    rm = save_reward_model(tmp_path / "rm")
    overrides = [
        f"sft.name_or_path={saved_models['sft']}",
        f"baseline.name_or_path={saved_models['dpo']}",
        f"reward.name_or_path={rm}",
        *(f"{mount}.dtype=float32" for mount in placement),
        "decoder.top_k=3",
        "decoder.max_new_tokens=4",
        "decoder.rollout.max_new_tokens=3",
        "decoder.batch_size=2",
        "reward.batch_size=4",
    ]
    return placement, overrides


def test_the_hh_pythia_placement_keeps_each_models_tensors_on_its_device(hh_pythia_tiny):
    """hh_pythia places SFT and baseline on one GPU (cuda:0) and the reward model on another (cuda:1). Without two
    GPUs this runs the preset on tiny models with every device=cpu, each model's tensors tagged with the device the
    preset gives it (`PlacementWatch`), under the factory watch too, and checks that
    - no torch call mixes tensors of two devices: nothing the policy or the baseline computed (logits, caches, token
      ids) reaches the reward model, nor the reverse, without an explicit move; SFT and baseline share cuda:0 (their
      caches side by side), which is allowed;
    - no factory call in our code lacks a device (so nothing lands on the CPU by default);
    - each model's tensors were used (every tag is seen), so the watch is not vacuous.
    What it cannot prove without real devices: that the explicit moves name the right device (a `.to(device)` drops
    the tag, as its target cannot be told from the CPU here), that a copy through the host is fast, that kernels and
    dtypes (float16) behave on a GPU, or that cross-device errors torch raises only in CUDA code paths (streams,
    pinned memory, generators) are absent. The device keys' reaching the loaders is checked next, on the meta
    device (placement without running)."""
    from tqstar import models
    from tqstar.decode import build_decoder

    placement, overrides = hh_pythia_tiny
    assert placement == {"sft": "cuda:0", "baseline": "cuda:0", "reward": "cuda:1"}
    models.clear_cache()
    try:
        cfg = _hh_pythia([*overrides, "sft.device=cpu", "baseline.device=cpu", "reward.device=cpu"])
        decoder, _ = build_decoder(cfg)
        assert decoder.settings.method == "tqstar" and decoder.baseline is not None
        assert decoder.baseline is not decoder.sft
        devices = [(placement["sft"], decoder.sft), (placement["baseline"], decoder.baseline), (placement["reward"], decoder.reward.model)]
        with FactoryWatch() as factories, PlacementWatch(devices) as placed:
            generations = decoder.decode(PROMPTS)
        assert all(g.token_ids for g in generations)
        assert placed.mixes == []
        assert factories.offenders == []
        assert set(placed.tagged_calls) == {"cuda:0", "cuda:1"}
        assert decoder.counters["reward_calls"] > 0
    finally:
        models.clear_cache()


def test_the_hh_pythia_device_keys_reach_each_loaded_model(hh_pythia_tiny):
    """The meta device holds a model without running it: with the reward model on meta, the SFT and baseline models
    are on the CPU and the reward model's weights on meta, i.e. each mount's `device` key places its own model."""
    from tqstar import models
    from tqstar.decode import build_decoder

    _, overrides = hh_pythia_tiny
    models.clear_cache()
    try:
        cfg = _hh_pythia([*overrides, "sft.device=cpu", "baseline.device=cpu", "reward.device=meta"])
        decoder, _ = build_decoder(cfg)
        devices = {
            role: {str(p.device) for p in model.parameters()}
            for role, model in (("sft", decoder.sft), ("baseline", decoder.baseline), ("reward", decoder.reward.model))
        }
        assert devices == {"sft": {"cpu"}, "baseline": {"cpu"}, "reward": {"meta"}}
    finally:
        models.clear_cache()
