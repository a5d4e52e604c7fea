"""The synthetic task's tokenizer: a WordLevel vocabulary trained on the corpus (no downloads)."""

from __future__ import annotations

from ..data.hh import ASSISTANT, HUMAN

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
ROLE_TOKENS = (HUMAN, ASSISTANT)


def train_tokenizer(texts: list[str]):
    """A WordLevel tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Words are split on spaces (Metaspace, so decode puts the spaces back) and punctuation is
    isolated; "\\n\\nHuman:" and "\\n\\nAssistant:" are added (non-special) tokens that decode
    to exactly themselves; ``<s>`` is prepended on encode. Ids: 0 <pad>, 1 <unk>, 2 <s>, 3 </s>,
    4 "\\n\\nHuman:", 5 "\\n\\nAssistant:", then words by frequency. Deterministic for the same texts.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="always"), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    # role markers are reserved in the trainer (fixed ids 4, 5) and never seen in the texts
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS) + list(ROLE_TOKENS), min_frequency=1, show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False) for t in ROLE_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def vocab_size_of(tokenizer) -> int:
    """Embedding rows needed: the largest id + 1 (a WordLevel vocab can report one short)."""
    return max(max(tokenizer.get_vocab().values()) + 1, len(tokenizer))
