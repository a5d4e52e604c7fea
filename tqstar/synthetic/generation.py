"""Decoding for the build (preference samples, greedy evaluation) through the project's engine.

Plain decoding is the engine's ``sft`` method applied to whichever model is passed; responses end
at EOS or at a stop string (STOP_STRINGS), which is cut off. Each row's draws come from its own
generator seeded by (seed, row index), so samples do not depend on how rows are batched.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .params import STOP_STRINGS


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    selection: str = "greedy",
    temperature: float = 1.0,
    samples_per_prompt: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    update: Callable[..., None] = lambda **k: None,
    sft_model=None,
    top_k: int | None = None,
    stop_strings: Sequence[str] = STOP_STRINGS,
    keep_ids: bool = False,
) -> list[dict]:
    """``samples_per_prompt`` responses per prompt (prompt-major), decoded ``batch_size`` prompts
    (x samples_per_prompt rows) at a time. Row ``prompt_index * samples_per_prompt + j`` is the
    engine index of draw j. One dict per row: ``{"prompt_index", "response", "n_tokens",
    "finished"}``; ``n_tokens`` counts the final EOS / stop token, ``finished`` is False when the
    response hit ``max_new_tokens``. ``update(completed=...)`` counts prompts done.

    With ``sft_model``, ``model`` is decoded as the engine's baseline (the SFT model follows along), so
    each row also has ``sft_logprob``: log pi_sft of the response; ``logprob`` is the decoding
    model's log-prob of it (None for greedy decoding of the SFT model alone). ``top_k`` (sampling only):
    draw each token from the decoding model's top k only (``logprob`` is then the truncated policy's).
    ``stop_strings``: where a response ends besides EOS (default: the synthetic task's). ``keep_ids``: rows
    also carry ``token_ids`` (the generated ids, a final EOS / stop-string tokens included) and
    ``stop_reason`` (eos | stop_string | max_new_tokens), for training on exactly what was sampled."""
    from ..decoding.engine import Decoder
    from ..decoding.settings import DecoderSettings

    n = samples_per_prompt
    rows = [p for p in prompts for _ in range(n)]
    indices = list(range(len(rows)))  # = prompt_index * n + j
    rows_per_batch = batch_size * n
    settings = DecoderSettings(
        method="sft" if sft_model is None else "baseline",
        selection=selection,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        stop_strings=list(stop_strings),
        batch_size=rows_per_batch,
        seed=seed,
        sample_top_k=top_k,
    )
    if sft_model is None:
        decoder = Decoder(model, tokenizer, settings=settings)
    else:
        decoder = Decoder(sft_model, tokenizer, baseline_model=model, settings=settings)
    old_side = tokenizer.padding_side  # the engine left-pads; the caller's tokenizer is left as it was
    out: list[dict] = []
    try:
        for start in range(0, len(rows), rows_per_batch):
            window = slice(start, start + rows_per_batch)
            for index, g in zip(indices[window], decoder.decode(rows[window], indices[window])):
                row = {
                    "prompt_index": index // n,
                    "response": g.response.strip(),
                    "n_tokens": g.num_tokens,
                    "finished": g.stop_reason != "max_new_tokens",
                    "sft_logprob": sum(g.sft_logprobs),
                    "logprob": None if g.policy_logprobs is None else sum(g.policy_logprobs),
                }
                if keep_ids:
                    row.update(token_ids=list(g.token_ids), stop_reason=g.stop_reason)
                out.append(row)
            update(completed=min(len(prompts), (start + rows_per_batch) // n))
    finally:
        tokenizer.padding_side = old_side
    return out
