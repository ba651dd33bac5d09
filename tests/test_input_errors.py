"""Bad input that used to end in a traceback (issue 27, item 7): each CLI now ends it with one
line on stderr naming what is wrong and where, exit status 2; a file in a labelled image folder
that is not an image is skipped with a warning naming it, as the sample stage skips one."""

from __future__ import annotations

import http.server
import io
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` as a user runs it, in ``cwd`` with its own embedded MLflow store."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def error_line(stderr: str, prog: str) -> str:
    """The CLI's one error line: the last line of stderr, the only one that is an error (log lines
    may come before it), and no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith(f"{prog}: error: ")] == lines[-1:], stderr
    return lines[-1]


def expect_exit_2(main, argv: list[str], capsys, prog: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return error_line(capsys.readouterr().err, prog)


# --------------------------------------------------------------------------- report


@pytest.mark.integration
def test_report_names_an_unknown_run_id(tmp_path):
    run_id = "0123456789abcdef0123456789abcdef"
    done = run_cli(tmp_path, "stages", "report", "--params", str(REPO / "params.yaml"), "--runs", run_id,
                   "--no-mlflow")
    assert done.returncode == 2
    assert f"no MLflow run with id {run_id!r} in sqlite:///" in error_line(done.stderr, "python -m stages.report")


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    """An empty git + DVC repository: `dvc exp show` answers, with no experiments."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    return repo


QUOTED = "it's \"v2\""  # a valid git ref, so a valid `dvc exp run -n` name


def test_report_names_an_unknown_dvc_experiment_whose_name_has_quotes(dvc_repo, workdir):
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_params
    from pipeline.runtime.tracking import tracking_uri

    # with the experiment present, the name reached MLflow's filter parser, which threw
    MlflowClient(tracking_uri()).create_experiment(load_params(REPO / "params.yaml").project.experiment)
    done = run_cli(workdir, "stages", "report", "--params", str(REPO / "params.yaml"), "--dvc-exps", QUOTED,
                   "--repo", str(dvc_repo), "--no-mlflow")
    assert done.returncode == 2
    assert f"no DVC experiment or MLflow runs named {QUOTED!r}" in error_line(done.stderr, "python -m stages.report")


def test_runs_of_a_dvc_experiment_whose_name_has_quotes_are_found(dvc_repo, workdir, monkeypatch):
    """The mechanism, not only the message: a name holding both quotes matches its runs."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_params
    from pipeline.report.sources import from_dvc_exps
    from pipeline.runtime.tracking import stage_run, tracking_uri

    params = load_params(REPO / "params.yaml")
    for tag, loss in ((QUOTED, 1.0), ("other", 2.0)):
        monkeypatch.setenv("DVC_EXP_NAME", tag)  # what `dvc exp run` sets, and stage_run tags as dvc_exp
        with stage_run(params, "train", variant="sparse") as run:
            run.log_metrics({"train/loss": loss})
    comparison = from_dvc_exps(MlflowClient(tracking_uri()), params.project.experiment, [QUOTED], dvc_repo)
    [model] = comparison.models
    assert (model.source, model.value("train", "train.loss")) == (QUOTED, 1.0)


# --------------------------------------------------------------------------- submit and the job driver


def test_submit_names_an_address_that_is_no_url(capsys):
    from pipeline.runtime.submit import main

    line = expect_exit_2(main, ["--address", "not-a-url", "--project", str(REPO), "--no-wait"], capsys,
                         "python -m pipeline.runtime.submit")
    assert line.startswith("python -m pipeline.runtime.submit: error: no Ray Jobs API at not-a-url (")


class _NotRay(http.server.BaseHTTPRequestHandler):
    """A web server that is not Ray's dashboard: a page for every path, or a 404 for every path."""

    status = 200

    def do_GET(self):
        body = b"<html><body>some other web app</body></html>"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [200, 404])
def test_submit_names_an_address_that_answers_http_but_is_not_ray(capsys, status):
    from pipeline.runtime.submit import main

    handler = type("Handler", (_NotRay,), {"status": status})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        address = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            line = expect_exit_2(main, ["--address", address, "--project", str(REPO), "--no-wait"], capsys,
                                 "python -m pipeline.runtime.submit")
        finally:
            server.shutdown()
    assert line.startswith(f"python -m pipeline.runtime.submit: error: no Ray Jobs API at {address} (")


BAD_YAML = "train:\n  variants: {sparse: [1, 2}\n"


def test_submit_names_a_params_override_that_is_not_yaml(capsys, tmp_path):
    from pipeline.runtime.submit import main

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    (project / "override.yaml").write_text(BAD_YAML)
    line = expect_exit_2(main, ["--project", str(project), "--params-override", "override.yaml", "--dry-run"],
                         capsys, "python -m pipeline.runtime.submit")
    assert "override.yaml: not valid YAML: " in line and "line 2, column " in line


def test_the_job_driver_names_a_params_override_that_is_not_yaml(capsys, tmp_path):
    from pipeline.runtime.job import main

    (tmp_path / "override.yaml").write_text(BAD_YAML)
    line = expect_exit_2(main, ["--workspace", str(tmp_path / "ws"), "--params-override",
                                str(tmp_path / "override.yaml")], capsys, "python -m pipeline.runtime.job")
    assert "override.yaml: not valid YAML: " in line and "line 2, column " in line
    assert not (tmp_path / "ws").exists()  # refused before anything was copied


# --------------------------------------------------------------------------- labelled image folders


def _jpeg(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def folder_with_bad_files(tmp_path) -> tuple[Path, set[str]]:
    """An ImageNet-layout folder with two good images, a text file named ``fake.jpg`` and a JPEG
    cut short; returns it and the keys of the good images."""
    folder = tmp_path / "labelled"
    for label, seed in (("circle", 0), ("square", 1)):
        (folder / label).mkdir(parents=True)
        (folder / label / "good.jpg").write_bytes(_jpeg(seed))
    (folder / "circle" / "fake.jpg").write_text("this is not an image\n")
    (folder / "square" / "cut.jpg").write_bytes(_jpeg(2)[:300])
    return folder, {"circle/good.jpg", "square/good.jpg"}


def test_a_labelled_folder_skips_files_that_are_not_images_and_names_them(folder_with_bad_files, caplog):
    from pipeline.activations.inputs import _read_path, folder_rows

    folder, good = folder_with_bad_files
    rows = folder_rows("shapes", folder)
    batch = {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}
    with caplog.at_level(logging.WARNING, logger="pipeline.activations.inputs"):
        out = _read_path(batch)
    assert set(out["key"]) == good and len(out["jpg"]) == len(out["label"]) == 2
    assert all(len(image) > 300 for image in out["jpg"])
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(folder / "circle" / "fake.jpg") in warned and str(folder / "square" / "cut.jpg") in warned


def test_extraction_of_a_labelled_folder_with_a_fake_image_encodes_the_real_ones(extracted, folder_with_bad_files,
                                                                                 tmp_path):
    """Through the real Ray Data run and encoding actors (the fake used to fail them with 107
    lines of traceback that named no file). The finished sets are copied, so only the new
    labelled set is encoded, and the shared fixture's outputs stay as they were."""
    from pipeline.activations.extract import run_extraction
    from pipeline.config import ExtractParams

    root, _, _ = extracted
    folder, good = folder_with_bad_files
    out = tmp_path / "acts"
    shutil.copytree(root / "acts" / "sparse", out)
    manifest = run_extraction(root / "models" / "sparse", root / "data", root / "vocab", out,
                              ExtractParams(actors=2, batch_size=16, token_sample=4,
                                            labelled_folders={"with_fake": str(folder)}), 0.25, "test")
    assert manifest["rows"]["labelled_with_fake"] == len(good)
