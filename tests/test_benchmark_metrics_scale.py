"""benchmarks/metrics_scale.py on a tiny store, in process: every metric runs through the pipeline's
functions, and the result JSON has its sizes, positive times, peaks and fitted exponents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import metrics_scale


def test_synthetic_store_is_canonical_with_the_asked_density():
    store = metrics_scale.synthetic_store(400, 256, l0=20, seed=0)
    assert store.shape == (400, 256) and store.dtype == np.float32 and store.has_canonical_format
    assert 15 < store.nnz / 400 <= 20 * 1.2  # deduplicated draws: a little under the target
    assert (store.data > 0).all()
    assert (np.bincount(store.indices, minlength=256) == 0).sum() >= int(0.05 * 256)  # dead features


def test_loglog_slope():
    assert metrics_scale.loglog_slope([(1, 3.0), (2, 12.0), (4, 48.0)]) == pytest.approx(2.0)
    assert metrics_scale.loglog_slope([(1, 3.0)]) is None


@pytest.mark.integration
def test_benchmark_runs_on_a_tiny_size(tmp_path):
    out = tmp_path / "result.json"
    result = metrics_scale.main(["--rows", "300", "--widths", "128,256", "--sweep-rows", "150,300", "--l0", "12",
                                 "--classes", "5", "--in-process", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["fits"] == json.loads(json.dumps(result["fits"]))
    assert written["machine"]["cores"] >= 1
    sizes = {(r["rows"], r["width"]) for r in written["rows"]}
    assert sizes == {(300, 128), (300, 256), (150, 256)}
    for row in written["rows"]:
        assert row["status"] == "ok", row
        assert row["seconds"] > 0 and row["peak_rss_gib"] > 0 and row["peak_extra_gib"] >= 0
    assert {r["metric"] for r in written["rows"]} == set(metrics_scale.METRICS)
    for metric in metrics_scale.METRICS:
        fit = written["fits"][metric]
        assert set(fit) >= {"seconds_vs_rows", "seconds_vs_width", "peak_extra_gib_vs_rows", "peak_extra_gib_vs_width"}
        assert fit["seconds_vs_rows"] is not None


def test_thread_counts_are_measured_side_by_side_with_the_same_values(tmp_path):
    out = tmp_path / "result.json"
    result = metrics_scale.main(["--rows", "300", "--widths", "256", "--sweep-rows", "300", "--l0", "12",
                                 "--classes", "5", "--in-process", "--threads", "1,2", "--out", str(out),
                                 "--metrics", "clarity,zeroshot,images_topk,labels_topk"])
    assert result["threads"] == [1, 2]
    by_threads = {t: {r["metric"]: r["value"] for r in result["rows"] if r["threads"] == t} for t in (1, 2)}
    assert by_threads[1] == by_threads[2]  # the same numbers on either count
    assert set(result["speedup"]) == {"clarity", "zeroshot", "images_topk", "labels_topk"}
    assert all(set(ratios) == {"300x256@2"} and all(v > 0 for v in ratios.values())
               for ratios in result["speedup"].values())
    assert "wall on 1 thread(s) / on more" in metrics_scale.table(result)
