"""Shared fixtures: tiny random models and a word-level tokenizer the tests build and save themselves.

Nothing is downloaded: every model is made from a config, saved with save_pretrained to a temp dir,
and loaded back by path, through the same code path hub checkpoints take.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "good great wonderful happy love nice fine bad awful terrible sad hate poor ugly "
    "the a it was is and but then at first in end movie food day trip hotel service . , !"
).split()
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def make_tokenizer():
    """A WordLevel tokenizer: words joined by spaces on decode; the turn markers are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.add_tokens([AddedToken(HUMAN, normalized=False, special=False), AddedToken(ASSISTANT, normalized=False, special=False)])
    tokenizer.padding_side = "left"
    return tokenizer


# One factory for every tiny random model the tests build: a family's config (these sizes, then the caller's
# overrides), its head, made after torch.manual_seed(seed).
FAMILIES = {
    "llama": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256
    ),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "bert": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
}
CONFIGS = {"llama": "LlamaConfig", "gpt_neox": "GPTNeoXConfig", "gpt2": "GPT2Config", "bert": "BertConfig"}
HEADS = {
    "causal_lm": {"llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "gpt2": "GPT2LMHeadModel"},
    "classifier": {
        "llama": "LlamaForSequenceClassification",
        "gpt_neox": "GPTNeoXForSequenceClassification",
        "gpt2": "GPT2ForSequenceClassification",
        "bert": "BertForSequenceClassification",
    },
    "base": {"bert": "BertModel"},
}


def tiny_model(
    family: str, vocab_size: int, seed: int = 0, head: str = "causal_lm", sharpen: float | None = None, portable: bool = False, **overrides
):
    """A tiny random `family` model with `head` (causal_lm | classifier | base), in eval mode.

    sharpen: multiply the output embeddings by it (random init is nearly uniform; x20 makes greedy paths decisive
    and varied). portable: draw the weights from numpy's legacy RandomState(seed) (uniform, std 0.02; norms keep
    their ones, biases zero) instead of torch's init, whose normal_ takes another code path on AVX2 CPUs than on
    others: the same bits on every machine, and across library versions while the architecture's parameters keep their
    names and shapes (the golden decode test needs that)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, CONFIGS[family])(vocab_size=vocab_size, **{**FAMILIES[family], **overrides})
    model = getattr(transformers, HEADS[head][family])(config)
    with torch.no_grad():
        if portable:
            _portable_init_(model, seed)
        if sharpen is not None:
            model.get_output_embeddings().weight.mul_(sharpen)
    return model.eval()


def _portable_init_(model, seed: int, std: float = 0.02) -> None:
    import math

    import numpy as np
    import torch

    rng = np.random.RandomState(seed)  # its stream is frozen by numpy's compatibility policy
    bound = std * math.sqrt(3.0)
    norms = {
        f"{owner}.{name}".lstrip(".")
        for owner, module in model.named_modules()
        if "norm" in type(module).__name__.lower()
        for name, _ in module.named_parameters(recurse=False)
    }
    for name, param in sorted(model.named_parameters()):
        if name in norms:  # LayerNorm / RMSNorm: their deterministic ones and zeros
            continue
        if name.endswith("bias"):
            param.zero_()
            continue
        values = ((rng.random_sample(param.numel()) * 2.0 - 1.0) * bound).astype(np.float32)
        param.copy_(torch.from_numpy(values).view(param.shape))


def vocab_size_of(tokenizer) -> int:
    return max(tokenizer.get_vocab().values()) + 1


def make_llama(tokenizer, seed: int, layers: int = 2, hidden: int = 32, portable: bool = False):
    """The tiny Llama policy most tests decode with (output embeddings sharpened x20)."""
    return tiny_model(
        "llama",
        vocab_size_of(tokenizer),
        seed,
        sharpen=20.0,
        portable=portable,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Tests outside the slow tier run torch on one CPU thread: their models are tiny, so a second thread buys
    nothing, while on a busy machine two threads contending with other processes slow them several-fold (the
    engine tests took 141 s instead of 23 s beside one other job). Slow tests (real builds) keep torch's default."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def sft_model(tokenizer):
    return make_llama(tokenizer, seed=1).double()


@pytest.fixture(scope="session")
def baseline_model(tokenizer):
    return make_llama(tokenizer, seed=2).double()


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, tokenizer):
    """SFT and baseline tiny Llamas saved to disk (with the tokenizer), for loading by path."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, seed in (("sft", 1), ("dpo", 2)):
        model = make_llama(tokenizer, seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def positive_words_reward(prompts, responses):
    """Counts positive minus negative words: a cheap deterministic reward for tests."""
    positive = {"good", "great", "wonderful", "happy", "love", "nice", "fine"}
    negative = {"bad", "awful", "terrible", "sad", "hate", "poor", "ugly"}
    return [float(sum((w in positive) - (w in negative) for w in r.split())) for r in responses]


@pytest.fixture
def hydra_clean():
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def full_build_cache(tmp_path_factory):
    """A cache folder holding the default synthetic build of seed 0, built once per test session (slow tests)."""
    from tqstar.synthetic import ensure_built

    folder = tmp_path_factory.mktemp("synthetic-cache")
    ensure_built(seed=0, cache_dir=folder, progress=False)
    return folder


# A tiny stand-in of the synthetic build (seconds, not minutes): corpus, tokenizer, a briefly trained SFT model
# and its samples on the train prompts, i.e. what the proxy reward reads from a build.
TINY_BUILD = dict(
    n_corpus=240,
    n_train_prompts=12,
    n_test_prompts=4,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    max_positions=128,
    sft_epochs=2,
    sft_batch_size=16,
    n_distill_prompts=12,
    samples_per_prompt=8,
    sample_max_new_tokens=16,
)


def write_tiny_build(out, seed: int = 0) -> dict:
    """Fill ``out`` by steps 1-4 of tqstar.synthetic.build (sft/, prompts/, corpus.jsonl, distill_data/samples.jsonl)
    on the TINY_BUILD recipe; returns a manifest with the keys `tqstar prepare synthetic` prints."""
    from tqstar.synthetic import build
    from tqstar.synthetic.params import BuildParams

    params = BuildParams(**TINY_BUILD)
    build._sft_stage(out, seed, params, build.Progress(False), seconds={})
    return {"task": "synthetic", "seed": seed, "params": params.to_dict(), "seconds": {"total": 0.0}, "eval": {}, "premise": {}}


@pytest.fixture(scope="session")
def tiny_synthetic_cache(tmp_path_factory):
    """A cache folder whose seed-0 synthetic task (at the default build's location, so `synthetic:` names and
    `synthetic.cache_dir=<it>` find it) is the tiny stand-in above."""
    from tqstar.synthetic.cache import build_once, task_dir

    root = tmp_path_factory.mktemp("tiny-synthetic-cache")
    build_once(task_dir(0, root), write_tiny_build)
    return root
