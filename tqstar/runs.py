"""Versioned run folders: `<output_dir>/<experiment>/<YYYYmmdd-HHMMSS>-<method>-<confighash8>/`.

- `config.yaml`: the resolved config; `run.json`: status, provenance, timings, counters (always
  valid JSON: written to a temp file and renamed); `generations.jsonl`: one row per prompt, appended,
  flushed and fsynced as each prompt finishes.
- Same config -> same folder: a rerun resumes, skipping prompts already written. A torn last line
  (a kill mid-write) is cut off and that prompt redone, so nothing is lost or duplicated.
- One writer at a time: an advisory lock (`flock`) on `.lock`, released by the OS when its process
  dies, so a killed run never blocks the next.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from . import __version__
from .errors import ConfigError
from .files import read_json, write_json_atomic
from .identity import config_hash, defaults_of, identity, same_run
from .rows import REWARD

GENERATIONS = "generations.jsonl"
RUN_JSON = "run.json"
CONFIG = "config.yaml"
METRICS = "metrics.json"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "datasets", "tokenizers", "hydra-core"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


class _FaultInjection:
    """`TQSTAR_FAULT_KILL_AFTER_ROWS=N`: this process sends itself SIGKILL right after its N-th row is on disk.
    For the kill -9 test: a crash at a known point of a real run, with no timing involved."""

    def __init__(self) -> None:
        self.rows = 0

    def row_written(self) -> None:
        limit = os.environ.get("TQSTAR_FAULT_KILL_AFTER_ROWS")
        if not limit:
            return
        self.rows += 1
        if self.rows >= int(limit):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


_FAULT = _FaultInjection()


def _earlier_run(parent: Path, method: str, digest: str, cfg: DictConfig) -> Path | None:
    """A folder of this run named by an earlier rule for run hashes, or made before keys this config has
    existed: same method, and the same identity once its stored config is filled with today's defaults
    (`tqstar.identity.same_run`). Newest first; None when there is none."""
    candidates = [p for p in sorted(parent.glob(f"*-{method}-*"), reverse=True) if (p / CONFIG).is_file()]
    if not candidates:
        return None
    defaults = defaults_of(cfg)
    defaults = OmegaConf.to_container(defaults, resolve=True) if defaults is not None else None
    target = identity(cfg)
    for path in candidates:
        stored = _stored_config(path / CONFIG)
        if stored is not None and same_run(stored, cfg, defaults, target):
            return path
    return None


_STORED: dict[Path, tuple[int, dict | None]] = {}  # config.yaml -> (mtime, its data): a sweep asks again per point


def _stored_config(path: Path) -> dict | None:
    """A run folder's config.yaml as plain data (resolved when written, so plain YAML; the C loader), or None
    when it cannot be read (then it is not this run)."""
    import yaml

    try:
        mtime = path.stat().st_mtime_ns
        if path in _STORED and _STORED[path][0] == mtime:
            return _STORED[path][1]
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError):
        return None
    _STORED[path] = (mtime, data if isinstance(data, dict) else None)
    return _STORED[path][1]


class RunFolder:
    """One run: its folder, its lock, its rows."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_handle = None

    # -- finding / creating -------------------------------------------------------------------
    @classmethod
    def for_config(cls, cfg: DictConfig, method: str | None = None) -> "RunFolder":
        """The folder of an earlier run of this exact config, or a new one."""
        method = method or str(cfg.decoder.method)
        digest = config_hash(cfg)
        parent = Path(str(cfg.output_dir)).expanduser() / str(cfg.experiment_name)
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"output_dir={str(cfg.output_dir)!r} is not writable ({exc.strerror})") from None
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"output_dir={str(cfg.output_dir)!r} is not writable")
        existing = sorted(parent.glob(f"*-{method}-{digest}"))
        if existing:
            return cls(existing[-1])
        earlier = _earlier_run(parent, method, digest, cfg)
        if earlier is not None:
            return cls(earlier)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = parent / f"{stamp}-{method}-{digest}"
        path.mkdir()
        (path / CONFIG).write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
        return cls(path)

    # -- locking --------------------------------------------------------------------------------
    def lock(self) -> None:
        handle = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"run folder {self.path} is in use by {holder}; wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()}")
        handle.flush()
        self._lock_handle = handle

    def unlock(self) -> None:
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> "RunFolder":
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    # -- rows -----------------------------------------------------------------------------------
    @property
    def generations_path(self) -> Path:
        return self.path / GENERATIONS

    def read_rows(self, repair: bool = False) -> list[dict]:
        """Complete rows of generations.jsonl as parsed JSON (the schema: tqstar/rows.py, `GenerationRow.from_json`
        for typed fields); with repair=True a torn tail is cut off the file."""
        path = self.generations_path
        if not path.exists():
            return []
        data = path.read_bytes()
        rows, good_end, offset = [], 0, 0
        for line in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
            end = offset + len(line) + 1
            if end > len(data):  # last line without its newline: torn
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_end, offset = end, end
        if good_end < len(data) and repair:
            with open(path, "r+b") as handle:
                handle.truncate(good_end)
        return rows

    def append(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with open(self.generations_path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        _FAULT.row_written()

    # -- status ---------------------------------------------------------------------------------
    @property
    def run_json_path(self) -> Path:
        return self.path / RUN_JSON

    def status(self) -> dict:
        try:
            return read_json(self.run_json_path)
        except (OSError, json.JSONDecodeError):
            return {}

    def update_status(self, **fields: Any) -> dict:
        data = self.status()
        data.update(fields)
        data["updated"] = datetime.now().isoformat(timespec="seconds")
        write_json_atomic(self.run_json_path, data)
        return data

    def config(self) -> DictConfig:
        return OmegaConf.load(self.path / CONFIG)


def cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo, else platform.processor()); None where neither says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_load() -> dict:
    """The 1-minute load average and the number of CPUs: a load above the run's own threads means other work
    shared the machine, so its times are upper bounds (`tqstar report` says so in a page's header)."""
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {"load_1min": load, "cpu_count": os.cpu_count()}


def provenance(device: str, seed: int) -> dict:
    import torch

    return {
        "tqstar_version": __version__,
        "git_commit": git_commit(),
        "versions": library_versions(),
        "host": platform.node(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "load_at_start": machine_load(),
        "device": device,
        "seed": seed,
    }


def find_runs(paths: Iterable[str | Path]) -> list[RunFolder]:
    """Run folders at or below the given paths (a run folder, an experiment folder, or outputs/)."""
    found: list[RunFolder] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ConfigError(f"run folder {str(raw)!r} does not exist")
        if (path / CONFIG).is_file():
            found.append(RunFolder(path))
            continue
        found.extend(
            RunFolder(p.parent) for p in sorted(path.rglob(CONFIG)) if (p.parent / RUN_JSON).exists() or (p.parent / GENERATIONS).exists()
        )
    return found


def summarize(run: RunFolder) -> dict:
    """One line of `tqstar runs`: status, method, prompts written, mean reward."""
    status = run.status()
    rows = run.read_rows()
    rewards = [r[REWARD] for r in rows if isinstance(r.get(REWARD), (int, float))]
    try:
        method = str(run.config().decoder.method)
    except Exception:  # noqa: BLE001 - a damaged config still lists
        method = "?"
    return {
        "run": str(run.path),
        "status": status.get("status", "unknown"),
        "method": method,
        "prompts": len(rows),
        "of": status.get("num_prompts"),
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        "updated": status.get("updated"),
    }


def now() -> float:
    return time.perf_counter()


def merge_shards(paths: Iterable[str | Path]) -> RunFolder:
    """Combine the run folders of a decode split with `dataset.shard=i/n` into the unsplit run's folder.

    The shards must agree on everything but the shard, cover 0..n-1 once each, and be completed.
    Rows are ordered by their index in the unsplit prompt list; counters are summed.
    """
    shards = [RunFolder(Path(p)) for p in paths]
    for shard in shards:
        if not (shard.path / CONFIG).is_file():
            raise ConfigError(f"{shard.path} is not a run folder (no {CONFIG})")
    configs = [shard.config() for shard in shards]
    keys = []
    for shard, cfg in zip(shards, configs):
        if cfg.dataset.get("shard") is None:
            raise ConfigError(f"{shard.path} was not decoded with dataset.shard=i/n: not a shard")
        keys.append(str(cfg.dataset.shard))
    counts = {int(k.split("/")[1]) for k in keys}
    if len(counts) != 1:
        raise ConfigError(f"shards of different splits: {', '.join(keys)}")
    count = counts.pop()
    if sorted(int(k.split("/")[0]) for k in keys) != list(range(count)):
        raise ConfigError(f"shards {', '.join(sorted(keys))} do not cover 0..{count - 1} exactly once")
    unsplit = OmegaConf.to_container(configs[0], resolve=True)
    unsplit["dataset"]["shard"] = None
    for cfg in configs[1:]:
        other = OmegaConf.to_container(cfg, resolve=True)
        other["dataset"]["shard"] = None
        if other != unsplit:
            raise ConfigError("shards differ in more than dataset.shard; they are not one decode")
    for shard in shards:
        if shard.status().get("status") != "completed":
            raise ConfigError(f"shard {shard.path} is not completed (status {shard.status().get('status', 'unknown')}); rerun it first")
    cfg = OmegaConf.create(unsplit)
    target = RunFolder.for_config(cfg)
    with target:
        rows = sorted((row for shard in shards for row in shard.read_rows()), key=lambda r: r["index"])
        ids = [row["prompt_id"] for row in rows]
        if len(set(ids)) != len(ids):
            raise ConfigError("shards overlap: some prompts appear twice")
        tmp = target.generations_path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target.generations_path)
        counters: dict[str, int] = {}
        for shard in shards:
            for key, value in (shard.status().get("counters") or {}).items():
                counters[key] = counters.get(key, 0) + value
        first = shards[0].status()
        target.update_status(
            **{k: first.get(k) for k in ("tqstar_version", "git_commit", "versions", "device", "seed", "method")},
            status="completed",
            rows=len(rows),
            num_prompts=len(rows),
            counters=counters,
            merged_from=[str(s.path) for s in shards],
        )
    return target
