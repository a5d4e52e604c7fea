"""Compose Hydra configs (compose API, absolute config dir) and validate them before any model loads.

Typer owns the command line; Hydra only composes. Every problem with a config is a `ConfigError`
whose one-line message names the key, the bad value and what is allowed; the CLI turns it into
exit code 2.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import ConfigError, did_you_mean


def conf_dir() -> Path:
    """The config folder: `tqstar/conf` in an installed wheel, `<repo>/conf` in a source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "decode.yaml").is_file():
            return candidate
    raise ConfigError(f"tqstar's config files are missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


def group_options(group: str) -> list[str]:
    """Names of the configs in a group folder (`decoder` -> ['args', 'baseline', ...]), hidden `_*` left out."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def _check_overrides(overrides: list[str], allow_sweep: bool) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        raise ConfigError(f"cannot parse override: {str(exc).splitlines()[0]}") from None
    for override in parsed:
        if override.is_sweep_override() and not allow_sweep:
            raise ConfigError(f"'{override.input_line}' lists several values: use `tqstar sweep {override.input_line}` for a grid")


def _group_of(key: str) -> str | None:
    """`model@sft` -> 'model', `decoder` -> 'decoder', `decoder.alpha` -> None."""
    key = key.lstrip("+~")
    if "." in key.split("@")[0]:
        return None
    group = key.split("@")[0]
    return group if (conf_dir() / group).is_dir() else None


def mounts(config_name: str = "decode") -> dict[str, str]:
    """Packages a config group is mounted at in a primary config's defaults: {'sft': 'model', 'reward': 'reward', ...}."""
    return dict(_mounts(conf_dir() / f"{config_name}.yaml"))


@functools.lru_cache(maxsize=16)
def _mounts(primary: Path) -> tuple[tuple[str, str], ...]:
    found: dict[str, str] = {}
    for entry in OmegaConf.load(primary).get("defaults", []):
        if isinstance(entry, (dict, DictConfig)):
            for key in entry:
                group, _, package = str(key).partition("@")
                found[package or group] = group
    return tuple(found.items())


def normalize_override(override: str, config_name: str = "decode") -> str:
    """Every spelling of a group override, as Hydra wants it for this primary config.

    `reward@reward=hf` -> `reward=hf` (Hydra keys a group mounted at its own name by the group alone);
    `sft=hf` -> `model@sft=hf` and `baseline_reward=vader` -> `reward@baseline_reward=vader` (a mount
    named by its package); `group=null` -> `~group` (drop the defaults entry).
    """
    if "=" not in override:
        return override
    key, value = override.split("=", 1)
    prefix = key[: len(key) - len(key.lstrip("+~"))]
    name = key[len(prefix) :]
    if "." not in name:
        group, _, package = name.partition("@")
        where = mounts(config_name)
        if package and package == group:
            name = group
        elif not package and group in where and where[group] != group and not (conf_dir() / group).is_dir():
            name = f"{where[group]}@{group}"
    key = prefix + name
    if value == "null" and _group_of(key) and not prefix:
        return f"~{key}"
    return f"{key}={value}"


def compose(overrides: Iterable[str] = (), config_name: str = "decode", allow_sweep: bool = False) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with command-line overrides; raise ConfigError on any problem.

    The result is resolved (no interpolations left) and still in struct mode, so later code cannot
    invent keys.
    """
    overrides = [normalize_override(o, config_name) for o in overrides]
    _check_overrides(overrides, allow_sweep)
    return copy.deepcopy(_compose_cached(tuple(overrides), config_name))


@functools.lru_cache(maxsize=256)
def _compose_cached(overrides: tuple[str, ...], config_name: str) -> DictConfig:
    """One Hydra compose per distinct command (about 90 ms each): sweeps and evaluate compose the same
    configs many times. `compose` hands out deep copies, so no caller sees another's edits."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException

    overrides = list(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="tqstar"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except MissingConfigException as exc:
        raise ConfigError(_explain_missing(exc, overrides)) from None
    except ConfigCompositionException as exc:
        raise ConfigError(_explain_composition(exc, config_name)) from None
    finally:
        GlobalHydra.instance().clear()
    # The groups this config was composed from (decoder: cd, experiment: ...): a run folder keeps them, and a
    # later command fills keys an older run lacks from the same groups' defaults (tqstar.identity).
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if not k.startswith("hydra/")}
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.choices = choices
    OmegaConf.resolve(cfg)
    _apply_defaults(cfg)
    return cfg


def _explain_missing(exc: Exception, overrides: list[str]) -> str:
    for override in overrides:
        if "=" not in override:
            continue
        key, value = override.split("=", 1)
        group = _group_of(key)
        if group and value not in group_options(group) and value != "null":
            return f"{key}={value}: no such {group} config; {did_you_mean(value, group_options(group))}"
    return str(exc).splitlines()[0]


def _explain_composition(exc: Exception, config_name: str = "decode") -> str:
    message = str(exc)
    cause = exc.__cause__
    detail = str(cause).splitlines()[0] if cause else ""
    if "Could not override" in message or "Could not append" in message or "not in struct" in detail:
        key = message.split("'")[1] if "'" in message else "?"
        parent, _, leaf = key.rpartition(".")
        known = _known_keys(parent, config_name)
        return f"unknown config key '{key}'; {did_you_mean(leaf, known)}" if known else f"unknown config key '{key}'"
    if detail:
        return f"{message.splitlines()[0]} ({detail})"
    return message.splitlines()[0]


def _known_keys(parent: str, config_name: str = "decode") -> list[str]:
    """Keys under `parent` in the default config of that command (for did-you-mean on typos)."""
    try:
        default = compose([], config_name)
    except ConfigError:
        return []
    node = OmegaConf.select(default, parent) if parent else default
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _apply_defaults(cfg: DictConfig) -> None:
    """Fill the values that default from others, so the written config says what actually ran."""
    if "experiment_name" in cfg and cfg.experiment_name is None and "dataset" in cfg:
        cfg.experiment_name = cfg.dataset.name


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate(cfg: DictConfig) -> DictConfig:
    """Check every value a decode uses; raise ConfigError naming the key, the value and what is allowed.

    Each concern has one validator, which the code that uses the values calls too: decoder values
    `DecoderSettings`, models `models.validate_model_cfg`, rewards `rewards.base.validate_reward_cfg`, datasets
    `data.validate_dataset`, and each testbed's config block its own `validate` (`tqstar.testbeds`). All torch-free."""
    from . import testbeds
    from .data.sources import validate_dataset
    from .decoding.settings import DecoderSettings
    from .models import validate_model_cfg
    from .rewards.base import validate_reward_cfg

    DecoderSettings.from_config(cfg.decoder)
    for mount in ("sft", "baseline"):
        validate_model_cfg(cfg.get(mount), mount)
    for name in testbeds.names():
        if cfg.get(name) is not None:
            testbeds.get(name).validate(cfg[name])
    for mount in ("reward", "baseline_reward"):
        if cfg.get(mount) is not None:
            validate_reward_cfg(cfg[mount], mount)
    validate_dataset(cfg.dataset)
    threads = cfg.get("num_threads")
    _require(
        threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1),
        "num_threads",
        threads,
        "null (torch's default) or an integer >= 1",
    )
    device = str(cfg.device)
    _require(device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:"), "device", device, "auto, cpu, cuda, cuda:N or mps")
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
