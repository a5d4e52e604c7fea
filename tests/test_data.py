"""Prompt sets: fixtures shaped like each hub dataset, written as local files, loaded through each config."""

from __future__ import annotations

import json

import pytest

from tqstar.config import ConfigError, compose, validate
from tqstar.data import load_prompts
from tqstar.data.hh import to_messages as hh_to_messages
from tqstar.data.sources import text_id
from tqstar.decode import check_sources

H, A = "\n\nHuman:", "\n\nAssistant:"

# Anthropic/hh-rlhf rows: whole conversations; the prompt ends at the last "\n\nAssistant:".
HH_ROWS = [
    {"chosen": f"{H} Is the food good?{A} It is great.", "rejected": f"{H} Is the food good?{A} No."},
    {"chosen": f"{H} Hi{A} Hello!{H} How was the movie?{A} I loved it.", "rejected": f"{H} Hi{A} Hello!{H} How was the movie?{A} Bad."},
    {"chosen": "no turns at all", "rejected": "still none"},
]
HH_PROMPTS = [f"{H} Is the food good?{A}", f"{H} Hi{A} Hello!{H} How was the movie?{A}"]


def cfg_for(tmp_path, *overrides):
    """The dataset config after every check that runs before models load (values, then paths)."""
    cfg = validate(compose(["device=cpu", f"output_dir={tmp_path / 'out'}", *overrides]))
    check_sources(cfg)
    return cfg.dataset


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path)
    return path


def texts(prompt_set):
    return [p.text for p in prompt_set.prompts]


def test_hh_rlhf_cuts_each_conversation_after_its_last_assistant_turn(tmp_path, hydra_clean):
    path = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    prompt_set = load_prompts(cfg_for(tmp_path, "dataset=hh_rlhf", f"dataset.path={path}"))
    assert texts(prompt_set) == HH_PROMPTS
    assert prompt_set.skipped == {"no_assistant_turn": 1}
    assert [p.id for p in prompt_set.prompts] == [text_id(t) for t in HH_PROMPTS]


def test_hh_rlhf_folder_with_split_files_honours_the_split(tmp_path, hydra_clean):
    folder = tmp_path / "hh-rlhf"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", HH_ROWS[:1])
    write_jsonl(folder / "test.jsonl", HH_ROWS[1:2])
    assert texts(load_prompts(cfg_for(tmp_path, "dataset=hh_rlhf", f"dataset.path={folder}"))) == HH_PROMPTS[1:]
    assert texts(load_prompts(cfg_for(tmp_path, "dataset=hh_rlhf", f"dataset.path={folder}", "dataset.split=train"))) == HH_PROMPTS[:1]
    with pytest.raises(ConfigError, match="dataset.split='validation'"):
        load_prompts(cfg_for(tmp_path, "dataset=hh_rlhf", f"dataset.path={folder}", "dataset.split=validation"))


def test_save_to_disk_folder_loads(tmp_path, hydra_clean):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": HH_PROMPTS[0], "response": " x"}])}).save_to_disk(str(folder))
    assert texts(load_prompts(cfg_for(tmp_path, "dataset=full_hh_rlhf", f"dataset.path={folder}"))) == HH_PROMPTS[:1]


def test_full_hh_rlhf_parquet(tmp_path, hydra_clean):
    rows = [{"prompt": p, "response": " ok", "chosen": " ok", "rejected": " no"} for p in HH_PROMPTS]
    path = write_parquet(tmp_path / "test-00000-of-00001.parquet", rows)
    assert texts(load_prompts(cfg_for(tmp_path, "dataset=full_hh_rlhf", f"dataset.path={path}"))) == HH_PROMPTS


def test_ultrafeedback_wraps_bare_instructions(tmp_path, hydra_clean):
    rows = [
        {"source": "evol", "instruction": "  Write a poem about tea. ", "models": ["a"], "completions": [{"response": "x"}]},
        {"source": "sharegpt", "instruction": "Name three rivers.", "models": ["b"], "completions": [{"response": "y"}]},
    ]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    prompts = texts(load_prompts(cfg_for(tmp_path, "dataset=ultrafeedback", f"dataset.path={path}")))
    assert prompts == [f"{H} Write a poem about tea.{A}", f"{H} Name three rivers.{A}"]


