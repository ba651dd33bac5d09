"""A real multi-node Ray cluster on loopback, in its own process: ``python -m tests.local_cluster DIR N``.

Starts a head node (1 CPU, with the dashboard and its Jobs API on 127.0.0.1) and N-1 more nodes
(1 CPU each) with ``ray.cluster_utils.Cluster``, prints one JSON line (dashboard URL, GCS
address, node ids), and shuts every node down when its stdin closes or it gets SIGTERM.

It runs in its own process so that its environment is its own, inherited by every Ray process
it starts: the caller sets ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``; this module sets

- ``RAY_TMPDIR=DIR``: the sessions and the "current cluster" file stay in DIR, where no other
  ``ray.init()`` on the machine looks (it would otherwise join this cluster);
- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray processes that join by address (the Jobs agent, a
  job's driver) then resolve 127.0.0.1 to 127.0.0.1, not to the host's network address, where
  nothing of this loopback-only cluster listens.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.update(RAY_TMPDIR=sys.argv[1], RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")

from ray.cluster_utils import Cluster

from pipeline.runtime.shared_cluster import free_port

NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 200 * 1024**2}


def main(temp_dir: str, nodes: int) -> None:
    dashboard, ray_dir = free_port(), Path(temp_dir) / "ray"
    ray_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        **NODE, "temp_dir": str(ray_dir), "gcs_server_port": free_port(), "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard, "dashboard_agent_listen_port": free_port(),
    })
    try:
        workers = [cluster.add_node(**NODE) for _ in range(nodes - 1)]
        print(json.dumps({"dashboard": f"http://127.0.0.1:{dashboard}", "gcs": cluster.address,
                          "node_ids": [cluster.head_node.node_id, *(w.node_id for w in workers)]}), flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        sys.stdin.read()  # until the test closes our stdin
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
