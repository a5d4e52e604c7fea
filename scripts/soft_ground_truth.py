"""Where does the optimal decoder's KL excess come from? The ground-truth split at beta = 0.25 (soft transfer issue, 3).

    .venv/bin/python scripts/soft_ground_truth.py                      # seed 0, 64 states, 1,024 rollouts a candidate
    .venv/bin/python scripts/soft_ground_truth.py --states 8 --rollouts 256 synthetic.seed=1   # smaller, another seed

1. Decodes held-out prompts with the optimal decoder (experiment=synthetic_optimal: the soft value of 16 SFT rollouts
   of pi_k, alpha = 1/beta, sampled; rollouts of 32 tokens as in the optimal_check sweep), trace on, until the visited
   states (prompt, accepted prefix) number --states; every step of a response is taken, so sums over a response's
   steps are per-response figures.
2. At each state, rolls out each of the k candidates --rollouts times (the same decoder with rollout.num = --rollouts
   and one new token; the state is the prompt text with the prefix appended, checked to re-tokenise to the same ids).
3. From those rewards: the near-exact values V (all rollouts) and --rollouts / 16 draws of the decoder's own 16-rollout
   estimates (disjoint groups), and `tqstar.premise.kl_split`: the KL to pi_sft the decoder records (the mean over
   draws of KL(p || pi_sft)), the KL of what it really decodes (KL(p_bar || pi_sft), p_bar the mean of the draws'
   step distributions), the target's (exact values), the Jensen gap (recorded - real: a measurement artefact) and
   the distortion (real - target: a real change of the decoded distribution).
Prints a table and writes docs/bench/soft_ground_truth_seed<seed>.json (per state and per response, mean ± s.e.).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = [
    "experiment=synthetic_optimal",
    "decoder.beta=0.25",
    "decoder.alpha=4",
    "decoder.rollout.max_new_tokens=32",
    "decoder.trace=true",
    "decoder.prune=false",
]
GROUP = 16  # the decoder's own rollouts per candidate (the preset's rollout.num)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--states", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=1024)
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", default=None, help="also write <sweep>/ground_truth/seed<seed>.json (read by `tqstar report`)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from tqstar.config import compose, validate
    from tqstar.data import load_prompts
    from tqstar.decode import _format, build_decoder, builds
    from tqstar.decoding.engine import Decoder
    from tqstar.decoding.settings import DecoderSettings
    from tqstar.decoding.values import soft_q
    from tqstar.premise import SPLIT_KEYS, kl_split, predicted_jensen_gap, step_distribution, summarise_split

    cfg = validate(compose(BASE + list(args.overrides)))
    torch.set_num_threads(int(cfg.get("num_threads") or 2))
    folders = builds(cfg)
    decoder, sft = build_decoder(cfg, folders)
    tokenizer = sft.tokenizer
    beta = float(cfg.decoder.beta)
    prompts = load_prompts(cfg.dataset, tokenizer, folders).prompts
    started = time.perf_counter()

    # 1. visited states: every step of the first responses, until there are enough
    states = []  # (response number, step, formatted prompt, prefix ids, candidates, log pi_sft of the candidates)
    responses = 0
    for index, prompt in enumerate(prompts):
        if len(states) >= args.states:
            break
        text = _format(prompt.text, sft)
        (generation,) = decoder.decode([text], [index], reward_prompts=[prompt.text])
        for entry in generation.trace:
            t = entry["t"]
            states.append((responses, t, prompt.text, text, generation.token_ids[:t], entry["candidates"], entry["logprobs"]))
        responses += 1
    print(f"{len(states)} states from {responses} responses ({time.perf_counter() - started:.0f} s)")

    # 2. each state's candidates, rolled out args.rollouts times
    big = DecoderSettings(**{**decoder.settings.__dict__, "rollout_num": args.rollouts, "max_new_tokens": 1, "trace": True})
    big.max_batch_rows = max(big.max_batch_rows, 2048)
    oracle = Decoder(decoder.sft, tokenizer, reward=decoder.reward, settings=big)
    rows, skipped = [], 0
    for number, (response, t, raw, text, prefix, candidates, logprobs) in enumerate(states):
        state_text = text + tokenizer.decode(prefix, skip_special_tokens=False) if prefix else text
        if tokenizer(state_text)["input_ids"] != tokenizer(text)["input_ids"] + prefix:
            skipped += 1
            continue
        (g,) = oracle.decode([state_text], [10_000 + number], reward_prompts=[raw])
        entry = g.trace[0]
        if entry["candidates"] != candidates:
            skipped += 1
            continue
        rewards = torch.tensor(entry["rollout_rewards"], dtype=torch.float64)  # (k, rollouts)
        exact = soft_q(rewards[None], beta)[0].tolist()
        groups = args.rollouts // GROUP
        noisy = [soft_q(rewards[None, :, g * GROUP : (g + 1) * GROUP], beta)[0].tolist() for g in range(groups)]
        split = kl_split(logprobs, exact, noisy, beta)
        # the gap each 16-rollout draw would predict from its own rollouts (delta method), averaged over the draws
        predicted = []
        for g in range(groups):
            values = noisy[g]
            probs = step_distribution(logprobs, values, beta)
            terms = (rewards[:, g * GROUP : (g + 1) * GROUP] / beta).tolist()
            predicted.append(predicted_jensen_gap(probs, terms, scale=1.0))  # alpha = 1/beta, temperature 1
        split["predicted_gap"] = sum(predicted) / len(predicted)
        rows.append({"response": response, "t": t, **{key: round(value, 6) for key, value in split.items()}})
        if number % 8 == 0:
            print(f"  state {number + 1}/{len(states)} ({time.perf_counter() - started:.0f} s)", flush=True)

    # 3. per response: sums over its steps (only responses whose every state was checked)
    complete = {
        r for r in {row["response"] for row in rows} if sum(row["response"] == r for row in rows) == sum(st[0] == r for st in states)
    }
    rows = [row for row in rows if row["response"] in complete]
    summary = summarise_split(rows)
    print(f"\nper response (sums over its steps; {summary['responses']} responses whose every state was checked), nats:")
    for key in SPLIT_KEYS:
        mean, se = summary[key]
        print(f"  {key:13s} {mean:8.4f} ± {se if se is not None else float('nan'):.4f}")
    report = {
        "overrides": BASE + list(args.overrides),
        "states": len(rows),
        "skipped_states": skipped,
        "responses": summary["responses"],
        "rollouts_per_candidate": args.rollouts,
        "decoder_rollouts": GROUP,
        "draws_per_state": args.rollouts // GROUP,
        "per_response": {key: {"mean": m, "stderr": se} for key, (m, se) in ((k, summary[k]) for k in SPLIT_KEYS)},
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "kl_split: recorded = E_draws KL(p || pi_sft), real = KL(p_bar || pi_sft), target = KL(p* || pi_sft) "
        "with p* from all rollouts; jensen_gap = recorded - real; distortion = real - target; moved = KL(p_bar || p*); "
        "predicted_gap: premise.predicted_jensen_gap of each 16-rollout draw (delta method), mean over the draws",
    }
    seed = int(cfg.synthetic.seed)
    out = Path(args.out) if args.out else ROOT / "docs" / "bench" / f"soft_ground_truth_seed{seed}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    if args.sweep:
        (Path(args.sweep) / "ground_truth").mkdir(parents=True, exist_ok=True)
        (Path(args.sweep) / "ground_truth" / f"seed{seed}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} ({report['seconds']:.0f} s; {skipped} states skipped)")


if __name__ == "__main__":
    main()
