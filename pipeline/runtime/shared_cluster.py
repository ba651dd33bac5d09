"""One local Ray cluster shared by every stage of a run: ``python -m pipeline.runtime.shared_cluster CMD...``.

Each DVC stage is its own process, and a stage that starts its own local Ray spends ~8 s on it
(x 11 Ray stages in the embedded run). This starts one head node on loopback for the length of
``CMD`` (``make pipeline`` wraps ``dvc repro`` in it) and hands the stages its address through
``RAY_ADDRESS``, which :func:`pipeline.runtime.cluster.connect` joins. With ``RAY_ADDRESS`` already set (a
real cluster, ``ray job submit``) it runs ``CMD`` unchanged. Beside the head it starts the warm
stage server (:mod:`pipeline.runtime.stage_server`), so the stages also skip their ~2-13 s of imports.

The head binds to 127.0.0.1, starts no dashboard UI (only Ray's minimal head process), and keeps its sessions in a private temp dir
(``RAY_TMPDIR``), where no other ``ray.init()`` on the machine looks; a fresh token guards it
(Ray's token auth, on by default). ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes processes that
join by address resolve 127.0.0.1 to itself rather than to the host's network address. These are
set before Ray is imported, so every Ray process inherits them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def object_store_bytes() -> int:
    """Ray's own default for a node (30% of memory, at most the free /dev/shm); the test helper
    that starts the head would otherwise give it 150 MiB."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    shm = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").exists() else memory
    return int(min(0.3 * memory, 0.95 * shm))


@contextmanager
def shared_local_cluster(num_cpus: int | None) -> Iterator[dict[str, str]]:
    """Start the head node; yield the environment that makes a child process join it."""
    temp = tempfile.mkdtemp(prefix="scray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {"RAY_TMPDIR": temp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update(env)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": num_cpus or os.cpu_count(), "node_ip_address": "127.0.0.1", "temp_dir": str(Path(temp) / "ray"),
        "gcs_server_port": free_port(), "include_dashboard": False, "object_store_memory": object_store_bytes(),
    })
    try:
        yield {**env, "RAY_ADDRESS": cluster.address}
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


# The application's package of stages that the warm-stage server serves (read by name, not imported).
STAGE_PACKAGE = "stages"


def run(command: list[str], num_cpus: int | None, stage_package: str = STAGE_PACKAGE) -> int:
    """``command``'s exit status, run inside one shared cluster, its stages warm
    (:mod:`pipeline.runtime.stage_server`: forked from one process that imported their code once)."""
    from pipeline.runtime.stage_server import warm_stage_server

    with shared_local_cluster(num_cpus) as env, warm_stage_server(env["RAY_TMPDIR"], env, stage_package) as warm:
        print(f"shared Ray cluster at {env['RAY_ADDRESS']} for: {' '.join(command)}", file=sys.stderr, flush=True)
        return subprocess.call(command, env={**os.environ, **env, **warm})


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m pipeline.runtime.shared_cluster COMMAND [ARGS...]", file=sys.stderr)
        return 2
    from pipeline.config import ParamsError, load_params

    try:
        params = load_params("params.yaml")
    except ParamsError as err:  # before a cluster starts or DVC deletes anything: one message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if params.ray.address or os.environ.get("RAY_ADDRESS"):  # a cluster is named: stages join it themselves
        return subprocess.call(argv)
    return run(argv, params.ray.num_cpus)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
