"""The client half of warm stages: what ``python -m stages <stage> [args]`` runs.

It hands the warm-stage server (:mod:`.stage_server`) its arguments, working folder, environment
and stdin/stdout/stderr, relays signals to the forked child and exits with its status; with no
server up, or when the server declines, it runs the stage in this process. Only the standard
library is imported here: the client must start fast.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

SERVER_ENV = "SPARSECLIP_STAGE_SERVER"  # the socket's path, set for the stages of a run
TRACE_ENV = "SPARSECLIP_STAGE_SERVER_TRACE"  # set: each warm stage lists what it still had to import
MAX_MESSAGE = 1 << 20


@dataclass(frozen=True)
class StagePackage:
    """The application's package of stages, read by name (this library never imports it): its
    ``STAGES`` (module names, one per stage), the ``LAZY_IMPORTS`` its stages make inside functions
    (the server imports them up front too), and its folder (which checkout it is)."""

    name: str
    stages: tuple[str, ...]
    lazy_imports: tuple[str, ...]
    folder: str

    @classmethod
    def load(cls, name: str) -> StagePackage:
        package = importlib.import_module(name)
        return cls(name, tuple(package.STAGES), tuple(getattr(package, "LAZY_IMPORTS", ())),
                   str(Path(package.__file__).resolve().parent))

    def modules(self) -> list[str]:
        return [*(f"{self.name}.{stage}" for stage in self.stages), *self.lazy_imports]


# ---------------------------------------------------------------------------------------------
# Client: what ``python -m stages <stage> [args]`` runs.


def run_stage_command(argv: list[str], package: str) -> int:
    """Run one stage of ``package``, warm when a server is up, else in this process; return its
    exit status."""
    stages = StagePackage.load(package)
    if not argv or argv[0] not in stages.stages:
        print(f"usage: python -m {package} {{{','.join(stages.stages)}}} [args]", file=sys.stderr)
        return 2
    stage, args = argv[0], argv[1:]
    if address := os.environ.get(SERVER_ENV):
        status = _run_warm(address, stages, stage, args)
        if status is not None:
            return status
    return run_stage_in_process(package, stage, args)


def run_stage_in_process(package: str, stage: str, args: list[str]) -> int:
    sys.argv = [f"python -m {package} {stage}", *args]
    importlib.import_module(f"{package}.{stage}").main(args)
    return 0


def _run_warm(address: str, stages: StagePackage, stage: str, args: list[str]) -> int | None:
    """The stage's exit status from a server-forked child, or None to run it here instead."""
    with SignalRelay() as relay:  # from before the child exists: an early Ctrl-C must reach it too
        request = {"stage": stage, "args": args, "cwd": os.getcwd(), "env": dict(os.environ),
                   "package": stages.folder, "ignored_signals": relay.ignored}
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            conn.connect(address)
            socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
            reply = json.loads(conn.recv(MAX_MESSAGE) or b"{}")
        except (OSError, ValueError) as err:
            print(f"stages: no warm stage server at {address} ({err}); running {stage} cold", file=sys.stderr)
            return None
        if "pid" not in reply:
            print(f"stages: the warm stage server declined ({reply.get('refused', 'no reply')}); running {stage} "
                  "cold", file=sys.stderr)
            conn.close()
            return None
        relay.to(reply["pid"])
        message = conn.recv(MAX_MESSAGE)  # retried across the relayed signals (PEP 475)
    if not message:
        print("stages: the warm stage server went away before the stage ended", file=sys.stderr)
        return 1
    return int(json.loads(message)["exit"])


class SignalRelay:
    """Forwards SIGINT, SIGTERM and SIGHUP to the child's process group once its pid is known,
    holding any that arrive before; on leaving, the handlers are restored and a held SIGINT
    becomes this process's KeyboardInterrupt (the stage then never started)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.pid: int | None = None
        self.held: list[int] = []

    def __enter__(self) -> SignalRelay:
        self.previous = {signum: signal.signal(signum, self._receive) for signum in self.SIGNALS}
        # what this process ignores (a job started in the background ignores SIGINT), the child must too
        self.ignored = [int(signum) for signum, handler in self.previous.items() if handler == signal.SIG_IGN]
        return self

    def to(self, pid: int) -> None:
        self.pid = pid
        for signum in self.held:
            signal_child(self.pid, signum)
        self.held.clear()

    def _receive(self, signum: int, _frame) -> None:
        if self.pid is None:
            self.held.append(signum)
        else:
            signal_child(self.pid, signum)

    def __exit__(self, *_exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        for signum in self.held:
            signal.raise_signal(signum)


def signal_child(pid: int, signum: int) -> None:
    """``signum`` to a stage child's process group, or to the child alone if it is not yet its
    group's leader (it calls ``setsid`` first thing); nothing if it has exited."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