def test_nectar_prompts_are_kept_as_they_are(tmp_path, hydra_clean):
    rows = [{"prompt": p, "answers": [{"answer": "a", "model": "m", "rank": 1}], "turns": 1, "num_responses": 1} for p in HH_PROMPTS]
    path = write_parquet(tmp_path / "nectar.parquet", rows)
    assert texts(load_prompts(cfg_for(tmp_path, "dataset=nectar", f"dataset.path={path}"))) == HH_PROMPTS


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_local_file_with_a_column_mapping_and_hh_format(tmp_path, hydra_clean, suffix):
    import pandas as pd

    rows = [{"qid": "q1", "question": "Is tea good?"}, {"qid": "q2", "question": "Why is the sky blue?"}]
    path = tmp_path / f"mine.{suffix}"
    frame = pd.DataFrame(rows)
    {
        "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        "csv": lambda: frame.to_csv(path, index=False),
        "parquet": lambda: frame.to_parquet(path),
    }[suffix]()
    prompt_set = load_prompts(
        cfg_for(
            tmp_path,
            "dataset=local",
            f"dataset.path={path}",
            "dataset.prompt_column=question",
            "dataset.id_column=qid",
            "dataset.format=hh",
        )
    )
    assert [(p.id, p.text) for p in prompt_set.prompts] == [("q1", f"{H} Is tea good?{A}"), ("q2", f"{H} Why is the sky blue?{A}")]
    assert prompt_set.source == str(path)


