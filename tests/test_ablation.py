"""The Fig 2 ablation sweep: its grid, its seed statistics and trend checks on fabricated results
(brute-force references), and one real run of the stage on Ray with a micro model, through MLflow
into the comparison report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.clip.ablation import grid, point_model, summarise, trend_checks
from pipeline.config import AblationParams, ModelParams
from pipeline.report.ablation import fetch_ablation
from pipeline.runtime.tracking import tracking_uri

from .conftest import REPO
from .tiny import sampled_tiny_params


def test_grid_covers_every_panel_for_every_seed_and_recipe():
    params = AblationParams(seeds=[0, 1], expansions=[1, 4], expansion_activations=["relu", "none"],
                            activations=["relu", "topk", "l1"], scale_caps=[5, 50], scale_mode="fixed")
    points = grid(params)
    assert len(points) == 2 * 2 * (2 * 2 + 3 + 2) and len({p.name for p in points}) == len(points)
    assert {p.recipe for p in points} == {"paper", "embedded"}
    base = ModelParams(expansion=32, logit_scale_cap=50)
    fixed5 = next(p for p in points if p.panel == "scale" and p.x == 5 and p.seed == 1)
    model = point_model(base, fixed5)
    assert model.logit_scale_mode == "fixed" and math.isclose(model.initial_logit_scale, math.log(5))
    none1 = point_model(base, next(p for p in points if p.panel == "expansion" and p.label == "none"))
    assert none1.activation == "none" and none1.expansion == 1
    topk = point_model(base, next(p for p in points if p.label == "topk"))
    assert topk.activation == "topk" and topk.expansion == 32  # 2b varies the activation alone


def fake_result(panel, label, x, seed, l0, acc, width=64, recipe="paper"):
    curves = {10: {"train/l0_image_pct": 90.0, "zeroshot/a/top1": 0.1, "zeroshot/b/top1": 0.1},
              20: {"train/l0_image_pct": l0, "train/l0_image": l0 * width / 100, "zeroshot/a/top1": acc - 0.1,
                   "zeroshot/b/top1": acc + 0.1}}
    final = {**curves[10], **curves[20], "accuracy": acc}
    return {"panel": panel, "label": label, "line": f"{label}_{recipe}", "x": x, "seed": seed, "width": width,
            "curves": curves, "final": final}


def test_summary_is_the_seed_mean_and_std_and_checks_read_the_trends():
    results = []
    for seed, noise in enumerate([-1.0, 1.0]):
        for x, l0 in [(1, 60.0), (8, 20.0)]:
            results.append(fake_result("expansion", "relu", x, seed, l0 + noise, 0.5 + x / 100))
            results.append(fake_result("expansion", "none", x, seed, 100.0, 0.5))
        for label, acc in [("relu", 0.6), ("topk", 0.4), ("l1", 0.7)]:
            results.append(fake_result("activation", label, 0, seed, 10.0, acc))
        for cap, l0 in [(5, 3.0), (20, 10.0), (50, 30.0)]:
            results.append(fake_result("scale", "learnable", cap, seed, l0 + noise, 0.5))
    summary = summarise(results)
    relu = summary["expansion"]["relu_paper"]
    assert [r["x"] for r in relu] == [1, 8]
    assert relu[0]["train/l0_image_pct"]["mean"] == pytest.approx(60.0)
    assert relu[0]["train/l0_image_pct"]["std"] == pytest.approx(np.std([59.0, 61.0]))
    checks = {k.removeprefix("paper."): v for k, v in trend_checks(summary, ["paper"]).items()}
    assert checks["2a_relu_active_pct_falls_with_width"] is True and checks["2a_none_stays_dense"] is True
    assert checks["2a_relu_accuracy_grows_with_width"] is True
    assert checks["2b_relu_more_accurate_than_topk"] is True and checks["2b_relu_more_accurate_than_l1"] is False
    assert checks["2c_l0_rises_with_cap_spearman"] == pytest.approx(1.0)


def test_caps_that_never_bind_tie_and_ties_are_averaged_not_ranked_by_position():
    """Caps 15-100 that the learned scale never reaches give one L0: tied ranks, not a trend."""
    results = [fake_result("scale", "learnable", cap, 0, l0, 0.5)
               for cap, l0 in [(5, 2.0), (10, 4.0), (15, 6.0), (20, 6.0), (50, 6.0), (100, 6.0)]]
    rho = trend_checks(summarise(results), ["paper"])["paper.2c_l0_rises_with_cap_spearman"]
    caps_ranks, l0_ranks = np.arange(1, 7), np.array([1, 2, 4.5, 4.5, 4.5, 4.5])
    assert rho == pytest.approx(np.corrcoef(caps_ranks, l0_ranks)[0, 1]) and rho < 0.9


def test_ablation_stage_trains_every_point_and_the_report_shows_it(workdir, ray_local):
    """The real sweep: Ray tasks, the recipe's training step, figures, MLflow, the report."""
    from stages.ablation import main as ablation_main

    params = sampled_tiny_params(workdir)
    overrides = {"steps": 8, "batch_size": 16, "seeds": [0, 1], "log_every": 2, "eval_every": 4, "val_images": 16,
                 "expansions": [1, 4], "activations": ["relu", "topk"], "scale_caps": [5, 50],
                 "recipes": ["paper"],
                 "task_cpus": 0.5, "out_dir": str(workdir / "plots" / "ablation")}
    text = workdir / "params.yaml"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sample"]["out_dir"] = params.sample.out_dir
    raw["train"]["model"]["inline"] = params.train.model.inline
    raw["train"]["model"]["expansion"] = 8
    raw["ablation"].update(overrides)
    text.write_text(yaml.safe_dump(raw))
    ablation_main(["--params", str(text)])

    out = workdir / "plots" / "ablation"
    points = json.loads((out / "points.json").read_text())
    assert set(points["summary"]) == {"expansion", "activation", "scale"}
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves) == 2 * (2 * 2 + 2 + 2)
    for result in curves:
        assert sorted(int(s) for s in result["curves"]) == [2, 4, 6, 8]
        assert 0 < result["final"]["train/l0_image_pct"] <= 100 and "accuracy" in result["final"]
    assert {r["line"] for r in curves if r["panel"] == "activation"} == {"relu_paper", "topk_paper"}
    none = [r for r in curves if r["panel"] == "expansion" and r["label"] == "none"]
    assert all(r["final"]["train/l0_image_pct"] == 100.0 for r in none)  # no ReLU: every feature fires
    topk = [r for r in curves if r["label"] == "topk"]
    assert all(0 < r["final"]["train/l0_image"] <= 64 for r in topk)  # train.model.topk
    fixed = [r for r in curves if r["panel"] == "scale"]
    assert all(r["final"]["train/logit_scale"] <= r["x"] + 1e-3 for r in fixed)
    assert {p.name for p in out.glob("*.png")} == {"fig2a_expansion.png", "fig2b_activation.png", "fig2c_scale.png"}
    metrics = json.loads((workdir / "plots" / "ablation.json").read_text())
    assert "expansion.relu_paper.4.l0_image_pct" in metrics and "paper.2c_l0_rises_with_cap_spearman" in metrics

    ablation = fetch_ablation(MlflowClient(tracking_uri()), params.project.experiment, workdir / "report")
    assert ablation.table is not None and len(ablation.table.rows) == 2 * 2 + 2 + 2
    assert ablation.checks["paper.2c_l0_rises_with_cap_spearman"] == metrics["paper.2c_l0_rises_with_cap_spearman"]
    assert {p.name for p in ablation.figures.values()} == {"ablation_fig2a_expansion.png", "ablation_fig2b_activation.png",
                                                  "ablation_fig2c_scale.png"}
    on_disk = fetch_ablation(MlflowClient(tracking_uri()), "no-such-experiment", workdir / "report2", out)
    assert on_disk.table.rows == ablation.table.rows and on_disk.checks == ablation.checks  # the DVC output, no run
    assert len(on_disk.figures) == 3


def test_gpu_ablation_is_one_override_file_away():
    from pipeline.config import load_params
    from pipeline.runtime.job import read_override

    params = load_params(REPO / "params.yaml", read_override(REPO / "deploy" / "params.ablation-gpu.yaml"))
    assert params.ablation.use_gpu and params.train.model.arch == "ViT-B-32" and params.sample.source.kind == "csv"
    assert params.train.model.topk == 512 and len(grid(params.ablation)) == 66


def test_accuracy_falls_back_to_retrieval_without_zero_shot_tasks():
    from pipeline.clip.ablation import final_values

    assert final_values({5: {"zeroshot/a/top1": 0.2, "zeroshot/b/top1": 0.4, "val/x_r5": 0.9}})["accuracy"] == \
        pytest.approx(0.3)
    assert final_values({5: {"val/image_retrieval_r5": 0.2, "val/text_retrieval_r5": 0.4}})["accuracy"] == \
        pytest.approx(0.3)
