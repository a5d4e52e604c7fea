"""`tqstar`: the command line. Parses and prints; config composes, the engine decodes.

Heavy libraries (torch, transformers) are imported inside commands, so `tqstar --help` is instant.
Bad input of any kind ends with one line on stderr and exit code 2 (a traceback only with --debug).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Library progress bars (weights, GGUF, datasets) would bury the one-line errors and our own progress.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

app = typer.Typer(
    help="Transfer Q* and friends: decoding-time alignment experiments (arXiv 2405.20495).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class _TestbedCommands(typer.core.TyperGroup):
    """`tqstar prepare <testbed>`: one command per entry of the testbed registry (`tqstar.testbeds`), made when asked,
    so `tqstar --help` imports no testbed."""

    def list_commands(self, ctx) -> list[str]:
        from .testbeds import names

        return names()

    def get_command(self, ctx, name: str):
        from .testbeds import REGISTRY

        return _prepare_command(name) if name in REGISTRY else None


prepare_app = typer.Typer(
    cls=_TestbedCommands, help="Build what a testbed's offline runs need (one command per testbed).", no_args_is_help=True
)
app.add_typer(prepare_app, name="prepare")

_state = {"debug": False}
OVERRIDES_HELP = "Hydra overrides, e.g. decoder=tqstar decoder.alpha=2 dataset.limit=8"


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    _state["debug"] = debug


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr, then exit (2 for bad input)."""
    _console(stderr=True).print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code=code)


def _guarded(fn, *args, **kwargs):
    """Run a command body: ConfigError -> exit 2, anything else -> one line and exit 1 (traceback with --debug)."""
    from .errors import ConfigError

    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except ConfigError as exc:
        if _state["debug"]:
            raise
        fail(str(exc), 2)
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume", 130)
    except Exception as exc:  # noqa: BLE001
        if _state["debug"]:
            raise
        fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (rerun with --debug for the traceback)", 1)


@app.command(context_settings={"allow_extra_args": False})
def decode(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    show_config: bool = typer.Option(False, "--show-config", help="Print the composed config and exit."),
) -> None:
    """Decode a prompt set with one method and write a versioned run folder."""
    _guarded(_decode, list(overrides or []), show_config)


def _decode(overrides: list[str], show_config: bool) -> None:
    from .config import compose, to_yaml, validate

    cfg = validate(compose(overrides))
    if show_config:
        typer.echo(to_yaml(cfg), nl=False)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .decode import run_decode

    console = _console()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        result = run_decode(cfg, progress=progress)
    _print_decode_summary(console, cfg, result)
    if cfg.get("evaluate"):
        from .evaluate import evaluate_runs

        evaluate_runs([result.run.path], console=console)


@app.command(context_settings={"allow_extra_args": False})
def plan(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP + " (the same as tqstar decode)"),
    memory: Optional[List[str]] = typer.Option(
        None, "--memory", "-m", help="Device memory, e.g. --memory cuda:0=80GB --memory cuda:1=24GB (cuda=24GB: every GPU not named)"
    ),
    json_path: Optional[str] = typer.Option(None, "--json", help="Also save the plan as JSON here"),
    prompt_tokens: Optional[int] = typer.Option(
        None, "--prompt-tokens", help="Prompt length to plan for (default: dataset.max_prompt_tokens, else 256)"
    ),
) -> None:
    """Plan a decode's memory per device and its FLOPs per response, from the models' config.json only.

    Loads no weights and never downloads. Exits with code 2 and a suggestion when a device will not fit."""
    _guarded(_plan, list(overrides or []), list(memory or []), json_path, prompt_tokens)