def test_ids_are_stable_under_selection_and_repeats_are_numbered(tmp_path, hydra_clean):
    rows = [{"prompt": f"{H} question {i}{A}"} for i in range(10)] + [{"prompt": f"{H} question 3{A}"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    every = load_prompts(cfg_for(tmp_path, "dataset=local", f"dataset.path={path}")).prompts
    assert len({p.id for p in every}) == 11 and every[10].id == every[3].id + "-2"
    by_id = {p.id: p.text for p in every}
    for overrides in (["dataset.offset=2", "dataset.limit=3"], ["dataset.shard=1/3"], ["dataset.shuffle=true", "dataset.shuffle_seed=7"]):
        chosen = load_prompts(cfg_for(tmp_path, "dataset=local", f"dataset.path={path}", *overrides)).prompts
        assert all(by_id[p.id] == p.text for p in chosen)
    assert [
        p.text
        for p in load_prompts(cfg_for(tmp_path, "dataset=local", f"dataset.path={path}", "dataset.offset=2", "dataset.limit=3")).prompts
    ] == [r["prompt"] for r in rows[2:5]]
    assert [p.id for p in load_prompts(cfg_for(tmp_path, "dataset=local", f"dataset.path={path}", "dataset.shard=1/3")).prompts] == [
        every[i].id for i in (1, 4, 7, 10)
    ]
    shuffled = [p.id for p in load_prompts(cfg_for(tmp_path, "dataset=local", f"dataset.path={path}", "dataset.shuffle=true")).prompts]
    assert sorted(shuffled) == sorted(by_id) and shuffled != [p.id for p in every]
    assert shuffled == [
        p.id for p in load_prompts(cfg_for(tmp_path, "dataset=local", f"dataset.path={path}", "dataset.shuffle=true")).prompts
    ]


def test_max_prompt_tokens_skips_and_counts(tmp_path, hydra_clean, tokenizer):
    rows = [{"prompt": "good " * n + "!"} for n in (2, 10, 3, 30)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    prompt_set = load_prompts(cfg_for(tmp_path, "dataset=local", f"dataset.path={path}", "dataset.max_prompt_tokens=5"), tokenizer)
    assert len(prompt_set) == 2 and prompt_set.skipped == {"too_long": 2}


def test_broken_jsonl_line_is_named(tmp_path, hydra_clean):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken.jsonl: line 3 is not valid JSON"):
        load_prompts(cfg_for(tmp_path, "dataset=local", f"dataset.path={path}"))


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_non_utf8_file_is_a_clear_error(tmp_path, hydra_clean, suffix):
    path = tmp_path / f"latin1.{suffix}"
    lines = ['{"prompt": "caf\u00e9"}\n', '{"prompt": "caf\u00e9"}\n'] if suffix == "jsonl" else ["prompt\n", "caf\u00e9\n"]
    path.write_bytes(lines[0].encode("utf-8") + lines[1].encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"latin1.{suffix}: line 2 is not UTF-8 text \(byte 0xe9 .*re-save the file as UTF-8"):
        load_prompts(cfg_for(tmp_path, "dataset=local", f"dataset.path={path}"))


def test_empty_file_has_no_prompts(tmp_path, hydra_clean):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="has no prompts to decode"):
        load_prompts(cfg_for(tmp_path, "dataset=local", f"dataset.path={path}"))


def test_missing_column_lists_the_columns_the_dataset_has(tmp_path, hydra_clean):
    path = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    with pytest.raises(ConfigError, match=r"dataset.prompt_column='prompt' is not a column of .*hh.jsonl; it has: chosen, rejected"):
        load_prompts(cfg_for(tmp_path, "dataset=full_hh_rlhf", f"dataset.path={path}"))
    with pytest.raises(ConfigError, match=r"dataset.id_column='uid' is not a column"):
        load_prompts(cfg_for(tmp_path, "dataset=hh_rlhf", f"dataset.path={path}", "dataset.id_column=uid"))


def test_bad_paths_fail_at_validation(tmp_path, hydra_clean):
    with pytest.raises(ConfigError, match="dataset.path must be given"):
        cfg_for(tmp_path, "dataset=local")
    with pytest.raises(ConfigError, match=r"dataset.path='.*missing.jsonl': path does not exist"):
        cfg_for(tmp_path, "dataset=hh_rlhf", f"dataset.path={tmp_path / 'missing.jsonl'}")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not allowed: a .jsonl, .json, .csv or .parquet file"):
        cfg_for(tmp_path, "dataset=local", f"dataset.path={tmp_path / 'notes.txt'}")
    with pytest.raises(ConfigError, match="dataset.format='markdown' is not allowed; allowed: raw, hh, dialogue"):
        cfg_for(tmp_path, "dataset=nectar", "dataset.format=markdown")


def test_hub_dataset_offline_says_how_to_use_a_local_copy(tmp_path, hydra_clean):
    with pytest.raises(
        ConfigError,
        match=r"dataset.path='Dahoas/full-hh-rlhf' is not a local file or folder and this machine is offline.*set dataset.path=DIR",
    ):
        load_prompts(cfg_for(tmp_path, "dataset=full_hh_rlhf"))


def test_packaged_hh_sample(tmp_path, hydra_clean):
    prompt_set = load_prompts(cfg_for(tmp_path, "dataset=hh_sample"))
    assert len(prompt_set) == 16 and len({p.id for p in prompt_set.prompts}) == 16
    for prompt in prompt_set.prompts:
        assert prompt.text.startswith(H) and prompt.text.endswith(A)
        messages = hh_to_messages(prompt.text)
        assert messages and messages[0]["role"] == "user" and messages[-1]["role"] == "user"
    with pytest.raises(ConfigError, match="is not a file tqstar ships; allowed: packaged:hh_prompts.jsonl"):
        cfg_for(tmp_path, "dataset=hh_sample", "dataset.path=packaged:nope.jsonl")


def test_a_new_dataset_config_needs_no_code(tmp_path, hydra_clean, monkeypatch):
    """A conf/dataset/<name>.yaml of a new name (here in a copy of conf/) with a known format composes, validates,
    passes the early checks and loads, without any code knowing its name; a name with no path must be a testbed's."""
    import shutil

    from tqstar import config

    conf = tmp_path / "conf"
    shutil.copytree(config.conf_dir(), conf)
    path = write_jsonl(tmp_path / "questions.jsonl", [{"question": "Is the food good?"}, {"question": "How was the movie?"}])
    (conf / "dataset" / "my_questions.yaml").write_text(
        f"defaults:\n  - _common\n  - _self_\n\nname: my_questions\npath: {path}\nsplit: train\nprompt_column: question\nformat: hh\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(config, "conf_dir", lambda: conf)
    config._compose_cached.cache_clear()  # composed from the real conf/ so far
    try:
        cfg = validate(compose(["dataset=my_questions", "device=cpu"]))
        check_sources(cfg)
        assert cfg.experiment_name == "my_questions"
        prompt_set = load_prompts(cfg.dataset)
        assert texts(prompt_set) == [f"{H} Is the food good?{A}", f"{H} How was the movie?{A}"]
        with pytest.raises(ConfigError, match="dataset.format='hhh' is not allowed; did you mean 'hh'"):
            validate(compose(["dataset=my_questions", "dataset.format=hhh"]))
        with pytest.raises(ConfigError, match="dataset.name='synthtic' is not allowed without a dataset.path.*did you mean 'synthetic'"):
            validate(compose(["dataset.name=synthtic"]))
    finally:
        config._compose_cached.cache_clear()
