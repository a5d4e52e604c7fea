"""Rows of prompts from hub datasets and local files, all through `datasets`, so both share one path.

A dataset config names where the rows are (`path`: a hub id, a local folder or a .jsonl/.json/.csv/
.parquet file, or `packaged:<file>` for a file tqstar ships), which column holds the prompt and how
to turn it into an HH-format prompt (`format`):

- `raw`: the column is the prompt as is (Dahoas/full-hh-rlhf `prompt`, Nectar `prompt`);
- `hh`: a bare instruction, wrapped as '\\n\\nHuman: {x}\\n\\nAssistant:' (UltraFeedback
  `instruction`); text already in HH format is kept as is;
- `dialogue`: a whole HH conversation with its answer (Anthropic/hh-rlhf `chosen`): the prompt is
  the text up to and including its last '\\n\\nAssistant:'.

Each prompt gets a stable id: the dataset's own id column when `id_column` is set, else a hash of
the prompt text (a repeated prompt gets '-2', '-3', ... in dataset order), so ids do not depend on
limit, offset, shuffle or shard.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import ConfigError, check_choice, did_you_mean
from ..hub import hub_offline
from .hh import prompt_of_dialogue, wrap

FORMATS = ("raw", "hh", "dialogue")
PACKAGED_DIR = Path(__file__).resolve().parent
# How a local file is read (datasets builder per suffix).
FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".csv.gz": "csv",
}
DOWNLOAD_HINT = (
    "download it on a machine with network (huggingface-cli download {id} --repo-type dataset --local-dir DIR, "
    "or datasets' save_to_disk), copy DIR here and set dataset.path=DIR"
)


def _builder_for(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(FILE_BUILDERS, key=len, reverse=True):
        if name.endswith(suffix):
            return FILE_BUILDERS[suffix]
    return None


def resolve_path(raw) -> tuple[str, str]:
    """(location, kind) for `dataset.path`; kind is 'file', 'folder' or 'hub'."""
    text = str(raw)
    if text.startswith("packaged:"):
        path = PACKAGED_DIR / text.split(":", 1)[1]
        if not path.is_file():
            shipped = sorted(f"packaged:{p.name}" for p in PACKAGED_DIR.glob("*.jsonl"))
            raise ConfigError(f"dataset.path={text!r} is not a file tqstar ships; allowed: {', '.join(shipped)}")
        return str(path), "file"
    path = Path(text).expanduser()
    if path.is_file():
        if _builder_for(path) is None:
            raise ConfigError(
                f"dataset.path={text!r} is not allowed: a .jsonl, .json, .csv or .parquet file (optionally .gz), a folder, or a hub id"
            )
        return str(path), "file"
    if path.is_dir():
        return str(path), "folder"
    if text.startswith((".", "/", "~")) or _builder_for(path) is not None or text.count("/") > 1:
        raise ConfigError(f"dataset.path={text!r}: path does not exist (no such file or folder)")
    return text, "hub"


def _missing(cfg, key: str) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, key)


def parse_shard(shard: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise ConfigError(f"dataset.shard={shard!r} is not allowed: must be 'i/n' with 0 <= i < n") from None
    if not 0 <= index < count:
        raise ConfigError(f"dataset.shard={shard!r} is not allowed: must be 'i/n' with 0 <= i < n")
    return index, count


def _count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def validate_dataset(dataset_cfg) -> None:
    """The values of a dataset config, refused by a ConfigError naming the key (config.validate; `check_dataset_config`
    adds the paths). Any `name` is allowed: the dataset of a testbed (`tqstar.testbeds`) is named like it and reads
    its build's prompts; any other reads `path` with `prompt_column` and `format` (FORMATS), with no code."""
    from ..testbeds import names

    name = str(dataset_cfg.get("name"))
    testbed = name in names()
    if not testbed and "path" not in dataset_cfg.keys():  # (a path still to be given, `???`, is not in `dataset_cfg`)
        raise ConfigError(
            f"dataset.name={name!r} is not allowed without a dataset.path: only a testbed's dataset reads its build's prompts; "
            f"{did_you_mean(name, names())}"
        )
    limit = dataset_cfg.get("limit")
    if not (limit is None or _count(limit, 1)):
        raise ConfigError(f"dataset.limit={limit!r} is not allowed: null or an integer >= 1")
    offset = dataset_cfg.get("offset", 0)
    if not _count(offset, 0):
        raise ConfigError(f"dataset.offset={offset!r} is not allowed: must be an integer >= 0")
    shard = dataset_cfg.get("shard")
    if shard is not None:
        parse_shard(str(shard))
    maximum = dataset_cfg.get("max_prompt_tokens")
    if not (maximum is None or _count(maximum, 1)):
        raise ConfigError(f"dataset.max_prompt_tokens={maximum!r} is not allowed: null or an integer >= 1")
    if testbed:
        return
    check_choice("dataset.format", dataset_cfg.get("format", "raw"), FORMATS)
    column = dataset_cfg.get("prompt_column")
    if not isinstance(column, str) or not column:
        raise ConfigError(f"dataset.prompt_column={column!r} is not allowed: the name of the column that holds the prompt")


