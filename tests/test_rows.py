"""The generations.jsonl row schema (tqstar/rows.py): what decode writes, every reader parses, and old rows still read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tqstar.errors import ConfigError
from tqstar.rows import FIELDS, REQUIRED, WHEN_SET, GenerationRow

from conftest import ASSISTANT, HUMAN


def decode_rows(tmp_path, saved_models, decoder: list[str]):
    from tqstar.config import compose
    from tqstar.decode import run_decode

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"{HUMAN} {w}{ASSISTANT}"}) + "\n" for i, w in enumerate(["hotel", "the food"]))
    )
    overrides = [
        f"sft.name_or_path={saved_models['sft']}",
        f"baseline.name_or_path={saved_models['dpo']}",
        "dataset=local",
        f"dataset.path={prompts}",
        f"output_dir={tmp_path / 'out'}",
        "experiment_name=rows",
        "decoder.top_k=2",
        "decoder.max_new_tokens=3",
        "decoder.rollout.max_new_tokens=2",
        "device=cpu",
        *decoder,
    ]
    return run_decode(compose(overrides))


@pytest.mark.parametrize(
    "decoder, set_fields",
    [
        (["decoder=tqstar", "decoder.trace=true"], {"trace"}),
        (["decoder=best_of_n", "decoder.n=2"], {"best_of_n_rewards", "best_of_n_chosen"}),
    ],
    ids=["tqstar-trace", "best_of_n"],
)
def test_decode_writes_the_schema_and_every_reader_gets_it_back(decoder, set_fields, tmp_path, saved_models, hydra_clean):
    """A decoded row's keys are the schema's fields in its order (the method's own only when set); parsed and written
    back it is the same line byte for byte; evaluate reads the rows through the schema."""
    from tqstar.evaluate import load_run

    result = decode_rows(tmp_path, saved_models, decoder)
    lines = result.run.generations_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    for line, returned in zip(lines, result.rows):
        raw = json.loads(line)
        assert list(raw) == [name for name in FIELDS if name not in WHEN_SET or name in set_fields]
        row = GenerationRow.from_json(raw)
        assert row.unknown == {} and row.to_json() == raw == returned
        assert json.dumps(row.to_json(), ensure_ascii=False) == line
    run = load_run(result.run.path)
    assert all(isinstance(row, GenerationRow) for row in run.rows)
    assert [row.to_json() for row in run.rows] == sorted(result.rows, key=lambda r: r["index"])


def test_rows_of_older_versions_read_and_a_row_without_its_required_fields_is_refused():
    """A row written before `cost` (or log-probs, or index) existed reads with those fields None; a later version's
    unknown keys are kept; a row lacking prompt_id, prompt or response is a ConfigError naming where."""
    old = {"prompt_id": "a", "prompt": "x", "response": "y", "reward": 0.5, "num_tokens": 2}
    row = GenerationRow.from_json(old)
    assert (row.reward, row.num_tokens, row.cost, row.index, row.trace, row.sft_logprobs) == (0.5, 2, None, None, None, None)
    written = row.to_json()
    assert list(written) == [name for name in FIELDS if name not in WHEN_SET]  # every field but the method's own, null if unknown
    assert GenerationRow.from_json({**old, "later": [1]}).to_json() == {**written, "later": [1]}
    assert set(REQUIRED) == {"prompt_id", "prompt", "response"}
    with pytest.raises(ConfigError, match=r"run/generations.jsonl row 3 lacks prompt, response"):
        GenerationRow.from_json({"prompt_id": "a"}, where="run/generations.jsonl row 3")


def test_the_schema_is_ground_level_and_torch_free():
    """Readers import the schema without torch (or hydra): `tqstar runs` and `tqstar evaluate` stay light."""
    code = "import sys, tqstar.rows; assert not {'torch', 'omegaconf', 'tqstar.decode'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
