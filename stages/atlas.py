"""DVC stage ``atlas``: concept naming, feature evolution, heatmaps + pointing game, figures and
the HTML feature atlas of every model (``reports/atlas/index.html``)."""

from __future__ import annotations

from pathlib import Path

from pipeline.atlas.build import build_atlas
from pipeline.config import load_params
from pipeline.runtime.cli import run_stage, stage_parser
from pipeline.runtime.tracking import stage_run


def atlas(args) -> None:
    params = load_params(args.params)
    out_dir = Path(params.atlas.out_dir)
    upstream = [Path(params.extract.out_dir) / v for v in params.atlas_variants()]
    with stage_run(params, "atlas", section=params.atlas.model_dump(mode="json"), upstream=upstream,
                   lineage_dir=out_dir) as run:
        summary = build_atlas(params)
        metrics_path = Path(params.metrics.out_dir) / "atlas.json"
        run.publish(summary, metrics_path)
        figures = [out_dir / v / f for v in params.atlas_variants() for f in summary[v]["figures"]]
        if summary["heatmap_panel"]:
            figures.append(Path(summary["heatmap_panel"]))
        run.log_outputs([metrics_path, out_dir / "index.html", *figures,
                         *(out_dir / v / "features.parquet" for v in params.atlas_variants())])
    for variant in params.atlas_variants():
        pointing = summary[variant].get("pointing", {})
        print(f"atlas[{variant}]: {summary[variant]['distinct_names']} distinct names, pointing game "
              f"{pointing.get('accuracy', float('nan')):.3f} (chance {pointing.get('chance', float('nan')):.3f})")
    print(f"atlas: open {out_dir / 'index.html'}")


def main(argv=None) -> None:
    run_stage(atlas, stage_parser("atlas", __doc__), argv)


if __name__ == "__main__":
    main()