def _plan(overrides: list[str], memory: list[str], json_path: str | None, prompt_tokens: int | None) -> None:
    import json
    from pathlib import Path

    from rich.table import Table

    from .config import compose, validate
    from .plan import build_plan, human, parse_memory

    cfg = validate(compose(overrides))
    result = build_plan(cfg, parse_memory(memory), prompt_tokens)
    console = _console()
    lengths, rows = result["lengths"], result["rows"]
    models = Table(title=f"plan: {result['method']} on {result['experiment'] or 'default'}")
    for column in ("mounts", "source", "config from", "family", "parameters", "dtype", "device", "weights"):
        models.add_column(column, justify="right" if column in ("parameters", "weights") else "left")
    for m in result["models"]:
        params = (
            "?"
            if m["parameters"] is None
            else f"{m['parameters'] / 1e9:.3f} B"
            if m["parameters"] >= 1e8
            else f"{m['parameters'] / 1e6:.2f} M"
        )
        split = f" ({', '.join(f'{d}: {n} layers' for d, n in m['split'].items())})" if m.get("split") else ""
        models.add_row(
            ", ".join(m["mounts"]),
            m["source"],
            m["where"],
            str(m["family"] or "?"),
            params,
            m["dtype"],
            m["device"] + split,
            human(m["weight_bytes"]),
        )
    console.print(models)
    devices = Table(
        title=f"memory per device (prompt {lengths['prompt_tokens']} + response {lengths['max_new_tokens']} + rollout "
        f"{lengths['rollout_tokens']} tokens; {rows['batch_size']} prompts x k={rows['top_k']} x {rows['rollout_num']} rollouts "
        f"= {rows['rollout_rows']} rows, chunks of {rows['chunk_rows']})"
    )
    for column in ("device", "what", "bytes", "peak", "memory", "verdict"):
        devices.add_column(column, justify="right" if column in ("bytes", "peak", "memory") else "left")
    for d in result["devices"]:
        items = list(d["items"].items())
        for number, (what, amount) in enumerate(items):
            last = number == len(items) - 1
            style = "green" if d["verdict"] == "fits" else "red" if d["verdict"] == "does not fit" else "yellow"
            devices.add_row(
                d["device"] if number == 0 else "",
                what,
                human(amount),
                human(d["peak_bytes"]) if last else "",
                human(d["memory_bytes"]) if last else "",
                f"[{style}]{d['verdict']}[/]" if last else "",
                end_section=last,
            )
    console.print(devices)
    console.print(f"FLOPs per response (upper bound): {result['flops_per_response']:.3e}")
    for note in result["notes"]:
        console.print(f"  note: {note}", soft_wrap=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_path}")
    if result["refused"]:
        fail(result["suggestion"])


