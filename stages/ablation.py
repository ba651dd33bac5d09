"""DVC stage ``ablation`` (ablation/dvc.yaml): the paper's Fig 2a-c sweep on the sampled data."""

from __future__ import annotations

from pathlib import Path

from pipeline.clip.ablation import (
    flat_metrics,
    plot_panels,
    run_ablation,
    summarise,
    trend_checks,
)
from pipeline.config import load_params
from pipeline.io import write_json
from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.runtime.tracking import stage_run


def ablation(args) -> None:
    params = load_params(args.params)
    out = Path(params.ablation.out_dir)
    section = {**params.ablation.model_dump(mode="json"), "model": params.train.model.model_dump(mode="json"),
               "optim": params.train.optim.model_dump(mode="json")}
    with stage_run(params, "ablation", section=section, upstream=[params.sample.out_dir], lineage_dir=out) as run:
        results = run_ablation(params, params.sample.out_dir)
        summary = summarise(results)
        checks = trend_checks(summary, params.ablation.recipes)
        points = write_json(out / "points.json", {"summary": summary, "checks": checks})
        curves = write_json(out / "curves.json", results)
        figures = plot_panels(summary, results, out)
        # beside out_dir, not in metrics/: the report stage depends on metrics/, and must not pull
        # this hour-long sweep into `dvc repro`
        metrics = out.parent / f"{out.name}.json"
        run.publish({**flat_metrics(summary), **checks}, metrics)
        run.log_outputs([points, curves, metrics, *figures])
    print(f"ablation: {len(results)} trainings -> {out}; " + ", ".join(f"{k}={v}" for k, v in checks.items()))


def main(argv=None) -> None:
    run_stage(ablation, stage_parser("ablation", __doc__), argv)


if __name__ == "__main__":
    main()
