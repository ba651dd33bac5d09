"""The comparison report: the paper's tables and overlaid training curves for several models,
runs or DVC experiments, from what MLflow (or ``dvc exp show``) holds.

``collect`` picks the runs (:mod:`.sources`), ``write_report`` builds the tables (:mod:`.tables`),
draws the curves (:mod:`.curves`) and writes ``comparison.md``, ``comparison.html`` and
``comparison.json`` (:mod:`.render`). The ``report`` stage and ``python -m pipeline.report`` are
both ``stages/report.py``.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.config import ReportParams
from pipeline.io import write_json
from pipeline.report.curves import plot_overlays
from pipeline.report.render import to_html, to_markdown
from pipeline.report.sources import (
    Comparison,
    from_dvc_exps,
    from_experiment,
    from_run_ids,
)
from pipeline.report.tables import Table, build_tables


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


def write_report(comparison: Comparison, out_dir: str | Path, sources: str,
                 ablation: tuple[Table | None, dict[str, Path]] | None = None) -> dict[str, Path]:
    """Write the report files; return them by name (markdown, html, json, and one per figure).
    ``ablation`` is :func:`~pipeline.report.ablation.fetch_ablation`'s table and figures, if any."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("curves_*.png"):
        stale.unlink()
    tables = build_tables(comparison)
    figures = plot_overlays(comparison.models, out_dir)
    if ablation is not None:
        table, ablation_figures = ablation
        tables += [table] if table is not None else []
        figures = {**figures, **ablation_figures}
    (out_dir / "comparison.md").write_text(to_markdown(tables, figures, sources))
    (out_dir / "comparison.html").write_text(to_html(tables, figures, sources))
    values = {m.label: {"run_ids": m.run_ids, **m.stages} for m in comparison.models}
    write_json(out_dir / "comparison.json", {"sources": comparison.sources, "models": values,
                                             "params_diff": comparison.params_diff})
    return {"markdown": out_dir / "comparison.md", "html": out_dir / "comparison.html",
            "json": out_dir / "comparison.json", **{f"curves_{k}": p for k, p in figures.items()}}


__all__ = ["Comparison", "collect", "describe", "write_report"]
