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


def make_llama(tokenizer, seed: int, layers: int = 2, hidden: int = 32):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab_size = max(tokenizer.get_vocab().values()) + 1
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    # Random init is nearly uniform; sharpen it so greedy paths are decisive and varied.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


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
    build._sft_stage(out, seed, params, build._Progress(False), seconds={})
    return {"task": "synthetic", "seed": seed, "params": params.to_dict(), "seconds": {"total": 0.0}, "eval": {}, "premise": {}}


@pytest.fixture(scope="session")
def tiny_synthetic_cache(tmp_path_factory):
    """A cache folder whose seed-0 synthetic task (at the default build's location, so `synthetic:` names and
    `synthetic.cache_dir=<it>` find it) is the tiny stand-in above."""
    from tqstar.synthetic.cache import build_once, task_dir

    root = tmp_path_factory.mktemp("tiny-synthetic-cache")
    build_once(task_dir(0, root), write_tiny_build)
    return root
