"""DVC stage ``metrics@<variant>``: the paper's quantitative metrics of one model."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_params
from pipeline.io import write_json
from pipeline.metrics.evaluate import evaluate, pop_concept_tables
from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.runtime.tracking import stage_run


def metrics(args) -> None:
    params = load_params(args.params)
    params.train.model_for(args.variant)
    act_dir = Path(params.extract.out_dir) / args.variant
    plot_dir = Path("plots/metrics") / args.variant
    section = {**params.metrics.model_dump(mode="json"),
               "reference": params.reference.model_dump(mode="json", include={"encoder", "arch", "image_size"})}
    with stage_run(params, "metrics", variant=args.variant, section=section,
                   upstream=[act_dir, params.reference.out_dir], lineage_dir=plot_dir) as run:
        result = evaluate(act_dir, params.reference.out_dir, params.vocab.out_dir, params.metrics, plot_dir,
                          title=args.variant)
        concept_tables = pop_concept_tables(result)
        metrics_path = Path(params.metrics.out_dir) / f"{args.variant}.json"
        flat = run.publish(result, metrics_path)
        outputs = [metrics_path, plot_dir]
        outputs += [write_json(plot_dir / f"{name}.json", table) for name, table in concept_tables.items()]
        run.log_outputs(outputs)
    print(f"metrics[{args.variant}]: L0 image {flat['image.l0']:.1f} of {flat['width']}, "
          f"clarity {flat['clarity']:.3f} (baseline {flat['clarity_baseline']:.3f}), "
          + (f"zero-shot shape {flat['zeroshot.shape.top1']:.3f}" if "zeroshot.shape.top1" in flat
             else f"tagging AUROC {flat.get('tagging.auroc', float('nan')):.3f}") + f" -> {metrics_path}")


def main(argv=None) -> None:
    run_stage(metrics, stage_parser("metrics", __doc__, variant=True), argv)


if __name__ == "__main__":
    main()
