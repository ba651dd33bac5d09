"""DVC stage ``reference``: dense reference-encoder embeddings of the images, for Clarity."""

from __future__ import annotations

from pipeline.activations.reference import run_reference
from pipeline.config import load_params
from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.runtime.cluster import connect
from pipeline.runtime.tracking import stage_run


def reference(args) -> None:
    params = load_params(args.params)
    cfg = params.reference
    section = {**cfg.model_dump(mode="json"), "splits": params.extract.splits}
    with stage_run(params, "reference", section=section, upstream=[params.sample.out_dir],
                   lineage_dir=cfg.out_dir) as run:
        connect(params.ray)
        summary = run_reference(cfg, params.extract, params.sample.out_dir, params.ray.task_cpus,
                                params.section_hash("reference"))
        run.publish({"images": summary["images"]})
        run.log_outputs([f"{cfg.out_dir}/images/_complete.json"])
    print(f"reference: {summary['images']} images embedded with {cfg.encoder} -> {cfg.out_dir}")


def main(argv=None) -> None:
    run_stage(reference, stage_parser("reference", __doc__), argv)


if __name__ == "__main__":
    main()
