"""Shared-prefix rollouts (decoder.shared_prefix, tqstar/decoding/cascade.py): rows attend to one copy of their
prompt's prefix through cascade attention, with the outputs of copying the prefix into every row."""

from __future__ import annotations

import pytest
import torch
from test_engine import PROMPTS, bounded_decoder

from tqstar.decoding import cascade
from tqstar.decoding.kv import KVStream, _forward
from tqstar.decoding.reference import reference_decode


def tiny(family: str, tokenizer, dtype=torch.float64):
    """A tiny random model of each family cascade attention supports (grouped-query attention for Llama)."""
    from conftest import make_llama, tiny_model, vocab_size_of

    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    if family == "llama":
        model = make_llama(tokenizer, seed=4)  # sharpened x20 here, and once more below
    else:
        sizes = {} if family == "gpt2" else dict(max_position_embeddings=128)
        model = tiny_model(family, vocab_size_of(tokenizer), seed=4, **sizes, **ids)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.to(dtype).eval()


def prefilled(model, tokenizer, prompts=PROMPTS) -> KVStream:
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)  # left-padded: prompts of different lengths
    return KVStream.prefill(model, encoded["input_ids"], encoded["attention_mask"])


FAMILIES = ["llama", "gpt2", "gpt_neox"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_fork_gives_the_logits_of_a_copying_fork(family, dtype, tokenizer):
    """Rows of uneven count per prompt (the general layout), then rows dropped, then an even layout (the reshape path):
    the same next-token logits as forks that copy the prefix, and the prefix is never copied."""
    model = tiny(family, tokenizer, dtype)
    parent = prefilled(model, tokenizer)
    assert parent.shareable
    tolerance = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for rows in ([0, 0, 1, 2, 2, 2, 0], [0, 0, 1, 1, 2, 2]):
        rows = torch.tensor(rows)
        shared, copied = parent.fork(rows, share=True), parent.fork(rows)
        assert isinstance(shared.cache, cascade.SharedPrefixCache) and not isinstance(copied.cache, cascade.SharedPrefixCache)
        for mine, theirs in zip(shared.cache.layers, parent.cache.layers):
            assert mine.prefix_keys.data_ptr() == theirs.keys.data_ptr() and mine.prefix_values.data_ptr() == theirs.values.data_ptr()
        tokens = torch.arange(5, 5 + len(rows))
        for step in range(4):  # (not inside shared.steps(): that would run the copying fork with cascade attention too)
            a, b = _raw_step(shared, tokens), _raw_step(copied, tokens)
            torch.testing.assert_close(a, b, **tolerance)
            tokens = a.argmax(-1)
            if step == 1:  # drop rows (finished rollouts leave the batch)
                keep = torch.tensor([0, 2, 3, len(rows) - 1])
                shared.keep(keep)
                copied.keep(keep)
                tokens = tokens[keep]
    assert model.config._attn_implementation == "sdpa"  # switched back after the shared forwards


def _raw_step(stream: KVStream, tokens: torch.Tensor) -> torch.Tensor:
    """`KVStream.step`, returning the model's logits in its own dtype (step's are float32)."""
    ones = torch.ones((stream.rows, 1), dtype=stream.mask.dtype)
    stream.mask = torch.cat([stream.mask, ones], dim=1)
    out, stream.cache = _forward(
        stream.model, stream.cache, input_ids=tokens[:, None], attention_mask=stream.mask, position_ids=stream.next_position[:, None]
    )
    stream.next_position = stream.next_position + 1
    return out.logits[:, -1, :]


@pytest.mark.parametrize("family", FAMILIES)
def test_graft_and_several_new_tokens_at_once(family, tokenizer):
    """A graft (a kept rollout's keys/values after the prefix) and a forward of three tokens per row (causal among
    them) give what copying gives."""
    model = tiny(family, tokenizer)
    parent = prefilled(model, tokenizer)
    rows = torch.tensor([2, 0, 0])
    source = parent.fork(rows)
    for token in (7, 8):
        source.step(torch.full((3,), token))
    suffix = source.tail(2)
    following = torch.tensor([3, 4, 5])
    torch.testing.assert_close(parent.graft(rows, suffix, share=True).step(following), source.step(following), rtol=1e-6, atol=1e-5)
    streams = [parent.graft(rows, suffix, share=True), parent.graft(rows, suffix)]
    tokens = torch.tensor([[9, 10, 11], [12, 13, 14], [9, 10, 11]])
    outputs = []
    for stream in streams:
        mask = torch.cat([stream.mask, torch.ones((3, 3), dtype=stream.mask.dtype)], dim=1)
        positions = stream.next_position[:, None] + torch.arange(3)
        out, _ = _forward(stream.model, stream.cache, input_ids=tokens, attention_mask=mask, position_ids=positions)
        outputs.append(out.logits[:, -1, :])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-9, atol=1e-9)


