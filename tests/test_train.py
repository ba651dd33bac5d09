"""Ray Train on 2 CPU workers: the loss falls, snapshots are kept, and a worker that dies mid-run
is restarted from the latest checkpoint without losing or duplicating MLflow metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.clip.model import load_model
from pipeline.clip.recipe import evolution_steps, lr_at
from pipeline.clip.train import run_training
from pipeline.runtime.tracking import stage_run, tracking_uri

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


def test_two_workers_train_resume_after_a_failure_and_log_each_step_once(tiny_params, workdir, monkeypatch):
    """One run covers it all (Ray Train start-up costs ~20 s): rank 1 dies at step 5 once (the
    worker's fault injection, asked for through its loop config)."""
    from pipeline.clip import train

    marker = workdir / "failed-once"
    loop_config = train.worker_config
    with monkeypatch.context() as patch:
        patch.setattr(train, "worker_config", lambda *args: {
            **loop_config(*args), "fault": {"step": 5, "rank": 1, "marker": str(marker)}})
        with stage_run(tiny_params, "train", variant="sparse") as run:
            outcome = run_training(tiny_params, "sparse", run_id=run.run_id, tracking_uri=tracking_uri())
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

    # The same training, uninterrupted (another out_dir makes it another run): a resumed run skips the
    # batches its epoch had used (it once replayed the epoch's first ones), so it is this run bit for bit.
    plain = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(
        update={"out_dir": str(workdir / "models-uninterrupted")})})
    with stage_run(plain, "train", variant="sparse") as plain_run:
        uninterrupted = run_training(plain, "sparse", run_id=plain_run.run_id, tracking_uri=tracking_uri())
    assert [v for _, v in history(plain_run.run_id, "train/loss")] == [v for _, v in losses]
    resumed_state, plain_state = final.state_dict(), load_model(uninterrupted.model_dir).state_dict()
    assert all(torch.equal(resumed_state[k], plain_state[k]) for k in plain_state), "the weights differ"


def test_a_killed_train_stage_resumes_from_its_checkpoint_in_the_same_mlflow_run(workdir, ray_local):
    """SIGKILL of the whole stage process (the driver, as a killed `dvc repro` does it) after a
    checkpoint, then a rerun: the training resumes from that checkpoint under the same Ray run
    name, logs into the killed MLflow run (each step once), and nothing stays RUNNING or on disk."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from .conftest import REPO

    params = sampled_tiny_params(workdir, {"train.epochs": 12, "train.checkpoint_every": 2, "train.num_workers": 1,
                                           "train.threads_per_worker": 1})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "stages.train", "sparse", "--params", "params.yaml"]
    with open(workdir / "first.log", "w") as out:
        first = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    storage, deadline = workdir / "ray_results", time.time() + 300

    def registered() -> bool:  # Ray Train has recorded a checkpoint it can restore
        return any("checkpoint_" in p.read_text() for p in storage.glob("sparse-*/checkpoint_manager_snapshot.json"))

    while not registered():
        assert first.poll() is None, (workdir / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.2)
    time.sleep(0.5)  # let it log a few more steps than the checkpoint holds
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()

    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(params.project.experiment).experiment_id
    [killed] = client.search_runs([experiment], "attributes.status = 'RUNNING'")
    second = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # Ray Train's INFO lines (two long ones per checkpoint) stay off the console
    console = second.stdout + second.stderr
    assert "Checkpoint successfully created" not in console and "Reporting training result" not in console

    runs = client.search_runs([experiment], "tags.stage = 'train'")
    assert [(r.info.run_id, r.info.status) for r in runs] == [(killed.info.run_id, "FINISHED")]
    assert int(runs[0].data.tags["resumed_from_step"]) >= 1  # not a restart from step 0
    total = json.loads((workdir / "metrics" / "train" / "sparse.json").read_text())["total_steps"]
    assert [s for s, _ in history(killed.info.run_id, "train/loss")] == list(range(1, total + 1))
    assert not any(storage.iterdir()), "checkpoints left behind"


def test_orphaned_runs_are_closed_and_a_matching_one_is_continued(workdir):
    """Runs a dead process left RUNNING on this host are KILLED at the next start of that stage,
    except the one with the same resume key, which the new execution continues; a run of a live
    process (a parallel worker) is left alone."""
    import subprocess
    import sys

    from mlflow.entities import RunStatus

    from pipeline.config import load_params
    from pipeline.runtime.tracking import close_orphans, experiment_id

    from .conftest import REPO

    params = load_params(REPO / "params.yaml")
    client = MlflowClient(tracking_uri())
    experiment = experiment_id(client, params.project.experiment)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        def running(pid, key):
            tags = {"stage": "train", "variant": "sparse", "host": socket.gethostname(), "pid": str(pid),
                    "resume_key": key}
            return client.create_run(experiment, tags=tags).info.run_id

        old, matching, live = running(dead, "a"), running(dead, "b"), running(alive.pid, "b")
        assert close_orphans(client, experiment, "train", "sparse", resume_key="b") == matching
        status = {r: client.get_run(r).info.status for r in (old, matching, live)}
        assert status == {old: RunStatus.to_string(RunStatus.KILLED), matching: "RUNNING", live: "RUNNING"}
        with stage_run(params, "train", variant="sparse", resume_key="b") as run:
            assert run.run_id == matching
        assert client.get_run(matching).info.status == "FINISHED"
        assert client.get_run(live).info.status == "RUNNING"
    finally:
        alive.kill()


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
