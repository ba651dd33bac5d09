"""DVC stage ``train@<variant>``: train one Sparse CLIP variant (or the dense baseline) with Ray Train."""

from __future__ import annotations

from pathlib import Path

from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.clip.model import clip_config
from pipeline.clip.train import run_training, training_identity, training_lock, training_section
from pipeline.config import load_params
from pipeline.plots import plot_curves, write_curve_csv
from pipeline.runtime.tracking import metric_curves, stage_run, tracking_uri

PANELS = [
    ["train/loss", "train/contrastive_loss"],
    ["train/l0_image_pct", "train/l0_text_pct"],
    ["zeroshot/shape/top1", "zeroshot/colour/top1"],
    ["zeroshot/size/top1", "zeroshot/position/top1", "zeroshot/background/top1", "zeroshot/count/top1",
     "zeroshot/word/top1"],
    ["train/dead_fraction"],
    ["train/logit_scale"],
    ["val/image_retrieval_r5", "val/text_retrieval_r5"],
]


def train(args) -> None:
    params = load_params(args.params)
    variant = args.variant
    model_params = params.train.model_for(variant)
    model_dir = Path(params.train.out_dir) / variant
    with training_lock(params, variant), stage_run(
            params, "train", variant=variant, section=training_section(params, variant),
            upstream=[params.sample.out_dir, params.train.feature_cache_dir], lineage_dir=model_dir,
            resume_key=training_identity(params, variant)
    ) as run:
        outcome = run_training(params, variant, run_id=run.run_id, tracking_uri=tracking_uri())
        curves = metric_curves(run.run_id)
        final = {k: v for values in curves.values() for k, v in values.items()}  # last value of each
        summary = {"total_steps": outcome.total_steps, "width": _width(model_params),
                   **{k.replace("/", "."): v for k, v in final.items()}}
        metrics_path = Path("metrics/train") / f"{variant}.json"
        run.publish(summary, metrics_path, log=False)  # the run holds these as curves already
        csv_path = write_curve_csv(curves, Path("plots/train") / f"{variant}.csv")
        png_path = plot_curves(curves, PANELS, Path("plots/train") / f"{variant}.png", title=f"train {variant}")
        run.log_dict(outcome.snapshots, "evolution_snapshots.json")
        run.set_tags({"ray_nodes": len({w["node_id"] for w in outcome.workers})})
        run.log_outputs([model_dir, metrics_path, csv_path, png_path])
    score = (f"zero-shot shape top1 {final['zeroshot/shape/top1']:.3f}" if "zeroshot/shape/top1" in final
             else f"val R@5 {final.get('val/image_retrieval_r5', float('nan')):.3f}")
    print(f"train[{variant}]: {outcome.total_steps} steps -> {model_dir}; {score}, "
          f"L0 image {final.get('train/l0_image', float('nan')):.1f} of {summary['width']}")


def _width(model_params) -> int:
    return clip_config(model_params)["embed_dim"] * max(1, model_params.expansion)


def main(argv=None) -> None:
    run_stage(train, stage_parser("train", __doc__, variant=True), argv)


if __name__ == "__main__":
    main()
