"""DVC stage ``sae``: the post-hoc SAE baseline on the dense model, measured like Sparse CLIP."""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import run_stage, stage_parser
from pipeline.config import load_params
from pipeline.io import write_json
from pipeline.plots import plot_curves
from pipeline.sae_baseline import run_sae_baseline
from pipeline.tracking import flatten, stage_run

PLOTS = Path("plots/sae")


def sae(args) -> None:
    params = load_params(args.params)
    cfg = params.sae
    upstream = [Path(params.extract.out_dir) / cfg.source_variant, params.reference.out_dir]
    with stage_run(params, "sae", variant=cfg.source_variant, section=cfg.model_dump(mode="json"),
                   upstream=upstream, lineage_dir=PLOTS) as run:
        result, history = run_sae_baseline(params, PLOTS)
        for row in history:
            run.log_metrics({f"train/{k}": v for k, v in row.items() if k != "step"}, step=int(row["step"]))
        curves = {int(row["step"]): {k: v for k, v in row.items() if k in ("fvu", "l0", "dead_fraction")}
                  for row in history}
        plot_curves(curves, [["fvu"], ["l0"], ["dead_fraction"]], PLOTS / "training.png", title="SAE training")
        concepts = result.get("recovery", {}).pop("concepts", None)
        flat = {k: v for k, v in flatten(result).items() if isinstance(v, (int, float))}
        metrics_path = write_json(Path(params.metrics.out_dir) / "sae.json", flat)
        if concepts:
            write_json(PLOTS / "concept_recovery.json", concepts)
        run.log_metrics(flat)
        run.log_outputs([metrics_path, PLOTS, Path(cfg.out_dir) / "sae.pt", Path(cfg.out_dir) / "sae_config.json"])
    print(f"sae: FVU {flat.get('reconstruction.all.fvu', float('nan')):.3f}, L0 {flat['image.l0']:.1f} of "
          f"{flat['width']}, clarity {flat['clarity']:.3f} -> {metrics_path}")


def main(argv=None) -> None:
    run_stage(sae, stage_parser("sae", __doc__), argv)


if __name__ == "__main__":
    main()