def _print_decode_summary(console, cfg, result) -> None:
    from rich.table import Table

    from .decode import build_evaluation
    from .stats import format_mean_se, mean_and_stderr

    def pm(mean, stderr) -> str:
        return format_mean_se(mean, stderr, missing="")

    rewards = [r["reward"] for r in result.rows]
    mean, stderr = mean_and_stderr(rewards)
    seconds = [r["seconds"] for r in result.rows]
    lengths = [r["num_tokens"] for r in result.rows]
    # The build's greedy SFT / baseline rewards on the same prompts, when the run decoded all of them (make demo).
    references = build_evaluation(cfg, result.rows)
    table = Table(title=f"{cfg.decoder.method} on {cfg.experiment_name}")
    columns = ("prompts", "new", "mean reward", "tokens / response", "s / response")
    if references:
        table.add_column("decoder", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right", no_wrap=column == "mean reward")
    cells = [
        str(len(result.rows)),
        str(result.new_rows),
        pm(mean, stderr),
        f"{sum(lengths) / max(len(lengths), 1):.1f}",
        f"{sum(seconds) / max(len(seconds), 1):.3f}",
    ]
    table.add_row(*([f"{cfg.decoder.method} (this run)"] if references else []), *cells)
    for ref in references:
        reward = ref["reward"]
        tokens = "" if ref["tokens"] is None else f"{ref['tokens']:.1f}"
        table.add_row(f"{ref['model']} (greedy)", str(ref["prompts"]), "", pm(reward.get("mean"), reward.get("se")), tokens, "")
    if references:
        names = ", ".join(ref["model"] for ref in references)
        table.caption = f"{names} (greedy): the build's own evaluation, same prompts, ≤{references[0]['max_new_tokens']} tokens"
    console.print(table)
    if result.skipped:
        console.print(f"skipped prompts: {result.skipped}")
    console.print(f"run folder: {result.run.path}")
    _print_next_steps(console, cfg, result.run.path)


def _print_next_steps(console, cfg, run_path) -> None:
    """What to try next, when a testbed the config names has advice for a run on its build (after `make demo`): one
    table, the run folder first."""
    from pathlib import Path

    from rich.console import Group
    from rich.markup import escape
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    from .testbeds import get, names

    path = Path(run_path)
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    steps = next((rows for name in names() if (rows := get(name).next_steps(cfg.get(name), path))), None)
    if not steps:
        return
    table = Table(title="what next", show_header=False, show_lines=True)
    table.add_column("", overflow="fold")
    table.add_row(f"run folder: [bold]{escape(str(path))}[/]")
    for command, what in steps:
        table.add_row(Group(Text(command, style="bold"), Padding(what, (0, 0, 0, 2))))
    console.print(table)


def _prepare_command(name: str):
    """The click command `tqstar prepare <name>`, made from what the testbed declares: its help, an example of its
    overrides and its own flags (e.g. --proxy), each a bool passed on to `Testbed.prepare`."""
    import inspect

    from .testbeds import get

    testbed = get(name)

    def command(overrides: Optional[List[str]] = None, **flags: bool) -> None:
        _guarded(_prepare, name, list(overrides or []), flags)

    parameters = [
        inspect.Parameter(
            "overrides",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=typer.Argument(None, help=testbed.overrides_help),
            annotation=Optional[List[str]],
        )
    ]
    for flag, help_text in testbed.prepare_flags.items():
        parameters.append(
            inspect.Parameter(
                flag, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=typer.Option(False, f"--{flag}", help=help_text), annotation=bool
            )
        )
    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = testbed.prepare_help
    single = typer.Typer(add_completion=False)
    single.command(name)(command)
    click_command = typer.main.get_command(single)  # an app of one command is that command
    click_command.name = name
    return click_command


def _prepare(name: str, overrides: list[str], flags: dict[str, bool]) -> None:
    from .config import compose, validate
    from .testbeds import get

    get(name).prepare(validate(compose(overrides)), flags, _console())


@app.command()
def runs(paths: Optional[List[str]] = typer.Argument(None, help="Run folders or folders holding them (default: outputs)")) -> None:
    """List run folders: status, method, prompts written, mean reward."""
    _guarded(_runs, list(paths or ["outputs"]))


def _runs(paths: list[str]) -> None:
    from pathlib import Path

    from rich.table import Table

    from .runs import find_runs, summarize

    existing = [p for p in paths if Path(p).exists()]
    if not existing:
        _console().print("no runs yet (run `tqstar decode`)")
        return
    table = Table()
    for column in ("run", "status", "method", "prompts", "mean reward", "updated"):
        table.add_column(column)
    for run in find_runs(existing):
        info = summarize(run)
        prompts = f"{info['prompts']}" + (f"/{info['of']}" if info["of"] else "")
        reward = "" if info["mean_reward"] is None else f"{info['mean_reward']:.3f}"
        table.add_row(info["run"], info["status"], info["method"], prompts, reward, str(info["updated"] or ""))
    _console().print(table)


@app.command()
def evaluate(
    runs: List[str] = typer.Argument(..., help="Run folders (or folders holding them)"),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Config overrides for evaluate, e.g. -s reward=vader"),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Run to compute win-tie rates against (added to the table)"),
    comparison_dir: Optional[str] = typer.Option(
        None, "--comparison-dir", "-o", help="Where the table and plots go (default: <common parent of the runs>/comparison)"
    ),
    gold_reward: Optional[str] = typer.Option(
        None, "--gold-reward", "-g", help="Also score every run with this reward config (vader, hf, a callable...): gold columns"
    ),
) -> None:
    """Reward, diversity, coherence, KL and win-tie for run folders; one comparison table.

    Writes metrics.json and metrics_per_prompt.jsonl into each run folder, and comparison.csv, comparison.md, reward.png and frontier.png into the comparison folder.
    """

    def body():
        from .evaluate import evaluate_runs

        gold = [f"reward@gold_reward={gold_reward}"] if gold_reward else []
        evaluate_runs(runs, overrides=gold + list(overrides or []), reference=reference, console=_console(), comparison_dir=comparison_dir)

    _guarded(body)


