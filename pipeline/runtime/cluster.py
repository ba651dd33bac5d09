"""Connecting to Ray: join the cluster named by params or ``$RAY_ADDRESS``, else start a local one.

A local cluster binds every process to 127.0.0.1 (see ``LOOPBACK_SWITCH``), starts no dashboard and
sends no usage statistics, so the embedded run makes no network traffic beyond loopback. On a cluster the same code joins the
existing head node (``ray job submit`` sets ``RAY_ADDRESS``) and inherits its resources.

Inside a Ray job the driver's ``runtime_env`` is merged with the job's, and Ray refuses the merge
when both set the same environment variable, so variables the job already sets are not repeated.
"""

from __future__ import annotations

import json
import logging
import os
import socket

from pipeline.config import RayParams

for _name, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0"),
    # Without a terminal (a log file, CI) Ray Data prints a dozen progress lines every 10 s; once a
    # minute is enough to see that a long extraction moves, and leaves a stage's log readable.
    "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "60",
}.items():
    os.environ.setdefault(_name, _value)

import ray  # noqa: E402
from ray._private import ray_constants  # noqa: E402

# Ray turns a node address of 127.0.0.1 into the machine's network IP (``resolve_ip_for_localhost``)
# so that other nodes can reach it, and its processes then listen on every interface (measured:
# gcs_server, raylet and workers on ``::``, the agents on 0.0.0.0 and the host's IP). Ray's own
# switch for a one-machine cluster, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the default on macOS
# and Windows), keeps the node address 127.0.0.1 and every listener on loopback. Ray reads it into
# ``ray_constants.ENABLE_RAY_CLUSTER`` when it is imported, so :func:`_one_machine` sets both: the
# variable for the processes the local cluster starts, the constant for this one.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

log = logging.getLogger(__name__)

# Variables that must reach every Ray worker process, wherever it runs.
WORKER_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
}


def connect(params: RayParams) -> dict:
    """Initialise Ray once per process and return the cluster's resources."""
    if not ray.is_initialized():
        address = params.address or os.environ.get("RAY_ADDRESS")
        one_machine = not address or _on_loopback(address)
        env = {"env_vars": _worker_env(one_machine), "worker_process_setup_hook": "pipeline.runtime.cluster.quiet_worker_logs"}
        _one_machine(one_machine)
        if address:
            log.info("joining Ray cluster at %s", address)
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        else:
            ray.init(
                address="local",  # a new cluster: never silently join one `ray start` left on this machine
                num_cpus=params.num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                runtime_env=env,
                log_to_driver=True,
                configure_logging=False,
            )
    return ray.cluster_resources()


def _one_machine(loopback: bool) -> None:
    """Ray's single-machine mode (every listener on 127.0.0.1) for a local cluster or one joined
    on loopback; its multi-node mode (this node's network IP) for a cluster on the network."""
    os.environ[LOOPBACK_SWITCH] = "0" if loopback else "1"
    ray_constants.ENABLE_RAY_CLUSTER = not loopback


def on_one_machine() -> bool:
    """Whether this process joined a one-machine cluster (a local one, or one on loopback): then
    every listener, torch's process group included (:mod:`pipeline.runtime.process_group`), stays on
    127.0.0.1."""
    return ray.is_initialized() and not ray_constants.ENABLE_RAY_CLUSTER


def _on_loopback(address: str) -> bool:
    """Whether a cluster address (``host:port``, ``ray://host:port``) is on this machine's loopback."""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def worker_resources(resources_per_worker: dict[str, float], use_gpu: bool) -> dict[str, float]:
    """What Ray Train asks per worker: ``resources_per_worker``, plus one GPU when ``use_gpu`` names none."""
    wanted = {k: float(v) for k, v in resources_per_worker.items() if v}
    if use_gpu and not wanted.get("GPU"):
        wanted["GPU"] = 1.0
    return wanted


