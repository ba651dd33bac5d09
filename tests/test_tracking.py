"""A stage run lands in the MLflow store with tags, params, metrics, artifacts and lineage."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_params
from pipeline.runtime.tracking import (
    LINEAGE_FILE,
    SMALL_ARTIFACT_BYTES,
    numbers_of,
    stage_run,
    tracking_uri,
)

from .conftest import REPO


def test_stage_run_is_queryable_with_everything_it_logged(workdir):
    params = load_params(REPO / "params.yaml")
    (workdir / "up").mkdir()
    (workdir / "up" / LINEAGE_FILE).write_text(json.dumps({"stage": "sample", "variant": None, "run_id": "abc"}))
    out = workdir / "out"
    out.mkdir()
    (out / "small.json").write_text('{"a": 1}')
    (out / "big.bin").write_bytes(b"\0" * (SMALL_ARTIFACT_BYTES + 1))

    with stage_run(params, "sample", section=params.sample.model_dump(mode="json"),
                   upstream=[workdir / "up"], lineage_dir=out) as run:
        for step in range(3):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        run.log_metrics({"final": {"acc": 0.5}})
        run.log_outputs([out / "small.json", out / "big.bin"])

    client = MlflowClient(tracking_uri())
    assert tracking_uri().startswith("sqlite:///") and (workdir / "mlflow.db").is_file()
    [found] = client.search_runs(
        [client.get_experiment_by_name("sparseclip").experiment_id], "tags.stage = 'sample'"
    )
    assert found.info.status == "FINISHED"
    assert found.data.tags["params_hash"] == params.section_hash("sample")
    assert found.data.tags["upstream.sample"] == "abc" and found.data.tags["git_commit"]
    assert found.data.params["source.generator.num_records"] == str(params.sample.source.generator.num_records)
    assert [m.value for m in client.get_metric_history(found.info.run_id, "loss")] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert found.data.metrics["final.acc"] == 0.5
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id, "outputs/out")}
    assert artifacts == {"outputs/out/small.json"}  # the large file is indexed, not copied
    index = json.loads(open(client.download_artifacts(found.info.run_id, "outputs/index.json")).read())
    big = next(f for f in index["files"] if f["path"].endswith("big.bin"))
    assert big["bytes"] == SMALL_ARTIFACT_BYTES + 1 and len(big["sha256"]) == 64
    lineage = json.loads((out / LINEAGE_FILE).read_text())
    assert lineage["run_id"] == found.info.run_id and lineage["upstream"] == {"sample": "abc"}


def test_numbers_of_keeps_numbers_and_booleans_under_dotted_keys():
    results = {"l0": 3, "clarity": 0.5, "ok": True, "name": "sparse", "none": None, "curve": [1, 2],
               "zeroshot": {"colour": {"top1": 0.8}, "labels": ["red"]}}
    assert numbers_of(results) == {"l0": 3, "clarity": 0.5, "ok": True, "zeroshot.colour.top1": 0.8}


def test_publish_writes_the_metrics_file_and_logs_the_same_numbers(workdir):
    params = load_params(REPO / "params.yaml")
    results = {"image": {"l0": 12, "dead_fraction": 0.25}, "check": False, "variant": "sparse",
               "nan": float("nan")}
    with stage_run(params, "metrics", variant="sparse", lineage_dir=workdir / "out") as run:
        numbers = run.publish(results, workdir / "metrics" / "sparse.json")
        run_id = run.run_id
    written = json.loads((workdir / "metrics" / "sparse.json").read_text())
    assert written.keys() == numbers.keys() == {"image.l0", "image.dead_fraction", "check", "nan"}
    assert written["check"] is False and written["image.l0"] == 12
    logged = MlflowClient(tracking_uri()).get_run(run_id).data.metrics
    assert logged == {"image.l0": 12.0, "image.dead_fraction": 0.25, "check": 0.0}  # NaN is not logged


def test_failed_stage_is_marked_failed(workdir):
    params = load_params(REPO / "params.yaml")
    with pytest.raises(RuntimeError):
        with stage_run(params, "train", variant="sparse", lineage_dir=workdir / "out"):
            raise RuntimeError("boom")
    client = MlflowClient(tracking_uri())
    [found] = client.search_runs([client.get_experiment_by_name("sparseclip").experiment_id])
    assert found.info.status == "FAILED" and found.data.tags["variant"] == "sparse"
    assert not (workdir / "out" / LINEAGE_FILE).exists()


def test_an_unreachable_tracking_server_fails_a_stage_in_seconds_with_one_line(workdir, monkeypatch, capsys):
    """MLflow's client retries a dead server for ~4 minutes and ends in a traceback; a stage
    checks the server's health first and exits 2 naming it (``--debug`` re-raises)."""
    import socket
    import time

    from pipeline.runtime.tracking import TrackingUnreachable, require_reachable
    from stages.vocab import main

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        main(["--params", str(REPO / "params.yaml")])
    assert exit_.value.code == 2 and time.monotonic() - started < 30
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"python -m stages.vocab: error: MLflow server http://127.0.0.1:{port} does not answer "
                     "([Errno 111] Connection refused): start it, or unset MLFLOW_TRACKING_URI to use the local "
                     "sqlite store"]
    with pytest.raises(TrackingUnreachable):
        main(["--params", str(REPO / "params.yaml"), "--debug"])
    require_reachable("sqlite:///anything.db")  # local stores are not probed


def test_a_healthy_tracking_server_passes_the_check():
    import http.server
    import threading

    from pipeline.runtime.tracking import require_reachable

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        require_reachable(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
