"""Shared fixtures: offline environment, one local Ray cluster per session, temp MLflow stores."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# The same hygiene as scripts/env.sh, for runs that bypass the Makefile.
for _key, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parent.parent
FLICKR = REPO.parent / "shared" / "data" / "flickr8k"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session (starting Ray costs seconds)."""
    import ray

    from pipeline.cluster import connect
    from pipeline.config import RayParams

    connect(RayParams(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder with its own embedded MLflow store, as a stage runs in the repo root."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def repo_copy(tmp_path):
    """A fresh git + DVC checkout of this repository's files (tracked and new, not ignored)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    dest = tmp_path / "repo"
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="session")
def flickr_dir():
    if not (FLICKR / "captions.csv").is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR}")
    return FLICKR
