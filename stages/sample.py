"""DVC stage ``sample``: a seeded, validated random subset of the source, as split shards."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_params
from pipeline.data.sampling import run_sample
from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.runtime.tracking import stage_run

METRICS = Path("metrics/sample.json")


def sample(args) -> None:
    params = load_params(args.params)
    cfg = params.sample
    with stage_run(params, "sample", section=cfg.model_dump(mode="json"), lineage_dir=cfg.out_dir) as run:
        manifest = run_sample(cfg, params.ray)
        evals = manifest["eval_sets"]
        metrics = {
            "records_written": manifest["written"],
            "records_skipped": manifest["skipped"],
            **{f"skipped.{reason}": n for reason, n in manifest["skipped_by_reason"].items()},
            **{f"records.{split}": n for split, n in manifest["records_by_split"].items()},
            **{f"retrieval_images.{split}": n for split, n in evals["retrieval"].items()},
            **{f"crops.{split}": n for split, n in evals["crops"].items()},
        }
        run.publish(metrics, METRICS)
        run.log_outputs([cfg.out_dir, METRICS])
    print(f"sample: wrote {manifest['written']} records, skipped {manifest['skipped']} "
          f"{manifest['skipped_by_reason'] or ''} -> {cfg.out_dir}")


def main(argv=None) -> None:
    run_stage(sample, stage_parser("sample", __doc__), argv)


if __name__ == "__main__":
    main()
