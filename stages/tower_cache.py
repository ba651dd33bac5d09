"""DVC stage ``tower_cache``: the locked towers' outputs for every image and caption, encoded once."""

from __future__ import annotations

from pipeline.activations.tower_cache import run_feature_cache
from pipeline.config import load_params
from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.runtime.cluster import connect
from pipeline.runtime.tracking import stage_run


def tower_cache(args) -> None:
    params = load_params(args.params)
    cfg = params.train
    section = {"model": cfg.model.model_dump(mode="json"), "feature_cache": cfg.feature_cache}
    with stage_run(params, "tower_cache", section=section, upstream=[params.sample.out_dir],
                   lineage_dir=cfg.feature_cache_dir) as run:
        if cfg.feature_cache:
            connect(params.ray)
        manifest = run_feature_cache(cfg.model, params.sample.out_dir, cfg.feature_cache_dir, params.extract,
                                     params.ray.task_cpus, enabled=cfg.feature_cache)
        run.publish({"cached": int(manifest["cached"]), **{f"rows_{k}": v for k, v in manifest.get("rows", {}).items()}})
        run.log_outputs([f"{cfg.feature_cache_dir}/manifest.json"])
    print(f"tower_cache: {manifest['rows'] if manifest['cached'] else 'nothing cached: ' + manifest['why']} "
          f"-> {cfg.feature_cache_dir}")


def main(argv=None) -> None:
    run_stage(tower_cache, stage_parser("tower_cache", __doc__), argv)


if __name__ == "__main__":
    main()
