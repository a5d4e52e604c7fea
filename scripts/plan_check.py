"""Check `tqstar plan` against a real decode on the CPU: planned peak memory vs the measured peak RSS.

    .venv/bin/python scripts/plan_check.py            # writes docs/bench/plan_check.json
    .venv/bin/python scripts/plan_check.py --out docs/bench/plan_check_rows.json dataset.limit=16 decoder.batch_size=16 decoder.prune=false
        decoder.top_k=16 decoder.max_new_tokens=4 decoder.rollout.max_new_tokens=20 decoder.shared_prefix=false
        # more overrides (appended; on one line), another file

Runs, each in its own process: (1) the imports a decode makes, to measure the process baseline the CPU plan adds
(`tqstar.plan.PROCESS_BASELINE_BYTES`); (2) a real `tqstar decode` of SmolLM2-135M-Instruct (the packaged GGUF,
dequantised to float32: `experiment=smollm2_offline sft=smollm2 baseline=smollm2`, no build) on a few hh_sample
prompts with few tokens, reporting its own peak RSS (ru_maxrss); (3) `tqstar plan` of the same overrides (--json),
with --prompt-tokens the longest of those prompts as the SFT model sees it (formatted, tokenised).
Prints and saves both peaks and their ratio; the plan should be within 15% of the measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "experiment=smollm2_offline",
    "sft=smollm2",
    "baseline=smollm2",
    "dataset=hh_sample",
    "dataset.limit=3",
    "decoder.max_new_tokens=8",
    "decoder.rollout.max_new_tokens=4",
    "device=cpu",
    "num_threads=2",
]
# Run a command in this process and print its peak RSS (ru_maxrss, KiB on Linux) as the last line on stderr.
MEASURE = """
import resource, sys
try:
    {body}
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code or 0)
"""
IMPORTS = (
    "import torch, transformers, tqstar.cli, tqstar.decode, tqstar.models, tqstar.decoding.engine, tqstar.rewards, tqstar.data; "
    "from transformers import AutoModelForCausalLM, AutoTokenizer; import vaderSentiment.vaderSentiment"
)


def measured(body: str, env: dict) -> tuple[int, float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE.format(body=body)], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stderr[-2000:]}")
    line = [x for x in done.stderr.splitlines() if x.startswith("PEAK_RSS_KIB")][-1]
    return int(line.split()[1]) * 1024, time.perf_counter() - started, done.stdout


def prompt_tokens(overrides: list[str]) -> int:
    """The longest prompt of the decode, as the SFT model sees it (formatted, tokenised): what the plan should assume."""
    from tqstar.config import compose, validate
    from tqstar.data import load_prompts
    from tqstar.models import format_prompt, tokenizer_for

    cfg = validate(compose(overrides))
    tokenizer = tokenizer_for(cfg.sft)
    prompts = load_prompts(cfg.dataset, tokenizer).prompts
    fmt = str(cfg.sft.get("prompt_format") or "raw")
    return max(len(tokenizer(format_prompt(tokenizer, p.text, fmt))["input_ids"]) for p in prompts)


def main() -> None:
    argv = sys.argv[1:]
    out = ROOT / "docs" / "bench" / "plan_check.json"
    if argv[:1] == ["--out"]:
        out, argv = ROOT / argv[1], argv[2:]
    overrides = OVERRIDES + argv
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    with tempfile.TemporaryDirectory() as tmp:
        baseline, _, _ = measured(IMPORTS, env)
        print(f"process baseline (decode's imports, no model): {baseline / 2**20:.0f} MiB")
        args = ["decode", *overrides, f"output_dir={tmp}/runs"]
        peak, seconds, _ = measured(f"from tqstar.cli import app; app({args!r})", env)
        print(f"decode: peak RSS {peak / 2**20:.0f} MiB ({seconds:.0f} s)")
        longest = prompt_tokens(overrides)
        print(f"longest prompt: {longest} tokens (planned with --prompt-tokens {longest})")
        plan_json = Path(tmp) / "plan.json"
        done = subprocess.run(
            [sys.executable, "-m", "tqstar.cli", "plan", *overrides, "--prompt-tokens", str(longest), "--json", str(plan_json)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        print(done.stdout)
        if done.returncode != 0:
            sys.exit(f"plan failed: {done.stderr}")
        plan = json.loads(plan_json.read_text())
    cpu = next(d for d in plan["devices"] if d["device"] == "cpu")
    ratio = cpu["peak_bytes"] / peak
    report = {
        "overrides": overrides,
        "planned_peak_mib": round(cpu["peak_bytes"] / 2**20, 1),
        "measured_peak_rss_mib": round(peak / 2**20, 1),
        "ratio_planned_over_measured": round(ratio, 3),
        "within_15_percent": abs(ratio - 1) <= 0.15,
        "measured_process_baseline_mib": round(baseline / 2**20, 1),
        "prompt_tokens": longest,
        "planned_items_mib": {what: round(amount / 2**20, 1) for what, amount in cpu["items"].items()},
        "decode_seconds": round(seconds, 1),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"planned {report['planned_peak_mib']} MiB, measured {report['measured_peak_rss_mib']} MiB, ratio {ratio:.3f}; wrote {out}")


if __name__ == "__main__":
    main()