def require_resources(what: str, per_worker: dict[str, float], workers: int, wait: bool) -> None:
    """Fail before training when the connected cluster can never place ``workers`` x ``per_worker``
    (each worker on one node, all at once): Ray Train would otherwise wait forever, logging its
    start-up timeout every minute (``train.use_gpu: true`` on a machine without a GPU did)."""
    if wait:
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    missing = []
    for name, amount in per_worker.items():
        fits = sum(int(node.get(name, 0) // amount) for node in nodes)
        if fits < workers:
            largest = max((node.get(name, 0) for node in nodes), default=0)
            missing.append(f"{workers} x {amount:g} {name} (the cluster's nodes hold {fits} such worker(s); the "
                           f"largest node has {largest:g} {name})")
    if missing:
        raise ValueError(f"{what}: cannot place the workers: {'; '.join(missing)}. Lower num_workers or "
                         "resources_per_worker, set use_gpu: false, or set ray.wait_for_resources: true on an "
                         "autoscaling cluster")


def require_data_pool(what: str, actors: int, task_cpus: float, actor_gpus: float = 0.0) -> None:
    """Fail before a Ray Data run whose actor pool leaves no CPU for the tasks that feed it: the
    actors hold ``actors x task_cpus`` for the whole run, and the read and map tasks each need
    ``task_cpus`` more; with nothing left, Ray Data reads 0 rows forever (``ray.num_cpus: 1`` with
    two actors of 0.5 CPU did)."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if actors * task_cpus + task_cpus > cpus + 1e-9:
        raise ValueError(f"{what}: {actors} actor(s) x ray.task_cpus {task_cpus:g} CPU + {task_cpus:g} for the tasks "
                         f"that feed them needs {(actors + 1) * task_cpus:g} CPUs; the cluster has {cpus:g}. Lower "
                         "extract.actors or ray.task_cpus, or raise ray.num_cpus")
    if actor_gpus and actors * actor_gpus > gpus + 1e-9:
        raise ValueError(f"{what}: {actors} actor(s) x extract.actor_gpus {actor_gpus:g} GPU needs "
                         f"{actors * actor_gpus:g} GPUs; the cluster has {gpus:g}. Lower extract.actors or "
                         "extract.actor_gpus (0: CPU actors)")


# Ray Train's placement-group cleaner polls the State API every second; without a dashboard (the
# local cluster starts none) every poll fails and logs a warning, hundreds per training. The
# cleaner still does its job when the controller dies; only that line is silenced. (Ray Train's
# other INFO lines are left to its own switch, ``LoggingConfig``: see ``pipeline.runtime.raytrain``.)
NOISY_WORKER_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


# Ray Train logs each report ("Reporting training result N: TrainingReport(...)", several hundred
# characters, once per checkpoint) on a logger named by its source file's path rather than its
# module, so its LoggingConfig, which filters the ``ray.train`` loggers, does not reach it.
REPORT_LOGGER_FILE = ("train", "v2", "_internal", "execution", "context.py")


def quiet_worker_logs() -> None:
    """Runs in every Ray worker process at start (``worker_process_setup_hook``)."""
    for name in NOISY_WORKER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger(os.path.join(os.path.dirname(ray.__file__), *REPORT_LOGGER_FILE)).setLevel(logging.WARNING)


def one_machine_worker_env() -> dict[str, str]:
    """Worker settings for a one-machine cluster: a node there is never drained, so Ray Train's
    preemption watcher (an actor process per training, polling the node's drain state) has
    nothing to watch; gloo's listeners go on the loopback interface (else on the address the host
    name resolves to, which may be the machine's network IP)."""
    env = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    if interface := loopback_interface():
        env["GLOO_SOCKET_IFNAME"] = interface
    return env


def loopback_interface() -> str | None:
    """The network interface that holds 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return name
    return None


def _worker_env(one_machine: bool = False) -> dict[str, str]:
    """What workers need, minus what the enclosing Ray job (if any) already gives them."""
    wanted = {**WORKER_ENV, **(one_machine_worker_env() if one_machine else {}), **_forwarded_env()}
    return {k: v for k, v in wanted.items() if k not in _job_env_vars()}


def _job_env_vars() -> dict[str, str]:
    """The env_vars of the Ray job this driver runs in (``ray job submit``); empty outside a job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}


def _forwarded_env() -> dict[str, str]:
    """Tracking settings the driver uses, so workers log to the same MLflow store."""
    return {k: v for k in ("MLFLOW_TRACKING_URI",) if (v := os.environ.get(k))}
