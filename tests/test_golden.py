"""The decode fingerprint as a golden test: what every method generates on tiny models, against committed hashes.

scripts/decode_fingerprint.py (the manual check of a refactor on a built synthetic task) runs here in-process
on a tiny stand-in of a task folder: SFT, a direct-transfer baseline (rho0.1) and an indirect one (rho_bl),
each a 2-layer random Llama, and 4 prompts. Every case of `decode_fingerprint.cases()` (each method of
tqstar/methods.py greedy, a sampled variant where selection applies, direct and indirect transfer, traces
where candidates are valued) decodes 8 tokens through `tqstar decode` (typer's CliRunner); its rows, cut to
what was generated (no timings), are hashed and compared with tests/data/decode_golden.json.

A deliberate change of what is generated is a deliberate change of that file:

    TQSTAR_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

rewrites it (review `git diff tests/data/decode_golden.json`, commit it with the change that explains it).

Machine independence. The models are not trained: their weights come from numpy's legacy RandomState (a
stream frozen by numpy's compatibility policy; torch's own normal_ init takes another code path on AVX2 CPUs),
so every machine loads the same bits, and the rewards (VADER, the synthetic r_bl) are plain Python. What
can still differ is float32 arithmetic: another CPU model, torch or transformers may order a matmul's or a
softmax's sums differently, which moves log-probs (rounded to 6 decimals in the rows) by an ulp and so the
hash. The golden file therefore records the setup it was made on (CPU, its torch kernel level, the torch and
transformers versions) and keeps the reduced rows beside each hash: on that setup any hash change fails; on
another, a case passes when its tokens, texts, stop reasons and other discrete fields are identical and its
numbers agree within 1e-4. A near-tie between two candidates could still flip a token there (unlikely with
4 prompts x 8 tokens on sharpened models); rerun with TQSTAR_UPDATE_GOLDEN=1 on your machine before a refactor
to compare strictly.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path

import pytest

from tqstar.methods import METHODS

from conftest import ASSISTANT, HUMAN, make_llama, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import decode_fingerprint  # noqa: E402  (scripts/ is no package; the test and the script share one fingerprint)

GOLDEN = Path(__file__).parent / "data" / "decode_golden.json"
UPDATE = "TQSTAR_UPDATE_GOLDEN"
REGENERATE = f"{UPDATE}=1 .venv/bin/python -m pytest tests/test_golden.py"
LIMIT, TOKENS = 4, 8
EXTRA: tuple[str, ...] = ()  # decoder knobs beyond the fingerprint's own (its defaults: top_k 10, rollouts of 20 tokens)
ATOL = 1e-4  # numbers on a setup other than the recorded one
PROMPTS = [
    f"{HUMAN} the movie was good{ASSISTANT}",
    f"{HUMAN} the hotel and the service{ASSISTANT}",
    f"{HUMAN} it was a sad day{ASSISTANT}",
    f"{HUMAN} the food at first{ASSISTANT} it was fine{HUMAN} and then ?{ASSISTANT}",
]
MODELS = {"sft": 1, "rho0.1": 2, "rho_bl": 3}  # folder -> seed, as a synthetic task lays them out


def environment() -> dict:
    """What float32 results depend on besides the code: the CPU and its kernel level, torch and transformers."""
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A task folder as decode_fingerprint.py reads one: tiny random Llamas with portable weights, prompts/test.jsonl."""
    root = tmp_path_factory.mktemp("golden-task")
    tokenizer = make_tokenizer()
    for name, seed in MODELS.items():
        make_llama(tokenizer, seed=seed, portable=True).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "prompts").mkdir()
    (root / "prompts" / "test.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    return root


def in_process(overrides: list[str]) -> None:
    from typer.testing import CliRunner

    from tqstar.cli import app

    result = CliRunner().invoke(app, ["decode", *overrides])
    if result.exit_code != 0:
        raise AssertionError(f"tqstar decode {' '.join(overrides)} exited {result.exit_code}:\n{result.output}") from result.exception


def differences(old, new, path: str = "") -> list[tuple[str, object, object, float | None]]:
    """Where two JSON values differ: (path, old, new, |difference| for two numbers else None)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in differences(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{path}.{k}")]
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [(f"{path} (length)", len(old), len(new), None)]
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{path}[{i}]")]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
    if numbers and (isinstance(old, float) or isinstance(new, float)):
        if old == new or (math.isnan(old) and math.isnan(new)):
            return []
        return [(path, old, new, abs(old - new))]
    return [] if old == new else [(path, old, new, None)]


def describe(diffs) -> str:
    discrete = [d for d in diffs if d[3] is None]
    if discrete:
        path, old, new, _ = discrete[0]
        more = f" (and {len(discrete) - 1} more)" if len(discrete) > 1 else ""
        return f"generated something else: rows{path}: {old!r} -> {new!r}{more}"
    path, old, new, delta = max(diffs, key=lambda d: d[3])
    return f"same tokens, numbers moved: {len(diffs)} values, largest |change| {delta:.2g} at rows{path} ({old!r} -> {new!r})"


def write_golden(results: dict) -> None:
    """The golden file, one generated row a line (readable diffs)."""
    rows = {}
    doc = {
        "about": f"tests/test_golden.py: what every decoding method generates on tiny models. Regenerate: {REGENERATE}",
        "recorded_on": environment(),
        "settings": {"limit": LIMIT, "tokens": TOKENS, "extra": list(EXTRA), "prompts": PROMPTS, "models": MODELS},
        "cases": {},
    }
    for name, result in results.items():
        doc["cases"][name] = {k: v for k, v in result.items() if k != "generations"}
        doc["cases"][name]["generations"] = [f"@@{name}:{i}@@" for i in range(len(result["generations"]))]
        rows.update({f'"@@{name}:{i}@@"': json.dumps(row, sort_keys=True) for i, row in enumerate(result["generations"])})
    text = json.dumps(doc, indent=2)
    for marker, row in rows.items():
        text = text.replace(marker, row)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(text + "\n", encoding="utf-8")


def test_the_fingerprint_covers_every_method_of_the_registry():
    cases = decode_fingerprint.cases()
    decoded = {o.split("=", 1)[1] for overrides in cases.values() for o in overrides if o.startswith("decoder=")}
    assert decoded == set(METHODS)
    for name, spec in METHODS.items():
        assert name in cases
        if not spec.sampled:
            assert "decoder.selection=sample" in cases[f"{name}_sample"]
        if spec.needs_baseline_reward("indirect"):
            assert "decoder.transfer=indirect" in cases[f"{name}_indirect"]
    assert any("decoder.trace=true" in overrides for overrides in cases.values())


def test_every_method_generates_what_the_golden_file_says(task_dir, tmp_path):
    from tqstar import models

    models.clear_cache()
    try:
        results = decode_fingerprint.fingerprint(task_dir, tmp_path, LIMIT, TOKENS, in_process, extra=EXTRA, keep_rows=True, quiet=True)
    finally:
        models.clear_cache()
    if os.environ.get(UPDATE):
        write_golden(results)
        pytest.skip(f"{UPDATE} is set: rewrote {GOLDEN.relative_to(ROOT)}; review its diff and commit it")
    assert GOLDEN.exists(), f"no golden file {GOLDEN}; make it with: {REGENERATE}"
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    settings = {"limit": LIMIT, "tokens": TOKENS, "extra": list(EXTRA), "prompts": PROMPTS, "models": MODELS}
    assert golden["settings"] == settings, f"the golden test's settings changed since {GOLDEN.name} was made; regenerate: {REGENERATE}"
    strict = golden["recorded_on"] == environment()
    before = golden["cases"]
    differ, gone, new = decode_fingerprint.differences(before, results)
    problems = [f"{name}: in the golden file but no longer decoded" for name in gone]
    problems += [f"{name}: a new case, not in the golden file" for name in new]
    for name in differ:
        diffs = differences(before[name]["generations"], results[name]["generations"])
        if strict or not diffs or any(d[3] is None or d[3] > ATOL for d in diffs):
            problems.append(f"{name}: {describe(diffs) if diffs else 'hash differs'}")
    if problems:
        where = "" if strict else f" (recorded on {golden['recorded_on']}, this is {environment()}: numbers compared within {ATOL})"
        pytest.fail(
            f"decoding changed what it generates{where}:\n  "
            + "\n  ".join(problems)
            + f"\nIf the change is deliberate, regenerate the golden file and commit it: {REGENERATE}",
            pytrace=False,
        )
