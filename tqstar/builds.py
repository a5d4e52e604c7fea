"""What every testbed's build shares: where builds live, how one gets there safely, and how it samples.

A testbed (`tqstar.testbeds`) builds its models and prompts once and caches them under
``<cache>/<testbed>/v<VERSION>-<hash8>``; ``<cache>`` is ``cache_dir``, ``$TQSTAR_CACHE`` or
``~/.cache/tqstar`` (`cache_root`). The hash is the testbed's own (its recipe, seed and the versions of
the libraries that shape its weights: `library_versions`).

- `build_once` writes a build into a temp folder next to the final one and renames it into place only
  after its manifest (the last file) is written, so a killed build never leaves a folder that looks
  finished; a lock file makes a concurrent second caller wait for the first build instead of repeating it.
  A build started on first use prints one line (`first_use_line`).
- `Progress` (rich progress bars for the stages, or nothing), `quiet_libraries` and `torch_threads` wrap
  a build; `quiet_cpu_trainer_args` and `without_printed_logs` are the settings every TRL trainer of the
  builds shares.
- `generate` decodes through the project's engine (one seeded generator per row, so samples do not
  depend on batching); `sample_and_score` samples at temperature 1 and scores each row by the testbed's
  rewards.

Torch-free at import: versions are read from package metadata, heavy libraries inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import sys
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from .files import file_lock, read_json, write_json_atomic

# ----------------------------------------------------------------------------- where builds live


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$TQSTAR_CACHE``, else ``~/.cache/tqstar``."""
    root = cache_dir or os.environ.get("TQSTAR_CACHE") or Path.home() / ".cache" / "tqstar"
    return Path(root).expanduser()


@functools.lru_cache(maxsize=None)
def _installed(name: str) -> str | None:
    """A library's installed version (read once a process: every run identity and build key asks)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def library_versions(libraries: Iterable[str]) -> dict:
    """Python and the given libraries' installed versions (None for one not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in libraries:
        found[name] = _installed(name)
    return found


def keyed(versions: dict) -> dict:
    """What of `library_versions()` enters a build key: the libraries, and Python without its patch level."""
    versions = dict(versions)
    versions["python"] = ".".join(versions["python"].split(".")[:2])
    return versions


def is_built(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "manifest.json").is_file()


def load_manifest(folder: str | os.PathLike) -> dict:
    return read_json(Path(folder) / "manifest.json")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def first_use_line(what: str, seconds: float | None, ahead: str) -> str:
    """The one line a build prints when it starts (every build started on first use says the same three things):
    what it builds, how long that took on a 2-core CPU machine (``seconds``: the constant kept next to the
    build's params; None: not measured) and the command that builds it ahead of time."""
    took = "" if seconds is None else f": about {_duration(seconds)} on a 2-core CPU machine"
    return f"building {what}{took}, once (cached); `{ahead}` builds it ahead"


def build_once(final: Path, build: Callable[[Path], dict], announce: str | None = None) -> Path:
    """Return ``final`` if it holds a complete build; else run ``build(tmp)`` (which fills the
    temp folder and returns the manifest), write the manifest last and rename tmp -> final.

    ``announce``: a line printed (stderr) when the build starts, not when it is found built (`first_use_line`)."""
    final = Path(final)
    if is_built(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f"{final.name}.lock"):
        if is_built(final):  # another process built it while we waited
            return final
        if announce:
            print(announce, file=sys.stderr, flush=True)
        if final.exists():  # a stray incomplete folder (no manifest): never trust it
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-building-", dir=final.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache is an ordinary folder
        try:
            manifest = build(tmp)
            write_json_atomic(tmp / "manifest.json", manifest)  # last file written
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ----------------------------------------------------------------------------- progress and quiet


class Progress:
    """rich progress bars for the stages, or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def task(self, description: str, total: int | None) -> Callable[..., None]:
        """Add a stage; returns ``update(completed=None, total=None)``."""
        if self._progress is None:
            return lambda completed=None, total=None: None
        tid = self._progress.add_task(description, total=total)

        def update(completed=None, total=None):
            kwargs = {}
            if completed is not None:
                kwargs["completed"] = completed
            if total is not None:
                kwargs["total"] = total
            self._progress.update(tid, **kwargs)

        return update


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence transformers / TRL / datasets chatter during a build, then restore it."""
    import datasets
    import transformers

    old_tf = transformers.logging.get_verbosity()
    old_ds = datasets.logging.get_verbosity()
    old_bar = datasets.is_progress_bar_enabled()
    old_tf_bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(old_tf)
        datasets.logging.set_verbosity(old_ds)
        if old_bar:
            datasets.enable_progress_bar()
        if old_tf_bar:
            transformers.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    # default: $OMP_NUM_THREADS when set (so a thread-count comparison is one environment variable), else min(4, cores)
    n = n or int(os.environ.get("OMP_NUM_THREADS") or 0) or min(4, os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def quiet_cpu_trainer_args(seed: int, logging_steps: int) -> dict:
    """Training arguments every TRL trainer of the builds shares (a reward model's RewardTrainer, a DPOTrainer):
    on the CPU in float32 (the same weights on any machine), seeded, nothing saved or reported, no printed logs."""
    return dict(
        seed=seed,
        data_seed=seed,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_num_workers=0,
        save_strategy="no",
        report_to="none",
        logging_steps=logging_steps,
        disable_tqdm=True,
        log_level="error",
    )


def without_printed_logs(trainer):
    """The trainer without its printer and progress callbacks (the build draws its own progress bar)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer


# ----------------------------------------------------------------------------- sampling through the engine


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str],
    selection: str = "greedy",
    temperature: float = 1.0,
    samples_per_prompt: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    update: Callable[..., None] = lambda **k: None,
    sft_model=None,
    top_k: int | None = None,
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
    ``stop_strings``: where a response ends besides EOS (the testbed's). ``keep_ids``: rows
    also carry ``token_ids`` (the generated ids, a final EOS / stop-string tokens included) and
    ``stop_reason`` (eos | stop_string | max_new_tokens) and ``sft_token_logprobs`` (log pi_sft of each of those
    ids), for training on exactly what was sampled."""
    from .decoding.engine import Decoder
    from .decoding.settings import DecoderSettings

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
                    row.update(token_ids=list(g.token_ids), stop_reason=g.stop_reason, sft_token_logprobs=list(g.sft_logprobs))
                out.append(row)
            update(completed=min(len(prompts), (start + rows_per_batch) // n))
    finally:
        tokenizer.padding_side = old_side
    return out


def sample_and_score(
    model,
    tokenizer,
    prompts: list[str],
    rewards: Mapping[str, Callable[[list[str], list[str]], Sequence[float]]],
    *,
    reward_prompts: list[str] | None = None,
    **kwargs,
) -> list[dict]:
    """`generate` at temperature 1 (``selection=sample``; the other arguments as there), each row then scored by
    every reward: ``row[name] = rewards[name](prompt, response)``, the rewards reading ``reward_prompts`` (the
    prompts as written, when the models read them formatted) or else ``prompts``."""
    rows = generate(model, tokenizer, prompts, selection="sample", temperature=1.0, **kwargs)
    written = reward_prompts if reward_prompts is not None else prompts
    texts = [written[r["prompt_index"]] for r in rows]
    responses = [r["response"] for r in rows]
    for name, reward in rewards.items():
        for row, value in zip(rows, reward(texts, responses)):
            row[name] = value
    return rows
