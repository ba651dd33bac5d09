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


# A test that needs one of these runs real Ray (a local cluster, Ray Data, Ray Train), a DVC
# repository, the warm-stage server (test_stage_server's `server`), headless Chromium (test_atlas's
# `browser`) or the packaged language model (test_vlm's `tokenizer`), which costs seconds to minutes:
# it is an `integration` test, whether or not it says so, and `pytest -m "not integration"` leaves it out.
INTEGRATION_FIXTURES = {"ray_local", "repo_copy", "extracted", "dvc_repo", "server", "browser", "tokenizer"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def outputs_may_go_to_temp_folders(tmp_path_factory):
    """Tests write their outputs under pytest's temporary folders, outside the project that the
    params' output folders must otherwise lie in (pipeline.config.OUTPUT_ROOTS_ENV)."""
    from pipeline.config import OUTPUT_ROOTS_ENV

    os.environ[OUTPUT_ROOTS_ENV] = str(tmp_path_factory.getbasetemp())
    yield
    os.environ.pop(OUTPUT_ROOTS_ENV, None)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session (starting Ray costs seconds)."""
    import ray

    from pipeline.config import RayParams
    from pipeline.runtime.cluster import connect

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


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, ray_local):
    """A sampled dataset, a tiny random sparse model (with two evolution snapshots) and a dense
    one, extracted with 2 actors, plus vocabulary and reference embeddings: what every stage
    after training reads, built once per session."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipeline.activations.extract import run_extraction
    from pipeline.activations.reference import run_reference
    from pipeline.clip.model import build_model, save_model
    from pipeline.config import ExtractParams, RayParams, ReferenceParams, load_params
    from pipeline.data.concepts import concept_words
    from pipeline.data.sampling import run_sample
    from pipeline.data.shards import read_split
    from pipeline.vocab import merge

    from .test_model_loss import MICRO

    tiny = {**MICRO, "text_cfg": {**MICRO["text_cfg"], "vocab_size": 49408}}
    root = tmp_path_factory.mktemp("extract")
    params = load_params(REPO / "params.yaml", overrides={
        "sample.source.generator.num_records": 120, "sample.shard_size": 40, "sample.out_dir": str(root / "data"),
    })
    run_sample(params.sample, RayParams(num_cpus=2))
    vocab = root / "vocab"
    vocab.mkdir()
    words = merge(concept_words(), ["dog", "cat", "sun"])
    (vocab / "words.txt").write_text("\n".join(words) + "\n")
    sbert = np.random.default_rng(0).normal(size=(len(words), 16)).astype(np.float32)
    pq.write_table(pa.table({"word": words, "embedding": pa.array(list(sbert), pa.list_(pa.float32()))}),
                   vocab / "sbert.parquet")
    folder = root / "imagenet_layout"  # class-named subfolders, as ImageNet-val is laid out
    for record in list(read_split(root / "data", "train"))[:12]:
        main = record.meta["truth"]["objects"][record.meta["truth"]["main"]]
        (folder / main["shape"]).mkdir(parents=True, exist_ok=True)
        (folder / main["shape"] / f"{record.key}.jpg").write_bytes(record.jpeg)
    extract = ExtractParams(actors=2, batch_size=16, token_sample=4, labelled_folders={"shapes": str(folder)})
    out = {}
    for name, expansion, activation in [("sparse", 8, "relu"), ("dense", 0, "none")]:
        torch.manual_seed(0)
        model = build_model(params.train.model.model_copy(update={"inline": tiny, "expansion": expansion,
                                                                  "activation": activation}))
        save_model(model, root / "models" / name)
        if expansion:  # an early snapshot (another init) and the final one, as training exports them
            (root / "models" / name / "evolution").mkdir()
            torch.save(build_model(model.params).state_dict(), root / "models" / name / "evolution" / "1pct.pt")
            torch.save(model.state_dict(), root / "models" / name / "evolution" / "100pct.pt")
        manifest = run_extraction(root / "models" / name, root / "data", vocab, root / "acts" / name, extract,
                                  0.25, "test")
        out[name] = (model.eval(), manifest)
    reference = ReferenceParams(image_size=64, batch_size=32, out_dir=str(root / "reference"))
    run_reference(reference, extract, root / "data", 0.25, "test")
    return root, params, out
