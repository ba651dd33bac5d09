"""`dvc repro` in a fresh copy of the repository: the stages run, and an unrelated change reruns nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def set_params(repo: Path, **dotted) -> None:
    path = repo / "params.yaml"
    tree = yaml.safe_load(path.read_text())
    for key, value in dotted.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def test_repro_sample_then_unrelated_change_reruns_nothing(repo_copy):
    set_params(repo_copy, **{"sample.source.generator.num_records": 120, "sample.shard_size": 50})
    dvc(repo_copy, "repro", "sample")
    manifest = json.loads((repo_copy / "data/sample/manifest.json").read_text())
    assert manifest["written"] == 120
    assert json.loads((repo_copy / "metrics/sample.json").read_text())["records_written"] == 120
    client = MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("sparseclip").experiment_id])
    assert run.data.tags["stage"] == "sample" and run.data.metrics["records_written"] == 120

    set_params(repo_copy, **{"project.seed": 7})
    assert "didn't change" in dvc(repo_copy, "repro", "sample")
    set_params(repo_copy, **{"sample.seed": 1})
    assert "Running stage 'sample'" in dvc(repo_copy, "repro", "sample")
