"""The comparison report: tables from fabricated stage runs in a temp MLflow store, the report
stage's own MLflow run, and two real `dvc exp run` experiments compared with --dvc-exps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_params
from pipeline.report.sources import (
    Model,
    from_experiment,
    from_run_ids,
    models_from_metric_files,
)
from pipeline.report.tables import build_tables, clarity_reference, scale_at_cap, towers
from pipeline.runtime.tracking import stage_run, tracking_uri
from stages.report import main as report_main

from .conftest import REPO

METRICS = {  # what the metrics stage logs, per variant (keys of metrics/<variant>.json)
    "dense": {"width": 64, "image.l0": 64.0, "image.l0_pct": 100.0, "text.l0": 64.0, "image.active_fraction": 1.0,
              "image.dead_fraction": 0.0, "clarity": 0.49, "clarity_baseline": 0.485, "modality.multimodal": 0.97,
              "zeroshot.shape.top1": 0.128, "zeroshot.shape.top5": 0.66, "zeroshot.shape.chance": 0.136,
              "zeroshot.colour.top1": 0.793, "zeroshot.colour.chance": 0.132,
              "zeroshot.colour.top5": 0.997, "zeroshot.box_classification.top1": 0.111,
              "retrieval.image_retrieval_r1": 0.092, "retrieval.text_retrieval_r5": 0.249,
              "probe.shape.accuracy": 0.31, "probe.shape.chance": 0.15, "segmentation_probe.auroc": 0.71,
              "segmentation_probe.foreground_share": 0.4},
    "sparse": {"width": 2048, "image.l0": 921.4, "image.l0_pct": 45.0, "text.l0": 940.7, "image.active_fraction": 0.998,
               "image.dead_fraction": 0.0015, "clarity": 0.493, "clarity_baseline": 0.485, "modality.multimodal": 0.967,
               "zeroshot.shape.top1": 0.1257, "zeroshot.shape.top5": 0.628, "zeroshot.shape.chance": 0.136,
               "zeroshot.colour.top1": 0.801, "zeroshot.colour.chance": 0.132,
               "zeroshot.colour.top5": 0.992, "zeroshot.box_classification.top1": 0.118,
               "retrieval.image_retrieval_r1": 0.071, "retrieval.text_retrieval_r5": 0.251,
               "recovery.monosemantic_fraction": 0.014, "recovery.coverage": 0.182, "recovery.precise_fraction": 0.2,
               "recovery.split_coverage": 0.05, "recovery_main.monosemantic_fraction": 0.078,
               "recovery_main.coverage": 0.205, "recovery_main.precise_fraction": 0.25, "recovery_main.split_coverage": 0.1},
}


def log_run(params, stage, variant=None, metrics=None, curve=None, section=None):
    with stage_run(params, stage, variant=variant, section=section) as run:
        for step, values in (curve or {}).items():
            run.log_metrics(values, step=step)
        run.log_metrics(metrics or {})
    return run.run_id


@pytest.fixture
def pipeline_runs(workdir):
    """A finished pipeline's stage runs in a fresh store: train and metrics of two variants, the
    SAE, the atlas, a VLM and steering; plus an older train run and a failed one (both ignored)."""
    params = load_params(REPO / "params.yaml")
    ids = {"old": log_run(params, "train", "sparse", {"train/loss": 9.0})}
    for variant, cap in (("dense", 100), ("sparse", 50)):
        expansion = 0 if variant == "dense" else 32
        curve = {s: {"train/loss": 5 / s, "train/l0_image_pct": 100.0 if variant == "dense" else 60 - 5 * s,
                     "train/logit_scale": min(cap, 14.3 * s ** 1.5),
                     **({"zeroshot/shape/top1": 0.1 * s} if s % 2 == 0 else {})} for s in (1, 2, 3, 4)}
        ids[f"train-{variant}"] = log_run(params, "train", variant, curve=curve, section={"model": {
            "arch": None, "expansion": expansion, "activation": "relu", "pooling": "cls", "logit_scale_cap": cap,
            "init_logit_scale": 2.6592, "head_bias_init": -0.5}, "optim": {"head_lr_multiplier": 10.0, "lr": 1e-3}})
        ids[f"metrics-{variant}"] = log_run(params, "metrics", variant, METRICS[variant])
    log_run(params, "sae", "dense", {"width": 2048, "image.l0": 22.5, "clarity": 0.525, "reconstruction.all.fvu": 0.117,
                                     "zeroshot_reconstruction.shape.dense.top1": 0.128,
                                     "zeroshot_reconstruction.shape.sae_reconstruction.top1": 0.147,
                                     "multimodal.image.l0": 25.0, "multimodal.modality.multimodal": 0.4,
                                     "multimodal.reconstruction.all.fvu": 0.2,
                                     "residual.layer": 1, "residual.reconstruction.all.fvu": 0.31,
                                     "residual.reconstruction.all.n": 78000})
    log_run(params, "atlas", None, {"dense.pointing.accuracy": 0.167, "dense.pointing.chance": 0.126,
                                    "sparse.pointing.accuracy": 0.325, "sparse.pointing.chance": 0.126})
    log_run(params, "vlm", "sparse", {"qa.colour.exact": 0.594, "qa.colour.chance": 0.131,
                                       "qa.colour.sbert": 0.864})
    log_run(params, "steer", "sparse", {"colour.baseline.sim_true": 0.851, "colour.grid.k4_ss2.k": 4,
                                        "colour.grid.k4_ss2.strength": 2.0, "colour.grid.k4_ss2.sim_boosted": 0.661,
                                        "colour.grid.k16_ss5.k": 16, "colour.grid.k16_ss5.strength": 5.0,
                                        "colour.grid.k16_ss5.sim_boosted": 0.696,
                                        "colour.grid.k16_ss5.p_named_beats_random": 2.4e-6,
                                        "subject.grid.k4_ss2.k": 4, "subject.grid.k4_ss2.strength": 2.0,
                                        "subject.grid.k4_ss2.corruption": 0.25})
    with pytest.raises(RuntimeError), stage_run(params, "metrics", variant="sparse"):
        raise RuntimeError("a failed run is not a result")
    return params, ids


def table(tables, name):
    found = {t.name: t for t in tables}
    return found.get(name)


def test_tables_from_the_latest_finished_run_of_each_stage(pipeline_runs):
    params, ids = pipeline_runs
    comparison = from_experiment(MlflowClient(tracking_uri()), params.project.experiment)
    assert [m.name for m in comparison.models] == ["dense", "sae", "sae_multimodal", "sae_residual", "sparse"]
    sparse = comparison.models[4]
    assert sparse.run_ids["train"] == ids["train-sparse"] and sparse.run_ids["metrics"] == ids["metrics-sparse"]
    assert sparse.curves["train/l0_image_pct"] == [(1, 55.0), (2, 50.0), (3, 45.0), (4, 40.0)]

    tables = build_tables(comparison)
    assert table(tables, "zeroshot").header == ["model", "shape top-1", "shape chance", "colour top-1", "colour chance"]
    assert table(tables, "zeroshot").rows == [["dense", "12.8", "13.6", "79.3", "13.2"],
                                              ["sparse", "12.6", "13.6", "80.1", "13.2"]]
    assert table(tables, "probes").rows == [["dense", "31.0", "15.0", "0.710", "40.0"]]  # sparse has no probes
    box = table(tables, "box_retrieval").rows
    assert box[1][:2] == ["sparse", "11.8"] and box[1][3] == "7.1"
    sparsity = {row[0]: row for row in table(tables, "sparsity").rows}
    assert set(sparsity) == {"dense", "sae", "sae_multimodal", "sparse"}  # the SAEs sit beside the variants
    assert sparsity["sparse"][1:4] == ["2048", "921.4", "45.0"] and sparsity["sae"][7] == "0.525"
    assert sparsity["sae"][9] == "–" and sparsity["sae_multimodal"][9] == "40.0"  # image SAE: no modality score
    assert table(tables, "recovery").header[1:] == [f"{scope} · {what}" for scope in ("all objects", "main object")
                                                    for what in ("monosemantic %", "covered %", "precise %",
                                                                 "covered by precise %")]
    assert table(tables, "recovery").rows == [["sparse", "1.4", "18.2", "20.0", "5.0", "7.8", "20.5", "25.0", "10.0"]]
    assert [row[:2] for row in table(tables, "sae").rows] == [["sae", "0.117"], ["sae_multimodal", "0.200"],
                                                             ["sae_residual", "0.310"]]
    assert table(tables, "sae").rows[2][5] == "78000"
    assert table(tables, "training").rows[1][:3] == ["sparse", "1.250", "40.0"]  # the last step, not the old run
    assert table(tables, "atlas").rows == [["dense", "16.7", "12.6", "–", "–", "–", "–"],
                                           ["sparse", "32.5", "12.6", "–", "–", "–", "–"]]
    assert table(tables, "vlm").rows == [["sparse", "59.4", "13.1", "0.864"]]
    steering = table(tables, "steering").rows
    assert [row[1:4] for row in steering] == [["colour", "none", "–"], ["colour", "4", "2"], ["colour", "16", "5"],
                                              ["subject", "4", "2"]]
    assert [row[-1] for row in steering] == ["–", "–", "2e-06", "–"] and steering[-1][7] == "25.0"
    assert table(tables, "models").rows[1] == ["sparse", "inline", "32", "relu", "cls", "50", "2048", "step 3",
                                               "head_bias_init=-0.5, head_lr_multiplier=10.0", "–"]
    dense, sparse = comparison.models[0], comparison.models[4]
    photo = Model("", "photo", params={"model.arch": "None", "model.towers.image": "efficientnet-lite0",
                                       "model.towers.text": "all-minilm-l6-v2", "model.lock.image": "True",
                                       "model.lock.text": "True", "reference.encoder": "efficientnet-lite0",
                                       "reference.image_size": "224"})
    assert towers(photo) == "efficientnet-lite0 + all-minilm-l6-v2 (locked: image, text)"
    assert clarity_reference(photo) == "efficientnet-lite0 at 224 px (the model's own image tower!)"
    photo.params["reference.encoder"] = "efficientnet-lite2"
    assert clarity_reference(photo) == "efficientnet-lite2 at 224 px"
    assert scale_at_cap(dense) == "step 4"  # 14.3 s^1.5 passes 100 at the 4th step
    sparse.params["model.init_logit_scale"] = "None"  # null: the scale starts at its cap
    assert scale_at_cap(sparse) == "step 0 (starts at the cap)"
    sparse.params.update({"model.init_logit_scale": "2.6592", "model.logit_scale_cap": "8"})  # exp(2.66) = 14.3 > 8
    assert scale_at_cap(sparse) == "step 0 (starts at the cap)"


def test_sections_without_runs_are_left_out_and_given_runs_are_compared(pipeline_runs):
    _, ids = pipeline_runs
    comparison = from_run_ids(MlflowClient(tracking_uri()), [ids["old"], ids["train-sparse"], ids["metrics-sparse"]])
    labels = [m.label for m in comparison.models]
    assert labels == ["sparse", f"run {ids['train-sparse'][:8]} / sparse"]  # two train runs of one variant: two rows
    names = [t.name for t in build_tables(comparison)]
    assert "vlm" not in names and "steering" not in names and "sae" not in names
    assert {"zeroshot", "training"} <= set(names)
    with pytest.raises(ValueError, match="no MLflow experiment named 'sparsclip'.*known: .*sparseclip"):
        from_experiment(MlflowClient(tracking_uri()), "sparsclip")  # a typo is an error, not an empty report


def test_report_files_and_the_report_stage_run(pipeline_runs, workdir):
    params, _ = pipeline_runs
    report_main(["--params", str(REPO / "params.yaml"), "--out-dir", "out"])
    md = (workdir / "out" / "comparison.md").read_text()
    assert "## Tab 1 · Zero-shot classification" in md and "| sparse | 12.6 | 13.6 | 80.1 | 13.2 |" in md
    assert "![l0](curves_l0.png)" in md
    assert md.index("## Claims of the paper, measured") < md.index("## Tab 1")  # the verdicts come first
    claims = json.loads((workdir / "reports" / "claims.json").read_text())  # report.claims_file, for DVC
    assert claims["tab1_zero_shot_parity"]["verdict"] == "holds"  # shape 12.6 vs 12.8, colour 80.1 vs 79.3: +0.3
    assert claims == json.loads((workdir / "out" / "claims.json").read_text())["run"]
    html = (workdir / "out" / "comparison.html").read_text()
    assert "<h2 id='sparsity'>" in html and "cdn" not in html.lower()
    assert {p.name for p in (workdir / "out").glob("curves_*.png")} == {"curves_l0.png", "curves_loss.png",
                                                                        "curves_scale.png", "curves_zeroshot.png"}
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(params.project.experiment).experiment_id
    [run] = client.search_runs([exp], "tags.stage = 'report'")
    assert run.info.status == "FINISHED" and "Tab 3a" in run.data.tags["mlflow.note.content"]
    verdicts = [c["verdict"] for c in claims.values()]
    assert run.data.metrics["claims.holds"] == verdicts.count("holds") > 0
    assert sum(v for k, v in run.data.metrics.items() if k.startswith("claims.")) == len(claims)
    assert len(json.loads(run.data.tags["report.run_ids"])) == 8  # the old and the failed run are not in it
    assert {a.path for a in client.list_artifacts(run.info.run_id, "outputs/out")} >= {"outputs/out/comparison.md"}
    report_main(["--params", str(REPO / "params.yaml"), "--out-dir", "out2", "--no-mlflow"])
    assert (workdir / "out2" / "comparison.md").read_text().count("| sparse |") == md.count("| sparse |")


def test_metrics_files_as_dvc_exp_show_reports_them():
    files = {"metrics/sparse.json": METRICS["sparse"], "metrics/train/sparse.json": {"variant": "sparse", "train.loss": 2.6},
             "metrics/sae.json": {"image.l0": 22.5, "multimodal": {"image": {"l0": 25.0}}},
             "metrics/sample.json": {"records_written": 4000},
             "metrics/atlas.json": {"sparse": {"pointing": {"accuracy": 0.325}}},
             "metrics/vlm.json": {"sparse": {"colour.exact": 0.59}}, "metrics/steering.json": {"baseline.sim_true": 0.85}}
    models = {m.name: m for m in models_from_metric_files(files, "exp-1", steer_variant="sparse")}
    assert set(models) == {"sparse", "sae", "sae_multimodal"}
    assert models["sae_multimodal"].value("metrics", "image.l0") == 25.0
    sparse = models["sparse"]
    assert sparse.label == "exp-1 / sparse" and sparse.value("train", "train.loss") == 2.6
    assert sparse.value("atlas", "pointing.accuracy") == 0.325 and sparse.value("vlm", "qa.colour.exact") == 0.59
    assert sparse.value("steer", "baseline.sim_true") == 0.85 and models["sae"].value("metrics", "image.l0") == 22.5


FAKE_TRAIN = '''"""Stands in for stages.train: a real stage run (its tags, dvc_exp among them) whose metrics and
curves follow the variant's logit_scale_cap, without Ray Train's start-up time."""
import sys

from pipeline.config import load_params
from pipeline.io import write_json
from pipeline.runtime.tracking import stage_run

params = load_params()
variant = sys.argv[1]
model = params.train.model_for(variant)
cap = model.logit_scale_cap
with stage_run(params, "train", variant=variant, section={"model": model.model_dump(mode="json")}) as run:
    for step in (1, 2, 3):
        run.log_metrics({"train/loss": 5.0 / step, "train/l0_image_pct": cap / step,
                         "zeroshot/shape/top1": cap / 1000 * step}, step=step)
write_json(f"metrics/train/{variant}.json", {"variant": variant, "train.l0_image_pct": cap / 3})
'''
FAKE_DVC_YAML = """stages:
  train:
    foreach: [sparse]
    do:
      cmd: python fake_train.py ${item}
      deps:
        - fake_train.py
      params:
        - train.variants.${item}
      metrics:
        - metrics/train/${item}.json:
            cache: false
