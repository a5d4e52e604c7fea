#!/usr/bin/env bash
# GPU smoke check, about 5 minutes once set up: TQ* on the synthetic task and on SmolLM2-135M-Instruct
# (the smollm2_offline preset's settings on the packaged GGUF) on CUDA in bfloat16. Prints tokens/s and peak GPU memory per check and
# writes them, with the run folders, under $OUT (or outputs/gpu_smoke).
#
#   scripts/gpu_smoke.sh          # on a GPU box (sets up .venv with `make setup` when it is missing)
#   scripts/gpu_smoke.sh --dry    # on any machine, no decode, under a minute (make test-slow runs it): every check's
#                                 # overrides compose and validate (`tqstar decode ... --show-config`) and plan
#                                 # (`tqstar plan ...`), as the GPU box would run them and with device=cpu, tiny sizes
#   scripts/gpu_smoke.sh --cpu    # the same decodes on the CPU with tiny sizes (minutes): checks the decode path
#
# Knobs (environment): SMOKE_DEVICE (cuda), SMOKE_DTYPE (bfloat16), SMOKE_LIMIT (prompts, 16),
# SMOKE_SECONDS (time limit per check, 130), SMOKE_CHECKS ("synthetic_tqstar smollm2_offline"),
# TQSTAR_CACHE (where the synthetic task is built or found; on the GPU box default ./.cache/tqstar,
# a git-ignored folder that can travel with the working tree).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${SMOKE_DEVICE:-cuda}
DTYPE=${SMOKE_DTYPE:-bfloat16}
LIMIT=${SMOKE_LIMIT:-16}
SECONDS_PER_CHECK=${SMOKE_SECONDS:-130}
EXTRA=()
DRY=0
case "${1:-}" in
  "") ;;
  --dry) DRY=1 ;;
  --cpu)
    DEVICE=cpu DTYPE=float32 LIMIT=1 SECONDS_PER_CHECK=${SMOKE_SECONDS:-240}
    EXTRA=(decoder.max_new_tokens=4 decoder.rollout.max_new_tokens=2 decoder.top_k=3) ;;
  *) echo "usage: scripts/gpu_smoke.sh [--dry | --cpu]" >&2; exit 2 ;;
esac
RESULTS=${OUT:-outputs/gpu_smoke}
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
[ "$DEVICE" != cpu ] && export TQSTAR_CACHE=${TQSTAR_CACHE:-$PWD/.cache/tqstar}
CHECKS=${SMOKE_CHECKS:-synthetic_tqstar smollm2_offline}

# --- the checks' overrides, as the GPU box runs them (dry: also with device=cpu and tiny sizes)
check_overrides() {
  case $1 in
    synthetic_tqstar) echo "decoder=tqstar" ;;
    # the packaged GGUF as SFT and baseline: the preset's built DPO baseline would take half an hour to build first
    smollm2_offline) echo "experiment=smollm2_offline sft=smollm2 baseline=smollm2 dataset=hh_sample" ;;
    *) return 1 ;;
  esac
}

if [ $DRY -eq 1 ]; then
  PY=.venv/bin/python
  "$PY" -c "import tqstar" 2>/dev/null || PY=python3
  started=$(date +%s)
  CHECK_LINES=()
  for name in $CHECKS; do
    overrides=$(check_overrides "$name") || { echo "unknown check '$name'; allowed: synthetic_tqstar smollm2_offline" >&2; exit 1; }
    CHECK_LINES+=("$name $overrides device=$DEVICE sft.dtype=$DTYPE baseline.dtype=$DTYPE dataset.limit=$LIMIT output_dir=$RESULTS/runs")
    CHECK_LINES+=("$name-cpu $overrides device=cpu sft.dtype=float32 baseline.dtype=float32 dataset.limit=1 output_dir=$RESULTS/runs decoder.max_new_tokens=4 decoder.rollout.max_new_tokens=2 decoder.top_k=3")
  done
  # One process for every command (each through the CLI, as typed): composing, validating and planning take seconds.
  SMOKE_LINES=$(printf '%s\n' "${CHECK_LINES[@]}") "$PY" - <<'PYTHON'
import os
import sys

from typer.testing import CliRunner

from tqstar.cli import app

failed = 0
for line in os.environ["SMOKE_LINES"].splitlines():
    name, *overrides = line.split()
    memory = ["--memory", "cuda=24GB"]  # the smallest GPU the smoke checks are meant for
    for command in (["decode", *overrides, "--show-config"], ["plan", *overrides, *memory]):
        result = CliRunner().invoke(app, command)
        # the plan may refuse (exit 2, one line) on a device that is too small: that is a verdict, not a broken command
        ok = result.exit_code == 0 or (command[0] == "plan" and "will run out of memory" in (result.stderr or ""))
        peak = [l for l in result.output.splitlines() if "FLOPs per response" in l]
        print(f"  {'ok ' if ok else 'BAD'} {name}: tqstar {command[0]} ({result.exit_code}) {peak[0].strip() if peak else ''}")
        if not ok:
            failed = 1
            print(result.output[-2000:], result.stderr[-2000:] if result.stderr else "", sep="\n")
