#!/usr/bin/env bash
# GPU smoke check: about 8 minutes on one GPU (sized for an H200; nothing is downloaded). Each check is one function of
# scripts/gpu_smoke_checks.py, run in its own process under a time limit; a check that fails, raises or times out is
# recorded as failed and the next one runs. In order:
#   oracle                  the engine against the reference oracle on CUDA in float32 and bfloat16, the same models and
#                           dtype: tiny random Llama and GPT-NeoX (24 prompts, k=4, 10 tokens, L=4) and SmolLM2-135M (the
#                           packaged GGUF; 3 prompts, 8 tokens), methods sft and tqstar; prompts that differ and at which
#                           step (float32 must be equal; a bfloat16 near-tie may flip a greedy argmax)
#   pythia_shaped           an hh_pythia-shaped TQ* run (k=10, L=20, the preset's decoder and reward settings) on random
#                           models of Pythia-6.9B's configuration made on the GPU in SMOKE_DTYPE (SFT, baseline and a
#                           Pythia-6.9B classifier reward, as the preset's): 8 prompts of 512 random token ids, 16 tokens;
#                           peak memory measured (torch.cuda.max_memory_allocated) vs `tqstar plan`'s, tokens/s
#   shared_prefix           decoder.shared_prefix=true vs false, SmolLM2, 8 prompts of ~600 tokens, k=10, L=20: wall time,
#                           peak memory, tokens equal
#   bench_ratio             scripts/bench_decode.py on SmolLM2 (float32, 4 prompts in a batch, 16 tokens): reference/engine
#   decode_smollm2_offline  `tqstar decode experiment=smollm2_offline sft=smollm2 baseline=smollm2 dataset=hh_sample`
#                           in-process: tokens/s, peak memory measured vs planned
#   decode_synthetic_tqstar `tqstar decode decoder=tqstar` on the synthetic task when TQSTAR_CACHE holds its build
#                           (else skipped: building it takes about half an hour)
# Writes under $OUT (or outputs/gpu_smoke): gpu_smoke.json (one JSON: environment, ok, every check's record: name,
# device, dtype, sizes, seconds, status, error, results), gpu_smoke.md (a table, one row a check), checks/<name>.json
# (each record as it was saved), environment.txt, runs/ (the decode checks' run folders), bench_ratio.json.
# Exit status 0 when no check failed (a skipped check is no failure).
#
#   scripts/gpu_smoke.sh          # on a GPU box (sets up .venv with `make setup` when it is missing)
#   scripts/gpu_smoke.sh --dry    # on any machine, the CPU, about a minute (make test-slow runs it): the same checks
#                                 # through the same functions at tiny sizes (tiny GPT-NeoX in place of Pythia-6.9B, 1-2
#                                 # prompts, a few tokens, one torch thread), writing the same JSON and table ("dry":
#                                 # true), after `cli`: every decode check's overrides compose and validate (`tqstar
#                                 # decode ... --show-config`) and plan (`tqstar plan ...`), at the GPU's and the tiny sizes
#   scripts/gpu_smoke.sh --cpu    # the same as --dry
#
# Knobs (environment): SMOKE_CHECKS (which checks, in order), SMOKE_DTYPE (bfloat16: the half dtype of pythia_shaped,
# shared_prefix and the decode checks; oracle runs float32 and bfloat16, and this too), SMOKE_LIMIT (prompts of the decode
# checks, 8), SMOKE_SECONDS (one time limit for every check instead of each its own), SMOKE_BUDGET (seconds for all the
# checks, 450 on the GPU: a check that would start with less than 20 s left is skipped, and none runs past it),
# TQSTAR_CACHE (where the synthetic task is found; on the GPU box default ./.cache/tqstar, a git-ignored folder that
# can travel with the working tree).
set -uo pipefail
cd "$(dirname "$0")/.."

PROFILE=gpu
case "${1:-}" in
  "") ;;
  --dry | --cpu) PROFILE=dry ;;
  *) echo "usage: scripts/gpu_smoke.sh [--dry]" >&2; exit 2 ;;
esac
RESULTS=${OUT:-outputs/gpu_smoke}
mkdir -p "$RESULTS"
rm -rf "$RESULTS/checks" "$RESULTS/gpu_smoke.json" "$RESULTS/gpu_smoke.md"
mkdir -p "$RESULTS/checks"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export SMOKE_GIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

# Each check's time limit (seconds) and the budget of them all.
declare -A LIMITS
if [ "$PROFILE" = dry ]; then
  CHECKS=${SMOKE_CHECKS:-cli oracle pythia_shaped shared_prefix bench_ratio decode_smollm2_offline decode_synthetic_tqstar}
  LIMITS=([cli]=90 [oracle]=60 [pythia_shaped]=60 [shared_prefix]=60 [bench_ratio]=60 [decode_smollm2_offline]=90 [decode_synthetic_tqstar]=60)
  BUDGET=${SMOKE_BUDGET:-300}
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  PY=.venv/bin/python
  "$PY" -c "import tqstar" 2>/dev/null || PY=python3
else
  CHECKS=${SMOKE_CHECKS:-oracle pythia_shaped shared_prefix bench_ratio decode_smollm2_offline decode_synthetic_tqstar}
  LIMITS=([oracle]=90 [pythia_shaped]=120 [shared_prefix]=60 [bench_ratio]=70 [decode_smollm2_offline]=70 [decode_synthetic_tqstar]=60)
  BUDGET=${SMOKE_BUDGET:-450}
  export TQSTAR_CACHE=${TQSTAR_CACHE:-$PWD/.cache/tqstar}
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
    echo "git: $SMOKE_GIT"
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('transformers', transformers.__version__)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  } | tee "$RESULTS/environment.txt"
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: torch sees no CUDA GPU (use --dry on a CPU machine)" >&2
    exit 1
  fi
fi

started=$(date +%s)
for name in $CHECKS; do
  limit=${SMOKE_SECONDS:-${LIMITS[$name]:-60}}
  left=$((BUDGET - ($(date +%s) - started)))
  if [ "$left" -lt 20 ]; then
    printf 'skipped\nout of the time budget (SMOKE_BUDGET=%s s)\n' "$BUDGET" > "$RESULTS/checks/$name.rc"
    echo "== $name: skipped, out of the time budget"
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout -k 10 "$limit" "$PY" scripts/gpu_smoke_checks.py run --profile "$PROFILE" --out "$RESULTS" "$name"
  rc=$?
  printf '%s\n%s\n' "$rc" "$limit" > "$RESULTS/checks/$name.rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "   $name: timed out after ${limit} s"
done

"$PY" scripts/gpu_smoke_checks.py report --profile "$PROFILE" --out "$RESULTS" --checks "$CHECKS" --started "$started"
rc=$?
echo "gpu smoke ($PROFILE): $([ $rc -eq 0 ] && echo ok || echo FAILED) in $(($(date +%s) - started)) s; results: $RESULTS/gpu_smoke.json, $RESULTS/gpu_smoke.md"
exit $rc