def check_dataset_config(dataset_cfg) -> None:
    """The cheap checks (values, paths) that can fail before any model loads."""
    validate_dataset(dataset_cfg)
    name = str(dataset_cfg.get("name"))
    path = dataset_cfg.get("path") if "path" in dataset_cfg and not _missing(dataset_cfg, "path") else None
    if path is None:
        raise ConfigError("dataset.path must be given: a hub id, a local folder, or a .jsonl/.json/.csv/.parquet file")
    if not path:
        raise ConfigError(f"dataset.path={path!r} is not allowed: a hub id, a local folder, or a .jsonl/.json/.csv/.parquet file")
    _, kind = resolve_path(path)
    if name == "local" and kind == "hub":
        raise ConfigError(f"dataset.path={str(path)!r}: path does not exist (dataset=local reads a local file or folder)")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _diagnose_file(path: Path, builder: str) -> str | None:
    """Why a local file failed to load, with the line number where possible."""
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    if builder == "parquet":
        return None
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (
                    f"{path}: line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                    "re-save the file as UTF-8"
                )
            if builder == "json" and path.name.lower().endswith((".jsonl", ".jsonl.gz")) and line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{path}: line {number} is not valid JSON ({exc.msg} at column {exc.colno})"
                if not isinstance(value, dict):
                    return f"{path}: line {number} is a JSON {type(value).__name__}, not an object of columns"
    return None


def _is_blank(path: Path) -> bool:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return not handle.read(1 << 16).strip() and not handle.read(1)