sys.exit(failed)
PYTHON
  rc=$?
  echo "dry run: $([ $rc -eq 0 ] && echo ok || echo FAILED) in $(( $(date +%s) - started )) s (no decode; scripts/gpu_smoke.sh --cpu decodes on the CPU)"
  exit $rc
fi

# --- a Python with tqstar: the repo's .venv, else `make setup`, else a system Python that has the deps.
PY=.venv/bin/python
if ! "$PY" -c "import torch, transformers, tqstar" 2>/dev/null; then
  echo "== setting up .venv (make setup)"
  if ! make setup; then
    if python3 -c "import torch, transformers, hydra, typer, datasets, vaderSentiment" 2>/dev/null; then
      echo "   make setup failed; using $(command -v python3) with PYTHONPATH=$PWD"
      PY=python3
      export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    else
      echo "error: no Python with torch and transformers, and make setup failed (no network?)" >&2
      exit 1
    fi
  fi
fi

{
  echo "date: $(date -u +%FT%TZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('transformers', transformers.__version__)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} | tee "$RESULTS/environment.txt"
if [ "$DEVICE" != cpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: device=$DEVICE but torch sees no CUDA GPU (use --dry on a CPU machine)" >&2
  exit 1
fi

# --- one check: decode in-process, then report throughput and peak GPU memory as one JSON line.
check() {
  local name=$1; shift
  echo "== $name"
  timeout "$SECONDS_PER_CHECK" "$PY" - "$name" "$RESULTS" "$@" <<'PYTHON'
import json, sys, time

import torch

from tqstar.config import compose, validate
from tqstar.decode import run_decode

name, results, *overrides = sys.argv[1:]
cfg = validate(compose(overrides))
gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
for index in range(gpus):
    torch.cuda.reset_peak_memory_stats(index)
started = time.perf_counter()
result = run_decode(cfg)
wall = time.perf_counter() - started
status = json.loads((result.run.path / "run.json").read_text())
counters = status.get("counters") or {}
decode_seconds = sum(row["seconds"] for row in result.rows) or float("nan")
tokens = sum(row["num_tokens"] for row in result.rows)
rewards = [row["reward"] for row in result.rows]
report = {
    "check": name, "device": status.get("device"), "dtype": str(cfg.sft.dtype), "prompts": len(result.rows),
    "response_tokens": tokens, "decode_seconds": round(decode_seconds, 2), "load_and_decode_seconds": round(wall, 2),
    "tokens_per_s": round(tokens / decode_seconds, 2),
    "rollout_tokens_per_s": round(counters.get("rollout_tokens", 0) / decode_seconds, 1),
    "peak_gpu_memory_gib": [round(torch.cuda.max_memory_allocated(i) / 2**30, 3) for i in range(gpus)],
    "mean_reward": round(sum(rewards) / len(rewards), 4), "counters": counters, "run": str(result.run.path),
}
print(f"{name}: {report['prompts']} prompts, {report['tokens_per_s']} tokens/s "
      f"({report['rollout_tokens_per_s']} rollout tokens/s), peak GPU memory {report['peak_gpu_memory_gib']} GiB, "
      f"{report['load_and_decode_seconds']} s with loading, mean reward {report['mean_reward']}")
with open(f"{results}/gpu_smoke.jsonl", "a") as handle:
    handle.write(json.dumps(report) + "\n")
PYTHON
  local rc=$?
  [ $rc -eq 124 ] && echo "   $name: timed out after ${SECONDS_PER_CHECK}s"
  [ $rc -ne 0 ] && echo "{\"check\": \"$name\", \"rc\": $rc}" >> "$RESULTS/gpu_smoke.jsonl"
  return $rc
}

COMMON=(device="$DEVICE" sft.dtype="$DTYPE" baseline.dtype="$DTYPE" dataset.limit="$LIMIT" output_dir="$RESULTS/runs")
failed=0
# The synthetic task builds itself on first use (cached in TQSTAR_CACHE); that counts against its time limit.
for name in $CHECKS; do
  if ! overrides=$(check_overrides "$name"); then
    echo "unknown check '$name'; allowed: synthetic_tqstar smollm2_offline" >&2; failed=1; continue
  fi
  # shellcheck disable=SC2086 # the overrides are words
  # the plan first (printed and saved beside the measurements: planned vs measured peak memory)
  "$PY" -m tqstar.cli plan $overrides "${COMMON[@]}" "${EXTRA[@]}" --json "$RESULTS/plan_$name.json" || echo "   $name: the plan refuses (above); decoding anyway"
  # shellcheck disable=SC2086
  check "$name" $overrides "${COMMON[@]}" "${EXTRA[@]}" || failed=1
done
echo "results: $RESULTS/gpu_smoke.jsonl"
exit $failed
