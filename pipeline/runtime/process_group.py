"""Ray Train's torch process group on a one-machine cluster, listening on loopback only.

Ray Train sets up ``torch.distributed`` in its workers with an ``env://`` rendezvous: rank 0 hosts
a TCPStore at ``MASTER_ADDR:MASTER_PORT`` for as long as the training runs. torch binds that
store's server to every interface whatever address it is given (measured: ``*:<port>`` with
``MASTER_ADDR=127.0.0.1``), so on a shared machine anyone who can reach it could talk to the
rendezvous of a running training. The one way torch offers to keep the server on loopback is a
socket bound beforehand and handed over (``TCPStore(master_listen_fd=...)``), and Ray's set-up has
no way to pass one. On a one-machine cluster (:func:`pipeline.runtime.cluster.on_one_machine`) the trainers
therefore use :class:`LoopbackTorchConfig`, which does Ray's set-up with such a socket; gloo's own
listeners follow ``GLOO_SOCKET_IFNAME``, which :mod:`pipeline.runtime.cluster` points at the loopback
interface there. A cluster on the network keeps Ray's set-up unchanged.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch.config import (
    TorchConfig,
    _set_torch_distributed_env_vars,
    _TorchBackend,
)

LOOPBACK = "127.0.0.1"
_server: dist.TCPStore | None = None  # rank 0's store, alive while its process group is


def torch_config(one_machine: bool) -> TorchConfig:
    """The process-group set-up for a cluster: loopback-only on one machine, Ray's own elsewhere."""
    return LoopbackTorchConfig() if one_machine else TorchConfig()


class LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return LoopbackTorchBackend


class LoopbackTorchBackend(_TorchBackend):
    """Ray's ``_TorchBackend`` with the rendezvous store on a loopback socket of rank 0."""

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        timeout_s = backend_config.timeout_s
        port = worker_group.execute_single(0, serve_store, timeout_s=timeout_s)
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, RANK, ... as Ray sets them
        ray.get([worker_group.execute_single_async(rank, join_group, backend=backend_config.backend or "gloo",
                                                   world_rank=rank, world_size=len(worker_group), port=port,
                                                   timeout_s=timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: TorchConfig) -> None:
        super().on_shutdown(worker_group, backend_config)
        worker_group.execute_single(0, release_store)


def serve_store(timeout_s: float) -> int:
    """In rank 0: start the rendezvous store on a socket bound to loopback; return its port."""
    global _server
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(socket.SOMAXCONN)
    port = listener.getsockname()[1]
    _server = dist.TCPStore(LOOPBACK, port, is_master=True, wait_for_workers=False,
                            timeout=timedelta(seconds=timeout_s), master_listen_fd=listener.detach())
    return port


def join_group(backend: str, world_rank: int, world_size: int, port: int, timeout_s: float) -> None:
    """In every rank: join the process group through rank 0's loopback store."""
    timeout = timedelta(seconds=timeout_s)
    store = _server if world_rank == 0 else dist.TCPStore(LOOPBACK, port, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


def release_store() -> None:
    global _server
    _server = None
