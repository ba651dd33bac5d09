"""The comparison report: the paper's tables and overlaid training curves for several models,
runs or DVC experiments, from what MLflow (or ``dvc exp show``) holds.

``collect`` picks the runs (:mod:`.sources`), ``write_report`` judges the paper's claims on each
source (:mod:`.claims`), builds the tables (:mod:`.tables`),
draws the curves (:mod:`.curves`) and writes ``comparison.md``, ``comparison.html`` and
``comparison.json`` (:mod:`.render`). The ``report`` stage and ``python -m stages report`` are
both ``stages/report.py``.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.config import ReportParams
from pipeline.io import write_json
from pipeline.report.ablation import Ablation
from pipeline.report.claims import claims_metrics, claims_table, judge
from pipeline.report.curves import plot_overlays
from pipeline.report.render import to_html, to_markdown
from pipeline.report.sources import (
    Comparison,
    Model,
    from_dvc_exps,
    from_experiment,
    from_run_ids,
)
from pipeline.report.tables import build_tables


def collect(client: MlflowClient, cfg: ReportParams, experiment: str, repo: str | Path = ".") -> Comparison:
    """The models to compare: given runs, named DVC experiments, or the experiment's latest runs."""
    if cfg.runs:
        return from_run_ids(client, cfg.runs)
    if cfg.dvc_exps:
        return from_dvc_exps(client, cfg.experiment or experiment, list(cfg.dvc_exps), repo)
    return from_experiment(client, cfg.experiment or experiment)


def describe(comparison: Comparison, cfg: ReportParams, experiment: str) -> str:
    if cfg.runs:
        return f"Runs: {', '.join(cfg.runs)}."
    if cfg.dvc_exps:
        return f"DVC experiments {', '.join(cfg.dvc_exps)} (their runs in MLflow experiment {experiment!r})."
    return (f"The latest FINISHED run of each stage and variant in MLflow experiment "
            f"{cfg.experiment or experiment!r} ({len(comparison.run_ids())} runs).")


def write_report(comparison: Comparison, out_dir: str | Path, sources: str, ablation: Ablation | None = None,
                 claims_file: str | Path | None = None) -> dict[str, Path]:
    """Write the report files; return them by name (markdown, html, json, claims, and one per
    figure). ``ablation`` is :func:`~pipeline.report.ablation.fetch_ablation`'s, if any; the
    verdicts of the first source's claims also go to ``claims_file`` when given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("curves_*.png"):
        stale.unlink()
    ablation = ablation or Ablation()
    verdicts = {source: judge(models, ablation.checks) for source, models in by_source(comparison).items()}
    tables = [claims_table(claims, source) for source, claims in verdicts.items()] + build_tables(comparison)
    figures = plot_overlays(comparison.models, out_dir)
    if ablation.table is not None:
        tables.append(ablation.table)
    figures = {**figures, **ablation.figures}
    (out_dir / "comparison.md").write_text(to_markdown(tables, figures, sources))
    (out_dir / "comparison.html").write_text(to_html(tables, figures, sources))
    values = {m.label: {"run_ids": m.run_ids, **m.stages} for m in comparison.models}
    write_json(out_dir / "comparison.json", {"sources": comparison.sources, "models": values,
                                             "params_diff": comparison.params_diff})
    claims = {source or "run": claims_metrics(c) for source, c in verdicts.items()}
    write_json(out_dir / "claims.json", claims)
    paths = {"markdown": out_dir / "comparison.md", "html": out_dir / "comparison.html",
             "json": out_dir / "comparison.json", "claims": out_dir / "claims.json",
             **{f"curves_{k}": p for k, p in figures.items()}}
    if claims_file is not None and claims:
        Path(claims_file).parent.mkdir(parents=True, exist_ok=True)
        write_json(claims_file, next(iter(claims.values())))
        paths["claims_metrics"] = Path(claims_file)
    return paths


def by_source(comparison: Comparison) -> dict[str, list[Model]]:
    """The models of each source, in the comparison's order: each source is one run to judge."""
    grouped: dict[str, list[Model]] = {}
    for model in comparison.models:
        grouped.setdefault(model.source, []).append(model)
    return grouped


__all__ = ["Comparison", "collect", "describe", "write_report"]
