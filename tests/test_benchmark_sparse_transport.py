"""The sparse-transport benchmark's measurement code on tiny blocks (2 gloo workers), and the
switch-over it reports."""

from __future__ import annotations

import json

from benchmarks import sparse_transport


def test_blocks_have_the_density_asked():
    block = sparse_transport.sparse_block(8, 100, 0.05, seed=1)
    assert block.shape == (8, 100) and int((block != 0).sum()) == 40 and bool((block >= 0).all())


def test_switch_over_is_the_highest_density_where_sparse_wins():
    rows = [{"density": d, "dense_s": 1.0, "sparse_s": s}
            for d, s in [(0.5, 3.0), (0.2, 1.5), (0.05, 0.5), (0.01, 0.2)]]
    got = sparse_transport.switch_over(rows)
    assert got["highest_winning_density"] == 0.05
    assert 0.05 < got["interpolated"] < 0.2
    assert sparse_transport.switch_over([{**r, "sparse_s": 9.0} for r in rows])["highest_winning_density"] is None


def test_transport_measurement_runs_on_two_gloo_workers():
    result = sparse_transport.run(workers=2, batch=4, width=64, densities=[0.5, 0.05], repeats=1, warmup=0)
    assert result["block_shape"] == [8, 64] and result["backend"] == "gloo"
    rows = {r["density"]: r for r in result["rows"]}
    assert set(rows) == {0.5, 0.05}
    for density, row in rows.items():
        nnz = round(density * 8 * 64)
        assert row["nnz"] == nnz
        # dense: the block alone; sparse: an 8-byte header + int32 index and fp32 value per non-zero
        assert row["dense_bytes"] == 8 * 64 * 4
        assert row["sparse_bytes"] == 8 + 8 * nnz and row["sparse_blocks"] == 1
        assert row["dense_s"] > 0 and row["sparse_s"] > 0 and row["all_gather_s"] > 0
        assert row["step_data_shifts"] == 2 and row["step_sparse_bytes"] == 2 * row["sparse_bytes"]
    assert set(result["switch_over"]) == {"highest_winning_density", "interpolated"}
    json.dumps(result)


def test_project_thresholds_follow_the_committed_measurement():
    """``train.sparse_transport_density`` is set from benchmarks/results/sparse_transport_gloo.json,
    not assumed: no threshold above the highest density at which sparse shifts measured faster
    (none at all when they never did)."""
    measured = json.loads((sparse_transport.RESULTS / "sparse_transport_gloo.json").read_text())
    winning = measured["switch_over"]["highest_winning_density"]
    thresholds = sparse_transport.current_thresholds()
    assert set(thresholds) == {"params.yaml", "deploy/params.paper.yaml"}
    for name, threshold in thresholds.items():
        if winning is None:
            assert threshold is None, f"{name}: sparse transport never measured faster, yet set to {threshold}"
        else:
            assert threshold is None or threshold <= winning + 1e-12, (name, threshold, winning)
