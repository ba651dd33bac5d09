"""DVC stage ``report`` (also by hand: ``python -m stages report --runs ...``): the paper's tables and overlaid
training curves comparing models, runs or DVC experiments, in ``reports/comparison/``, logged to
MLflow as a ``report`` run whose description is the Markdown report.

    python -m stages report                          # latest run of each stage+variant
    python -m stages report --runs RUN_ID [RUN_ID ...]
    python -m stages report --experiment NAME
    python -m stages report --dvc-exps EXP [EXP ...]  # experiments of `dvc exp run`
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.config import ReportParams, load_params
from pipeline.report import collect, describe, write_report
from pipeline.report.ablation import fetch_ablation
from pipeline.report.claims import verdict_counts
from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.runtime.tracking import stage_run, tracking_uri

NOTE_CHARS = 7500  # MLflow tag values stop at 8000 characters


def report(args) -> None:
    params = load_params(args.params)
    cfg = with_options(params.report, args)
    client = MlflowClient(tracking_uri())
    comparison = collect(client, cfg, params.project.experiment, args.repo)
    sources = describe(comparison, cfg, cfg.experiment or params.project.experiment)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    ablation = fetch_ablation(client, cfg.experiment or params.project.experiment, cfg.out_dir, params.ablation.out_dir)
    if args.no_mlflow:
        paths = write_report(comparison, cfg.out_dir, sources, ablation, cfg.claims_file)
    else:
        with stage_run(params, "report", section=cfg.model_dump(mode="json")) as run:
            paths = write_report(comparison, cfg.out_dir, sources, ablation, cfg.claims_file)
            first_source = next(iter(json.loads(paths["claims"].read_text()).values()), {})
            run.log_metrics(verdict_counts(first_source))
            run.set_tags({"report.run_ids": json.dumps(comparison.run_ids())[:NOTE_CHARS],
                          "mlflow.note.content": paths["markdown"].read_text()[:NOTE_CHARS]})
            run.log_outputs([cfg.out_dir])
    print(f"report: {len(comparison.models)} models from {len(comparison.run_ids())} runs -> "
          f"{paths['markdown']}, {paths['html']}")


def with_options(cfg: ReportParams, args) -> ReportParams:
    """The params section with the command line's choices on top (validated the same way)."""
    chosen = {"experiment": args.experiment, "runs": args.runs, "dvc_exps": args.dvc_exps, "out_dir": args.out_dir}
    if args.runs or args.dvc_exps:  # one source replaces the other
        chosen.update(runs=args.runs or [], dvc_exps=args.dvc_exps or [])
    return ReportParams.model_validate({**cfg.model_dump(), **{k: v for k, v in chosen.items() if v is not None}})


def parser():
    cli = stage_parser("report", __doc__)
    cli.add_argument("--runs", nargs="+", metavar="RUN_ID", help="MLflow run ids to compare")
    cli.add_argument("--experiment", help="MLflow experiment (default: report.experiment or project.experiment)")
    cli.add_argument("--dvc-exps", nargs="+", metavar="EXP", help="DVC experiments to compare")
    cli.add_argument("--out-dir", help="where the report goes (default: report.out_dir)")
    cli.add_argument("--repo", default=".", help="the DVC repository of --dvc-exps (default: here)")
    cli.add_argument("--no-mlflow", action="store_true", help="write the files only; log no report run")
    return cli


def main(argv=None) -> None:
    run_stage(report, parser(), argv)


if __name__ == "__main__":
    main()