CASES = [
    dict(method="cd"),
    dict(method="tqstar", prune=False),
    dict(method="tqstar", max_batch_rows=3, reuse_rollouts=False),  # chunks split a prompt's candidates: uneven layouts
    dict(method="tqstar", transfer="indirect", rollout_selection="sample", rollout_num=2, self_normalize=True),
    dict(method="cd", stop_strings=["\n\nHuman:", ".", "!"], rollout_max_new_tokens=6),  # rows dropped as rollouts end
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_shared_prefix_rollouts_give_the_tokens_and_q_of_copied_ones(case, sft_model, baseline_model, tokenizer, monkeypatch):
    calls = []
    layout = cascade.SharedPrefixCache.layout
    monkeypatch.setattr(cascade.SharedPrefixCache, "layout", lambda self: calls.append(1) or layout(self))
    knobs = {"trace": True, "max_new_tokens": 8, **case}
    shared = bounded_decoder(sft_model, tokenizer, baseline_model, **knobs)
    copied = bounded_decoder(sft_model, tokenizer, baseline_model, shared_prefix=False, **knobs)
    a = shared.decode(PROMPTS)
    assert calls, "the rollouts ran through cascade attention"
    calls.clear()
    b = copied.decode(PROMPTS)
    assert not calls
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    for ga, gb in zip(a, b):
        for sa, sb in zip(ga.trace, gb.trace):
            assert sa["q"] == pytest.approx(sb["q"], abs=1e-9, nan_ok=True) and sa["rollout_rewards"] == sb["rollout_rewards"]
    assert shared.counters == copied.counters
    assert sft_model.config._attn_implementation == baseline_model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["cd", "tqstar"])
def test_shared_prefix_engine_equals_reference_oracle(family, method, tokenizer):
    model = tiny(family, tokenizer)
    decoder = bounded_decoder(model, tokenizer, model, method=method, alpha=2.0, max_new_tokens=8, rollout_max_new_tokens=4)
    assert decoder.settings.shared_prefix and decoder.settings.reuses_rollouts
    for prompt, generation in zip(PROMPTS, decoder.decode(PROMPTS)):
        text, ids = reference_decode(prompt, model, tokenizer, decoder.reward, decoder.settings, model)
        assert generation.token_ids == ids and generation.response == text


def test_models_cascade_attention_does_not_cover_copy_the_prefix(tokenizer):
    from toy import ToyLM

    toy = ToyLM(max(tokenizer.get_vocab().values()) + 1, {}, default={5: 0.5})
    assert cascade.unsupported(toy) is not None and not prefilled(toy, tokenizer).shareable
    decoder = bounded_decoder(toy, tokenizer, toy, method="cd", max_new_tokens=3)
    assert len(decoder.decode(PROMPTS)) == 3  # copied forks, as with decoder.shared_prefix=false


def test_shared_prefix_is_true_or_false():
    from tqstar.decoding.settings import DecoderSettings
    from tqstar.errors import ConfigError

    with pytest.raises(ConfigError, match=r"decoder.shared_prefix=1 is not allowed: must be true or false"):
        DecoderSettings(shared_prefix=1)


def test_cascade_attention_needs_its_cache(tokenizer):
    model = tiny("llama", tokenizer)
    with cascade.cascade(model), pytest.raises(RuntimeError, match="SharedPrefixCache"):
        model(torch.tensor([[5, 6]]))
    assert model.config._attn_implementation == "sdpa"
