"""DVC stage ``sae``: the post-hoc SAE baseline on the dense model, measured like Sparse CLIP."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_params
from pipeline.io import write_json
from pipeline.metrics.evaluate import pop_concept_tables
from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.runtime.tracking import stage_run
from pipeline.sae.baseline import plot_training, run_sae_baseline, training_curves

PLOTS = Path("plots/sae")


def sae(args) -> None:
    params = load_params(args.params)
    cfg = params.sae
    upstream = [Path(params.extract.out_dir) / cfg.source_variant, params.reference.out_dir]
    with stage_run(params, "sae", variant=cfg.source_variant, section=cfg.model_dump(mode="json"),
                   upstream=upstream, lineage_dir=PLOTS) as run:
        result, histories = run_sae_baseline(params, PLOTS)
        for step, values in training_curves(histories).items():
            run.log_metrics({f"train/{k}": v for k, v in values.items()}, step=step)
        plot_training(histories, PLOTS / "training.png")
        concept_tables = pop_concept_tables(result)
        metrics_path = Path(params.metrics.out_dir) / "sae.json"
        flat = run.publish(result, metrics_path)
        for name, table in concept_tables.items():
            write_json(PLOTS / f"{name}.json", table)
        run.log_outputs([metrics_path, PLOTS, *Path(cfg.out_dir).glob("*.pt"), Path(cfg.out_dir) / "sae_config.json"])
    print(f"sae: FVU {flat.get('reconstruction.all.fvu', float('nan')):.3f}, L0 {flat['image.l0']:.1f} of "
          f"{flat['width']}, clarity {flat['clarity']:.3f} -> {metrics_path}")


def main(argv=None) -> None:
    run_stage(sae, stage_parser("sae", __doc__), argv)


if __name__ == "__main__":
    main()