def _load_file(path: Path):
    import datasets

    builder = _builder_for(path)
    if builder != "parquet" and _is_blank(path):
        return datasets.Dataset.from_dict({})  # an empty file is an empty table, reported as "no prompts"
    logging = datasets.utils.logging
    enabled, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    # Quiet: a bad file becomes one ConfigError line below, not datasets' own log lines as well.
    logging.disable_progress_bar()
    logging.set_verbosity(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - diagnosed into one line below
        reason = _diagnose_file(path, builder)
        raise ConfigError(reason or f"{path}: cannot read it as {builder} ({type(exc).__name__}: {_first_line(exc)})") from exc
    finally:
        logging.set_verbosity(verbosity)
        if enabled:
            logging.enable_progress_bar()


def _pick_split(loaded, split: str, where: str):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(f"dataset.split={split!r} is not in {where}; it has: {', '.join(loaded)}")
        return loaded[split]
    return loaded


def _load_table(dataset_cfg):
    """(datasets.Dataset, source description)."""
    import datasets

    location, kind = resolve_path(dataset_cfg.path)
    split = str(dataset_cfg.get("split") or "train")
    data_dir = dataset_cfg.get("data_dir")
    if kind == "file":
        # A single file is one table: the split does not apply.
        return _load_file(Path(location)), location
    if kind == "folder":
        folder = Path(location)
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            return _pick_split(datasets.load_from_disk(location), split, location), f"{location}:{split}"
    try:
        table = datasets.load_dataset(
            location, data_dir=data_dir, split=split, revision=dataset_cfg.get("revision") if kind == "hub" else None
        )
    except ValueError as exc:
        message = _first_line(exc)
        if "split" in message.lower():
            raise ConfigError(f"dataset.split={split!r}: {message}") from exc
        raise ConfigError(f"dataset.path={location!r}: cannot load it ({message})") from exc
    except Exception as exc:  # noqa: BLE001
        if kind == "folder":
            raise ConfigError(f"dataset.path={location!r}: cannot load this folder ({type(exc).__name__}: {_first_line(exc)})") from exc
        hint = DOWNLOAD_HINT.format(id=location)
        if hub_offline() or "ConnectionError" in type(exc).__name__ or "couldn't reach" in str(exc).lower():
            reason = "this machine is offline (HF_HUB_OFFLINE=1)" if hub_offline() else "the hub cannot be reached"
            raise ConfigError(
                f"dataset.path={location!r} is not a local file or folder and {reason}, and it is not in the local cache; {hint}"
            ) from exc
        raise ConfigError(
            f"dataset.path={location!r}: cannot load it from the hub ({type(exc).__name__}: {_first_line(exc)}); {hint}"
        ) from exc
    suffix = f"/{data_dir}" if data_dir else ""
    return table, f"{location}{suffix}:{split}"


def to_prompt(value, fmt: str) -> tuple[str | None, str | None]:
    """(prompt, None) or (None, why it is skipped) for one cell of the prompt column."""
    if not isinstance(value, str):
        return None, "not_text"
    if not value.strip():
        return None, "empty"
    if fmt == "hh":
        return wrap(value), None
    if fmt == "dialogue":
        prompt = prompt_of_dialogue(value)
        return (None, "no_assistant_turn") if prompt is None else (prompt, None)
    return value, None


def text_id(text: str) -> str:
    """A stable id for a prompt without one: 12 hex digits of its SHA-1."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def load_rows(dataset_cfg) -> tuple[list[dict], str]:
    """All rows of a dataset, in its order: [{'id', 'prompt'} or {'id', 'prompt': None, 'skip': reason}]."""
    check_dataset_config(dataset_cfg)
    table, source = _load_table(dataset_cfg)
    if table.num_rows == 0:
        return [], source
    prompt_column = str(dataset_cfg.prompt_column)
    id_column = dataset_cfg.get("id_column")
    for key, column in (("prompt_column", prompt_column), ("id_column", id_column)):
        if column is not None and column not in table.column_names:
            raise ConfigError(f"dataset.{key}={column!r} is not a column of {source}; it has: {', '.join(table.column_names)}")
    fmt = str(dataset_cfg.get("format") or "raw")
    try:
        columns = table.select_columns([c for c in (prompt_column, id_column) if c is not None]).to_dict()
        prompts = columns[prompt_column]
        given_ids = columns[str(id_column)] if id_column is not None else None
    except UnicodeDecodeError as exc:
        # pyarrow reads JSON/CSV bytes without decoding them; bad bytes surface only here.
        location, kind = resolve_path(dataset_cfg.path)
        reason = _diagnose_file(Path(location), _builder_for(Path(location)) or "") if kind == "file" else None
        raise ConfigError(reason or f"{source}: text that is not UTF-8 ({exc}); re-save it as UTF-8") from None
    rows, seen = [], {}
    for index, value in enumerate(prompts):
        prompt, skip = to_prompt(value, fmt)
        if given_ids is not None and given_ids[index] is not None:
            base = str(given_ids[index])
        else:
            base = text_id(prompt if prompt is not None else f"{index}:{value!r}")
        seen[base] = seen.get(base, 0) + 1
        row_id = base if seen[base] == 1 else f"{base}-{seen[base]}"
        rows.append({"id": row_id, "prompt": prompt} if skip is None else {"id": row_id, "prompt": None, "skip": skip})
    return rows, source
