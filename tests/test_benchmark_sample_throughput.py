"""The sampling benchmark's measurement code on a tiny source: every path runs, writes the same
shards, and the JSON carries the fields docs/benchmarks.md shows."""

from __future__ import annotations

import json

from benchmarks import sample_throughput


def test_sample_throughput_measures_every_path_on_a_tiny_source(ray_local, tmp_path):
    result = sample_throughput.measure(records=240, per_tar=100, pool=12, shard_size=40, task_cpus=[1.0],
                                       work=tmp_path)
    assert result["source"] == {**result["source"], "records": 240, "tars": 3, "per_tar": 100}
    assert result["same_shards"] is True
    paths = [r["path"] for r in result["runs"]]
    assert paths == ["plain_stream", "plain_stage", "ray"]
    for run in result["runs"]:
        assert run["written"] == 240 and run["skipped"] == 0
        assert run["records_per_s"] > 0 and run["records_per_s_per_core"] > 0
        assert set(run["paper_15m_hours"]) == {"2", "16", "64"}
        assert run["paper_15m_hours"]["2"] == 32 * run["paper_15m_hours"]["64"]
    ray_run = result["runs"][-1]
    assert ray_run["tasks"] == 2 and ray_run["cores"] == 2 and ray_run["vs_plain_stream"] > 0
    assert result["worker_imports"].endswith("pipeline/__init__.py")
    json.dumps(result)