@app.command()
def sweep(
    overrides: Optional[List[str]] = typer.Argument(None, help="Grid in Hydra syntax, e.g. decoder=tqstar,cd decoder.alpha=0.5,1,2"),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="A named sweep from conf/sweep/ (its grid, then these overrides)"),
    executor: Optional[str] = typer.Option(None, "--executor", "-e", help="inline (one process) | local (submitit processes) | slurm"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="local: processes at once; slurm: array parallelism"),
    partition: Optional[str] = typer.Option(None, help="slurm partition"),
    gpus: Optional[int] = typer.Option(None, help="slurm GPUs per node"),
    time_min: Optional[int] = typer.Option(None, "--time-min", help="time limit per job in minutes"),
    gold_reward: Optional[str] = typer.Option(
        None, "--gold-reward", "-g", help="Also score every run with this reward config (gold columns, gold_vs_guide.png)"
    ),
    arm: Optional[List[str]] = typer.Option(
        None, "--arm", "-a", help="Only this arm of the named sweep (repeat for several): e.g. arms added since its page was written"
    ),
    skip_archived: Optional[str] = typer.Option(
        None,
        "--skip-archived",
        help="Leave out the points this report archive (docs/results/<study>) holds, by run identity: a fresh clone "
        "continues a study; then `tqstar report docs/results/<study> <sweep folder>`",
    ),
) -> None:
    """Run a grid of decodes (methods x alpha x k ...), resumable, aggregated and plotted."""

    def body():
        from .sweep import run_sweep

        slurm = {"partition": partition, "gpus_per_node": gpus, "timeout_min": time_min}
        run_sweep(
            list(overrides or []),
            name=name,
            executor=executor,
            jobs=jobs,
            slurm=slurm,
            console=_console(),
            gold_reward=gold_reward,
            only_arms=arm,
            skip_archived=skip_archived,
        )

    _guarded(body)


@app.command()
def merge(shards: List[str] = typer.Argument(..., help="Run folders of one decode split with dataset.shard=i/n")) -> None:
    """Merge the shards of a split decode into the run folder an unsplit decode would have written."""

    def body():
        from .runs import merge_shards

        run = merge_shards(shards)
        _console().print(f"merged {len(shards)} shard(s) into {run.path}")

    _guarded(body)


@app.command()
def report(
    source: Optional[List[str]] = typer.Argument(
        None,
        help="A sweep folder (outputs/sweeps/<study>) or a report archive (docs/results/<study>); several of one study are "
        "merged, later ones winning (e.g. docs/results/<study> outputs/sweeps/<study> adds the sweep's new arms or seeds)",
    ),
    study: Optional[str] = typer.Option(None, "--study", help="Which results page (default: the source folder's name)"),
    out: str = typer.Option("docs/results", "--out", "-o", help="Where pages go: <out>/<study>.md and <out>/<study>/"),
    all_pages: bool = typer.Option(False, "--all", help="Regenerate every page under --out from its archive"),
    seeds: Optional[List[int]] = typer.Option(
        None,
        "--seeds",
        help="The study of the build manifests (--study, studies.BUILD_STUDY): the build seeds to read (--seeds 0 --seeds 1)",
    ),
    cache_dir: Optional[str] = typer.Option(
        None, "--cache-dir", help="Where builds are cached (default: $TQSTAR_CACHE or ~/.cache/tqstar)"
    ),
) -> None:
    """Write a results page (Markdown, CSV, PNG) from a sweep's run folders, with its environment and checks.

    Beside the page it archives what the page was computed from, so `tqstar report docs/results/<study>` (or
    `--all`) regenerates it from the repository alone."""

    def body():
        from pathlib import Path

        from .errors import ConfigError
        from .studies import BUILD_STUDY, premise_from_builds, regenerate_all, study_for, write_report

        target = Path(out)
        if all_pages:
            for page in regenerate_all(target):
                _console().print(f"wrote {page}")
            return
        if not source and not seeds:
            raise ConfigError(f"give a sweep folder or report archive, --all, or --study {BUILD_STUDY} --seeds ...")
        for folder in source or []:
            if not Path(folder).is_dir():
                raise ConfigError(
                    f"{folder!r} is not a folder (give a sweep folder, e.g. outputs/sweeps/transfer_study, or docs/results/<study>)"
                )
        folders = [Path(folder) for folder in source or []]
        chosen = study_for(study, folders[0] if folders else None)
        for folder in folders[1:]:  # every source of one study: named after it unless --study says which
            if study is None and folder.name != chosen.name:
                raise ConfigError(
                    f"{str(folder)!r} is not a source of {chosen.name!r} (merge sources of one study, or name it with --study)"
                )
        data = premise_from_builds(list(seeds), cache_dir) if seeds and not folders else None
        page, written, checks = write_report(folders or None, chosen, target, cache_dir, data=data)
        _console().print(f"wrote {page} and {len(written) - 1} file(s) in {target / chosen.name}")
        for check in checks:
            _console().print(f"  check: {check}", soft_wrap=True)

    _guarded(body)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
