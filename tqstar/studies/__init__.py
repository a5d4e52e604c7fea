"""Results pages from run folders: `tqstar report`.

    tqstar report outputs/sweeps/transfer_study          # docs/results/transfer_study.md + docs/results/transfer_study/
    tqstar report docs/results/transfer_study            # the same page again, from the archive it left
    tqstar report --all                                  # every page under docs/results/, from its archive
    tqstar report --study synthetic_premise --seeds 0 1 2   # from the synthetic builds' manifests

Layout: `sources` reads a sweep folder or an archive into a `StudyData`; `analysis` holds the statistics (pure
functions); `catalog` has one renderer per study and the registry `STUDIES`; `page` writes Markdown, CSV and PNG.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, did_you_mean
from .catalog import STUDIES, Study
from .page import Page
from .sources import StudyData, environment_of, is_archive, load, merge, premise_rows, synthetic_curves, write_archive

DEFAULT_OUT = Path("docs/results")

__all__ = ["BUILD_STUDY", "STUDIES", "Study", "write_report", "regenerate_all", "study_for", "premise_from_builds"]
BUILD_STUDY = "synthetic_premise"  # the study read from build manifests (`tqstar report --study <it> --seeds ...`)


def study_for(name: str | None, source: Path | None) -> Study:
    """The study named, or the one a source folder is named after (outputs/sweeps/<study>, docs/results/<study>)."""
    name = name or (source.name if source is not None else None)
    if name not in STUDIES:
        raise ConfigError(f"no results page for {name!r} (name it with --study); {did_you_mean(str(name), list(STUDIES))}")
    return STUDIES[name]


def premise_from_builds(seeds: list[int], cache_dir: str | None = None) -> StudyData:
    """The synthetic premise study from each seed's build manifest (default recipe)."""
    import pandas as pd

    from ..synthetic import BuildParams, load_manifest, task_dir
    from ..synthetic.cache import is_built

    rows, statuses = [], []
    for seed in seeds:
        folder = task_dir(seed, cache_dir, BuildParams())
        if not is_built(folder):
            raise ConfigError(f"seed {seed}: no synthetic build at {folder} (tqstar prepare synthetic synthetic.seed={seed})")
        manifest = load_manifest(folder)
        rows += premise_rows(seed, manifest)
        statuses.append({"versions": manifest.get("versions"), "git_commit": manifest.get("git_commit")})
    environment = environment_of(statuses, [])
    environment["source"] = f"synthetic build manifests, seeds {', '.join(map(str, seeds))}"
    return StudyData(
        name=BUILD_STUDY, points=pd.DataFrame(), environment=environment, source="builds", tables={"premise": pd.DataFrame(rows)}
    )


def _optimal_curves(source: Path, data: StudyData, cache_dir: str | None) -> dict:
    """rho*_(beta,k) per prompt for the optimal check: from the sweep folder's cache (optimum_topk/), computed from
    the build when missing; rho*_beta per prompt from the build manifests."""
    from ..synthetic import load_manifest, task_dir
    from ..synthetic.cache import is_built

    curves: dict = {}
    for seed in sorted({int(s) for s in data.points["seed"].dropna()}):
        build = task_dir(seed, cache_dir)
        for top_k in sorted({int(k) for k in data.points["rollout_top_k"].dropna()}):
            cached = sorted((source / "optimum_topk").glob(f"seed{seed}-k{top_k}-m*.json"))
            if cached:
                curve = json.loads(cached[-1].read_text())
            elif is_built(build):
                curve = _sample_truncated_curve(build, seed, top_k, source)
            else:
                continue
            curves.setdefault(f"rho*_(beta,{top_k})", {})[str(seed)] = curve
        if is_built(build):
            sft = (load_manifest(build).get("premise") or {}).get("sft") or {}
            curve = (sft.get("optimum_curve") or {}).get("target_reward")
            if curve:
                curves.setdefault("rho*_beta_by_prompt", {})[str(seed)] = curve
    return curves


def _sample_truncated_curve(build: Path, seed: int, top_k: int, source: Path, samples: int = 128) -> list:
    from ..synthetic import load_manifest
    from ..synthetic.evaluation import truncated_optimum_curve
    from ..synthetic.params import BuildParams

    prompts = [json.loads(line)["prompt"] for line in (build / "prompts" / "test.jsonl").read_text().splitlines() if line.strip()]
    manifest = load_manifest(build)
    curve = truncated_optimum_curve(build, prompts, BuildParams(**manifest["params"]), seed + 2, top_k, samples)
    path = source / "optimum_topk" / f"seed{seed}-k{top_k}-m{samples}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(curve))
    return curve


def read_source(source: Path, study: Study, cache_dir: str | None = None) -> StudyData:
    """One sweep folder or archive, with the curves a sweep folder's page needs from the builds."""
    data = load(source, study.name)
    if not is_archive(source):
        if study.synthetic_curves and "seed" in data.points:
            data.curves = synthetic_curves(sorted(data.points["seed"].dropna().unique()), cache_dir)
        if study.name in ("optimal_check", "soft_transfer"):  # rho*_(beta,k) per prompt
            data.curves = _optimal_curves(source, data, cache_dir)
    return data


def write_report(
    source: Path | list[Path] | None,
    study: Study,
    out: Path = DEFAULT_OUT,
    cache_dir: str | None = None,
    data: StudyData | None = None,
):
    """Read the source (or several sources of the study, merged: `sources.merge`), render the study's page into
    `out`, and archive its inputs beside it (unless the source is that archive already). Returns (page path,
    written paths, checks)."""
    sources = [Path(s) for s in source] if isinstance(source, (list, tuple)) else [Path(source)] if source is not None else []
    if data is None:
        data = merge([read_source(s, study, cache_dir) for s in sources])
    archive = out / study.name
    page = Page(study=study.name, title=study.title, environment=data.environment)
    study.render(data, page)
    written = page.save(out)
    if len(sources) != 1 or not is_archive(sources[0]) or sources[0].resolve() != archive.resolve():
        written += write_archive(data, archive)
    return written[0], written, page.checks


def regenerate_all(out: Path = DEFAULT_OUT) -> list[Path]:
    """Every page under `out` again, each from its own archive."""
    archives = [p.parent for p in sorted(out.glob("*/environment.json")) if p.parent.name in STUDIES]
    if not archives:
        raise ConfigError(f"no report archives under {out} (write one with `tqstar report <sweep folder>`)")
    return [write_report(folder, STUDIES[folder.name], out)[0] for folder in archives]
