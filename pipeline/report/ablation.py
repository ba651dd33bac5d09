"""The Fig 2 ablation in the report: the sweep's DVC output, or the latest FINISHED ``ablation`` run.

The sweep (:mod:`pipeline.clip.ablation`) is one run of its own, not a model, so it is not a row of the
model tables: its figures are fetched from the run's artifacts and its seed means become one table
(panel, line, x: L0 of the image and text embeddings, accuracy, dead features), followed by the
plain yes/no of each of the paper's observations.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from pipeline.report.tables import Table, fmt

ARTIFACTS = "outputs/plots/ablation"


@dataclass
class Ablation:
    """What the report shows of the ablation run: its table, its figures (copied beside the report)
    and its trend checks (the Fig 2 claims' evidence)."""

    table: Table | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)


def latest_ablation_run(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED' and tags.stage = 'ablation'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def fetch_ablation(client: MlflowClient, experiment: str, out_dir: str | Path,
                   sweep_dir: str | Path | None = None) -> Ablation:
    """The sweep's table, figures (copied into ``out_dir``) and checks: from its DVC output
    ``sweep_dir`` (``ablation.out_dir``, checked out) when it holds them, else from the latest
    ablation run of the experiment; an empty :class:`Ablation` when there is neither."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("ablation_*.png"):
        stale.unlink()
    if sweep_dir is not None and (Path(sweep_dir) / "points.json").is_file():
        return _from_folder(Path(sweep_dir), out_dir, f"{Path(sweep_dir).as_posix()}/")
    run = latest_ablation_run(client, experiment)
    if run is None:
        return Ablation()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(client.download_artifacts(run.info.run_id, ARTIFACTS, tmp))
        except Exception:  # an ablation run without the artifacts (e.g. logged elsewhere): leave it out
            return Ablation()
        return _from_folder(local, out_dir, f"run {run.info.run_id[:8]}")


def _from_folder(folder: Path, out_dir: Path, origin: str) -> Ablation:
    figures = {f"ablation_{png.stem}": Path(shutil.copy(png, out_dir / f"ablation_{png.name}"))
               for png in sorted(folder.glob("fig2*.png"))}
    points = json.loads((folder / "points.json").read_text()) if (folder / "points.json").is_file() else {}
    return Ablation(ablation_table(points, origin), figures, dict(points.get("checks", {})))


def ablation_table(points: dict[str, Any], origin: str) -> Table:
    rows = []
    for panel, lines in points.get("summary", {}).items():
        for label, entries in lines.items():
            for row in entries:
                rows.append([panel, label, f"{row['x']:g}", str(row["width"]),
                             _mean_std(row, "train/l0_image_pct"), _mean_std(row, "train/l0_text_pct"),
                             _mean_std(row, "accuracy", 100.0), _mean_std(row, "train/dead_fraction", 100.0),
                             str(len(row.get("seeds", [])))])
    checks = ", ".join(f"{k}: {v if isinstance(v, bool) else fmt(v, 'num')}"
                       for k, v in points.get("checks", {}).items())
    note = (f"Fig 2 ablation ({origin}): seed mean ± std at the last step; x is the expansion "
            f"(2a), the activation (2b) or the logit scale cap (2c). Observations: {checks or 'none'}.")
    return Table("ablation", "Small-scale ablation (Fig 2a-c)", note,
                 ["panel", "line", "x", "width", "L0 image %", "L0 text %", "zero-shot top-1 %", "dead %", "seeds"],
                 rows)


def _mean_std(row: dict[str, Any], key: str, scale: float = 1.0) -> str:
    if key not in row:
        return "–"
    return f"{row[key]['mean'] * scale:.1f} ± {row[key]['std'] * scale:.1f}"
