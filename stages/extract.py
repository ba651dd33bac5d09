"""DVC stage ``extract@<variant>``: sparse activations of one trained model, with Ray Data."""

from __future__ import annotations

from pathlib import Path

from pipeline.activations.extract import run_extraction
from pipeline.config import load_params
from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.runtime.cluster import connect
from pipeline.runtime.tracking import stage_run


def extract(args) -> None:
    params = load_params(args.params)
    params.train.model_for(args.variant)  # an unknown variant fails here, by name
    model_dir = Path(params.train.out_dir) / args.variant
    out_dir = Path(params.extract.out_dir) / args.variant
    with stage_run(params, "extract", variant=args.variant, section=params.extract.model_dump(mode="json"),
                   upstream=[model_dir, params.sample.out_dir, params.vocab.out_dir], lineage_dir=out_dir) as run:
        connect(params.ray)
        manifest = run_extraction(model_dir, params.sample.out_dir, params.vocab.out_dir, out_dir, params.extract,
                                  params.ray.task_cpus, params.section_hash("extract"),
                                  feature_cache=params.train.feature_cache_in_use)
        run.publish({"rows": manifest["rows"], "width": manifest["width"], "vocabulary": manifest["vocabulary"]})
        run.log_outputs([out_dir / "manifest.json"])
    print(f"extract[{args.variant}]: {manifest['rows']} -> {out_dir}")


def main(argv=None) -> None:
    run_stage(extract, stage_parser("extract", __doc__, variant=True), argv)


if __name__ == "__main__":
    main()
