"""DVC stage ``steer``: concept steering of the sparse VLM (paper Fig 8b) for each question type,
over a grid of K and SS, against random edits of the same size; the Fig 8b figure, a qualitative
table, metrics/steering.json."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_params
from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.runtime.tracking import stage_run
from pipeline.vlm.steering import run_steering


def steer(args) -> None:
    params = load_params(args.params)
    cfg = params.steer
    vlm_dir = Path(params.vlm.out_dir) / cfg.variant
    plot_dir = Path("plots/steer")
    with stage_run(params, "steer", variant=cfg.variant, section=cfg.model_dump(mode="json"), upstream=[vlm_dir],
                   lineage_dir=plot_dir) as run:
        results, summary = run_steering(params, vlm_dir, plot_dir)
        path = Path(cfg.out_dir) / "steering.json"
        run.publish(results, path)
        run.log_outputs([path, plot_dir])
    print(f"steer: {summary} -> {path}")


def main(argv=None) -> None:
    run_stage(steer, stage_parser("steer", __doc__), argv)


if __name__ == "__main__":
    main()
