"""The Flickr8k preset's numbers, collected from a finished run of it into one committed JSON.

``make pipeline-flickr8k`` runs ``deploy/params.flickr8k.yaml`` in its own workspace; this reads
that workspace's metrics files (per model: retrieval R@1/5/10 both ways, tagging AUROC, L0 and dead
per tower, Clarity and its reference; naming agreement from the atlas; the VLM's answers on the
sparse encoder against chance, and the settings of its stages), its MLflow runs (how long
each stage took, so the time can be read where it goes) and its extracted activations (each sparse
model's test R@k minus dense's on the same queries, with a paired bootstrap interval over the test
photos: is a gap of a few points the model or the photos the split drew?), and writes
``benchmarks/results/flickr8k_preset.json``.

    time make pipeline-flickr8k        # note the wall time
    python -m benchmarks.flickr8k_preset --workspace ../main-flickr8k --wall-seconds 1700
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import yaml

RESULTS = Path(__file__).parent / "results"

PER_MODEL = {
    "image_retrieval_r1": "retrieval.image_retrieval_r1", "image_retrieval_r5": "retrieval.image_retrieval_r5",
    "image_retrieval_r10": "retrieval.image_retrieval_r10", "text_retrieval_r1": "retrieval.text_retrieval_r1",
    "text_retrieval_r5": "retrieval.text_retrieval_r5", "text_retrieval_r10": "retrieval.text_retrieval_r10",
    "tagging_auroc": "tagging.auroc", "tags": "tagging.tags",
    "l0_image_pct": "image.l0_pct", "l0_text_pct": "text.l0_pct",
    "dead_image": "image.dead_fraction", "dead_text": "text.dead_fraction",
    "clarity": "clarity", "clarity_baseline": "clarity_baseline",
}


def model_rows(workspace: Path, variants: list[str]) -> dict[str, dict[str, Any]]:
    atlas = _json(workspace / "metrics" / "atlas.json")
    rows = {}
    for variant in variants:
        metrics = _json(workspace / "metrics" / f"{variant}.json")
        row = {name: metrics.get(key) for name, key in PER_MODEL.items()}
        row["naming_agreement"] = atlas.get(f"{variant}.caption_naming.agreement")
        row["naming_chance"] = atlas.get(f"{variant}.caption_naming.chance")
        rows[variant] = row
    return rows


def vlm_answers(workspace: Path, vlm_params: dict[str, Any]) -> dict[str, Any]:
    """The VLM stage's scores per encoder and question type (exact match, its chance, the p-value
    of beating chance, SBERT similarity, questions), with the settings of its training stages."""
    stages = {key: vlm_params.get(key) for key in ("stage0_steps", "stage1_steps", "stage2_steps", "batch_size")}
    scores = _json(workspace / "metrics" / "vlm.json")
    return {"settings": stages, **{encoder: _nested(values) for encoder, values in scores.items()}}


def _nested(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"subject.exact": 0.3} -> {"subject": {"exact": 0.3}}."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        question, _, name = key.partition(".")
        out.setdefault(question, {})[name] = value
    return out


def retrieval_against_dense(activations: Path, variants: list[str], ks: tuple[int, ...] = (1, 5, 10),
                            ) -> dict[str, dict[str, Any]]:
    """Per sparse variant and direction, R@k minus dense's on the same test queries, with its 95%
    paired-bootstrap interval over test photos (:func:`pipeline.metrics.recall_difference`)."""
    from pipeline import metrics as M
    from pipeline.activations.store import ActivationSet
    from pipeline.metrics.evaluate import test_retrieval_split

    def queries(variant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        acts = ActivationSet(activations / variant)
        images, texts, owner = test_retrieval_split(*acts.load("images"), *acts.load("texts"))
        caption_ranks, image_ranks = M.retrieval_ranks(images, texts, owner)
        return caption_ranks, image_ranks, owner

    dense_captions, dense_images, owner = queries("dense")
    photos = {"image_retrieval": owner, "text_retrieval": np.unique(owner)}  # caption queries; image queries
    out = {}
    for variant in (v for v in variants if v != "dense"):
        caption_ranks, image_ranks, variant_owner = queries(variant)
        if not np.array_equal(variant_owner, owner):
            raise ValueError(f"{variant} and dense were extracted from different test sets")
        ranks = {"image_retrieval": (caption_ranks, dense_captions), "text_retrieval": (image_ranks, dense_images)}
        out[variant] = {f"{direction}_r{k}": M.recall_difference(mine < k, theirs < k, photos[direction])
                        for direction, (mine, theirs) in ranks.items() for k in ks}
    return out


def stage_seconds(workspace: Path, experiment: str) -> dict[str, float]:
    """Seconds per stage (summed over its variants) from the workspace's MLflow runs."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    seconds: dict[str, float] = {}
    for run in client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=1000):
        stage = run.data.tags.get("stage", "?")
        seconds[stage] = seconds.get(stage, 0.0) + (run.info.end_time - run.info.start_time) / 1000
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flickr8k_preset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, help="the preset's workspace, after `make pipeline-flickr8k`")
    parser.add_argument("--wall-seconds", type=float, help="the whole run's wall time (e.g. from `time make ...`)")
    args = parser.parse_args(argv)
    workspace = Path(args.workspace).resolve()
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    variants = list(params["train"]["variants"])
    reference = params["reference"]
    out = {
        "command": "time make pipeline-flickr8k; python -m benchmarks.flickr8k_preset --workspace ../main-flickr8k",
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores",
        "wall_seconds": args.wall_seconds,
        "stage_seconds": stage_seconds(workspace, params["project"]["experiment"]),
        "clarity_reference": f"{reference['encoder']} at {reference['image_size']} px",
        "towers": params["train"]["model"]["towers"],
        "models": model_rows(workspace, variants),
        "against_dense": retrieval_against_dense(workspace / "activations", variants) if "dense" in variants else {},
        "vlm": vlm_answers(workspace, params.get("vlm", {})),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "flickr8k_preset.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["models"], indent=2))
    print(f"-> {path}")


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run the preset first (make pipeline-flickr8k)")
    return json.loads(path.read_text())


if __name__ == "__main__":
    main()
