"""Ray Train on 2 CPU workers: the loss falls, snapshots are kept, and a worker that dies mid-run
is restarted from the latest checkpoint without losing or duplicating MLflow metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.clip.model import load_model
from pipeline.clip.train import evolution_steps, lr_at, run_training
from pipeline.tracking import stage_run, tracking_uri

from .tiny import sampled_tiny_params


@pytest.fixture
def tiny_params(workdir, ray_local):
    return sampled_tiny_params(workdir)


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(tracking_uri()).get_metric_history(run_id, key)]


def test_schedule_and_snapshot_steps():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)
    assert evolution_steps([0.01, 0.03, 0.1, 0.3, 1.0], 250) == {2: [0.01], 8: [0.03], 25: [0.1], 75: [0.3],
                                                                250: [1.0]}
    assert evolution_steps([0.01, 0.03, 0.1, 0.3, 1.0], 12) == {1: [0.01, 0.03, 0.1], 4: [0.3], 12: [1.0]}


def test_cached_workers_decode_disjoint_equal_slices_of_the_split_in_a_fixed_order(workdir):
    """The cached path's data: world workers each decode rows rank, rank + world, ... (together
    every row once, equal within one), the same rows on every call whatever the scheduling."""
    import numpy as np

    from pipeline.data.generator import render_record
    from pipeline.data.loading import ClipBatchPreprocessor, load_split_arrays
    from pipeline.data.records import Record
    from pipeline.data.shards import read_split, write_shard

    records = [Record(f"{i:04d}", (r := render_record(i, 0)).jpeg, r.caption) for i in range(11)]
    write_shard(records[:6], workdir / "train" / "shard-00000.tar")
    write_shard(records[6:], workdir / "train" / "shard-00001.tar")
    pre = ClipBatchPreprocessor(32, 16)
    whole, _ = load_split_arrays(workdir, "train", pre)
    parts = [load_split_arrays(workdir, "train", pre, part=(rank, 3))[0] for rank in range(3)]
    assert [len(p["text"]) for p in parts] == [4, 4, 3]
    for rank, part in enumerate(parts):
        assert np.array_equal(part["text"], whole["text"][rank::3])
        assert np.array_equal(part["image"], whole["image"][rank::3])
    assert np.array_equal(load_split_arrays(workdir, "train", pre, part=(1, 3))[0]["image"], parts[1]["image"])
    assert len(list(read_split(workdir, "train"))) == 11
    with pytest.raises(ValueError, match="rank"):
        load_split_arrays(workdir, "train", pre, part=(3, 3))


def test_two_workers_train_resume_after_a_failure_and_log_each_step_once(tiny_params, workdir):
    """One run covers it all (Ray Train start-up costs ~20 s): rank 1 dies at step 5 once."""
    marker = workdir / "failed-once"
    with stage_run(tiny_params, "train", variant="sparse") as run:
        outcome = run_training(tiny_params, "sparse", run_id=run.run_id, tracking_uri=tracking_uri(),
                               fail_once={"step": 5, "rank": 1, "marker": str(marker)})
    assert marker.exists(), "the injected failure did not happen"
    losses = history(run.run_id, "train/loss")
    steps = [s for s, _ in losses]
    assert steps == list(range(1, outcome.total_steps + 1)), "a step was lost or logged twice"
    first, last = losses[0][1], sum(v for _, v in losses[-3:]) / 3
    assert last < first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert all(0 < v < 100 for _, v in history(run.run_id, "train/l0_image_pct"))
    assert all(v <= 50 + 1e-3 for _, v in history(run.run_id, "train/logit_scale"))

    assert [(w["rank"], w["device"], w["backend"], w["autocast"]) for w in outcome.workers] == [
        (0, "cpu", "gloo", None), (1, "cpu", "gloo", None)]

    model_dir = outcome.model_dir
    names = {p.name for p in (model_dir / "evolution").iterdir()}
    assert names == {"1pct.pt", "3pct.pt", "10pct.pt", "30pct.pt", "100pct.pt"}
    state = torch.load(model_dir / "evolution" / "1pct.pt", weights_only=True)
    final = load_model(model_dir)
    assert not torch.equal(state["image_head.linear.weight"], final.state_dict()["image_head.linear.weight"])
    assert math.isclose(final.logit_scale_max, math.log(50))
    assert not (workdir / "ray_results").exists() or not any((workdir / "ray_results").iterdir())


@pytest.mark.slow
@pytest.mark.flickr
def test_flickr_photos_train_by_params_override(workdir, ray_local, flickr_dir):
    """Real photos through sample + train: only the source params change; streamed batches (no
    in-memory cache: what data larger than memory uses), float16 in transit, float32 in the model."""
    params = sampled_tiny_params(workdir, {
        "sample.source.kind": "csv",
        "sample.source.path": str(flickr_dir / "captions.csv"),
        "sample.source.image_root": str(flickr_dir / "images"),
        "sample.n": 400,
        "sample.shard_size": 200,
        "train.epochs": 2,
        "train.cache_data": False,
    })
    manifest = json.loads((workdir / "data" / "manifest.json").read_text())
    assert manifest["written"] > 390 and manifest["eval_sets"]["zeroshot_tasks"] == []
    with stage_run(params, "train", variant="sparse") as run:
        outcome = run_training(params, "sparse", run_id=run.run_id, tracking_uri=tracking_uri())
    losses = history(run.run_id, "train/loss")
    assert len(losses) == outcome.total_steps and all(math.isfinite(v) for _, v in losses)
    assert (outcome.model_dir / "model.pt").is_file()