"""


def run(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_two_dvc_experiments_with_different_caps_side_by_side(repo_copy):
    """Real `dvc exp run -S train.variants.sparse.logit_scale_cap=...` twice, then --dvc-exps.

    The stage is a stand-in for stages.train (Ray Train's start-up would add a minute per
    experiment; tests/test_cluster.py runs the real one): what is under test is the path from
    `dvc exp run` through the stage's MLflow run to the report."""
    (repo_copy / "fake_train.py").write_text(FAKE_TRAIN)
    (repo_copy / "dvc.yaml").write_text(FAKE_DVC_YAML)
    (repo_copy / "dvc.lock").unlink(missing_ok=True)
    run(repo_copy, "git", "config", "user.email", "test@example.com")
    run(repo_copy, "git", "config", "user.name", "test")
    run(repo_copy, "git", "add", "-A")
    run(repo_copy, "git", "commit", "-qm", "baseline")
    for name, cap in (("cap20", 20), ("cap50", 50)):
        run(repo_copy, "dvc", "exp", "run", "-n", name, "-S", f"train.variants.sparse.logit_scale_cap={cap}")

    run(repo_copy, sys.executable, "-m", "stages", "report", "--dvc-exps", "cap20", "cap50", "--out-dir", "reports/cmp")
    md = (repo_copy / "reports" / "cmp" / "comparison.md").read_text()
    assert "| train.variants.sparse.logit_scale_cap | 20 | 50 |" in md  # the params that differ
    assert "| cap20 / sparse | inline | 32 | relu | cls | 20.0 |" in md and "| cap50 / sparse | inline | 32 | relu |" in md
    training = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| cap")
                and "1.667" in line}  # the training table: loss 5/3 at the last step
    assert "6.7" in training["| cap20 / sparse"] and "16.7" in training["| cap50 / sparse"]
    assert (repo_copy / "reports" / "cmp" / "curves_l0.png").is_file()
    client = MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sparseclip").experiment_id
    tagged = {r.data.tags["dvc_exp"] for r in client.search_runs([exp], "tags.stage = 'train'")}
    assert tagged == {"cap20", "cap50"}
    assert client.search_runs([exp], "tags.stage = 'report'")
