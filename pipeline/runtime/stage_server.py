"""Warm stages: one process imports the stages' code once, and every stage of a run forks from it.

Each DVC stage is its own process, and before it does any work it imports torch, open_clip,
MLflow, Ray and the pipeline: 2-13 s a stage, ~130 s of the embedded run's 17 stages on 2 cores,
paid again and again for the same modules. ``make pipeline`` therefore starts this server beside
its shared Ray cluster; the server imports every stage module once and listens on a Unix socket
in the run's private temp folder. A stage command (``python -m stages <stage> [args]``, see
``stages/__main__.py``) is a small client: it hands the server its arguments, working folder,
environment and its stdin/stdout/stderr, and the server forks a child that runs the stage there,
as the command would have, with its output going straight to the client's terminal or log. The
client relays signals to the child and exits with the child's status.

The child runs the code on disk under the client's environment: the server refuses a request
when a module it imported has changed since, when the client's ``stages`` package is another
checkout, or when the client's environment differs from the one the imports saw (Ray, torch and
MLflow read settings when imported); the client then runs the stage in its own process, as it
also does when no server is up (a bare ``dvc repro``, a Ray job). So a stage computes the same
thing either way; only where its imports come from differs. Nothing here imports more than the
standard library: the client must start fast. The stages are the application's: this module
reads them by the package name it is given (``stages``: its ``STAGES`` and ``LAZY_IMPORTS``) and
never imports them itself. It forks only while it has a single thread (a fork copies one thread,
and a lock another thread held would stay locked in the child); the native thread pools of torch
and OpenMP, idle here, are rebuilt by their libraries' fork handlers.

Protocol (``SOCK_SEQPACKET``, one JSON message each way, file descriptors as ancillary data):
client -> ``{"stage", "args", "cwd", "env", "package"}`` + fds 0, 1, 2; server -> ``{"pid"}`` or
``{"refused": reason}``; then, when the child ends, ``{"exit": status}``. A client that goes away
(killed) takes its stage with it: the child's process group gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import gc
import importlib
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime.stage_client import (  # noqa: F401  (SERVER_ENV: re-exported)
    MAX_MESSAGE,
    SERVER_ENV,
    TRACE_ENV,
    SignalRelay,
    StagePackage,
    run_stage_in_process,
    signal_child,
)

KILL_GRACE_S = 10.0


# ---------------------------------------------------------------------------------------------
# Server: ``python -m pipeline.runtime.stage_server SOCKET``.


@contextmanager
def warm_stage_server(folder: str | Path, env: dict[str, str], package: str) -> Iterator[dict[str, str]]:
    """Start a server of ``package``'s stages (in the background: stages that come before its
    imports are done run cold) with ``env``; yield the variables that send a stage command to it;
    stop it at the end. ``folder`` must be private to this user: whoever can reach the socket can
    run stages."""
    address = str(Path(folder) / "stages.sock")
    server = subprocess.Popen([sys.executable, "-m", "pipeline.runtime.stage_server", address, package],
                              env={**os.environ, **env},
                              stdin=subprocess.DEVNULL)
    try:
        yield {SERVER_ENV: address}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        Path(address).unlink(missing_ok=True)


@dataclass
class StageRequest:
    package: str
    stage: str
    args: list[str]


@dataclass
class WarmState:
    """What the server's imports depend on: the files they read, and the environment they saw."""
    modules: dict[str, float]  # source file -> modification time when imported
    package: str  # the folder of the stages package imported
    stages: tuple[str, ...]  # the stages it can run
    environment: dict[str, str]  # the server's environment before the imports
    set_by_imports: dict[str, str]  # variables the imports set (e.g. pipeline.runtime.cluster's defaults)


# Variables a shell, DVC or this module sets per command; they differ between the server and its
# clients and no import reads them. PS1 / PS2: an activated venv exports its prompt, and the
# non-interactive shell DVC runs each command in drops both (every stage of such a run was cold).
PER_COMMAND_ENV = ("PWD", "OLDPWD", "SHLVL", "_", "PS1", "PS2", SERVER_ENV, TRACE_ENV)


def serve(address: str, package: str, modules: list[str] | None = None) -> StageRequest:
    """Import ``modules`` (default: every stage of ``package`` and its lazy imports), then answer
    requests until terminated. Returns only in a forked child, with the stage that child is to run
    (its stdio, folder and environment already the client's)."""
    started_with = dict(os.environ)
    stages = StagePackage.load(package)
    for name in stages.modules() if modules is None else modules:
        importlib.import_module(name)
    loaded = _module_stamps(Path(stages.folder).parent)
    warm = WarmState(loaded, stages.folder, stages.stages, started_with,
                     {k: v for k, v in os.environ.items() if started_with.get(k) != v})
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    staging = f"{address}.{os.getpid()}"
    listener.bind(staging)
    listener.listen(16)
    os.replace(staging, address)  # clients see the socket only once the imports are done
    gc.freeze()  # the imported objects stay out of the children's collections (no copy-on-write pages)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        conn, _ = listener.accept()
        if reason := fork_refusal():
            _refuse(conn, reason)
            continue
        if os.fork() == 0:
            listener.close()
            return _supervise(conn, warm, package)
        conn.close()


def fork_refusal() -> str | None:
    """Why this process must not fork now: a fork copies only the calling thread, so a lock that
    another Python thread held stays locked forever in the child (Python 3.12 warns of it)."""
    threads = threading.active_count()
    return f"{threads} threads are alive in the server; it forks only when it has one" if threads > 1 else None


def _refuse(conn: socket.socket, reason: str) -> None:
    try:
        _, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
        for fd in fds:
            os.close(fd)
        conn.send(json.dumps({"refused": reason}).encode())
    except OSError:
        pass
    conn.close()


def _supervise(conn: socket.socket, warm: WarmState, package: str) -> StageRequest:
    """In a forked supervisor: check the request, fork the stage's child, report its exit status.
    Returns only in that child."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
    request = json.loads(message)
    refused = _refusal(request, warm)
    if refused:
        conn.send(json.dumps({"refused": refused}).encode())
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _become_client_process(request, fds, warm.set_by_imports)
        return StageRequest(package, request["stage"], request["args"])
    for fd in fds:
        os.close(fd)
    conn.send(json.dumps({"pid": pid}).encode())
    status = _wait_or_kill(conn, pid)
    try:
        conn.send(json.dumps({"exit": status}).encode())
    except OSError:
        pass
    os._exit(0)


def _refusal(request: dict, warm: WarmState) -> str | None:
    """Why a forked child would not run the stage as a fresh process would, if it would not."""
    if request.get("stage") not in warm.stages:
        return f"unknown stage {request.get('stage')!r}"
    if request.get("package") != warm.package:
        return f"it serves the stages of {warm.package}, not {request.get('package')}"
    changed = [path for path, mtime in warm.modules.items() if _mtime(path) != mtime]
    if changed:
        return f"{len(changed)} module(s) changed since it imported them, e.g. {changed[0]}"
    env = request.get("env", {})
    differs = sorted(k for k in set(env) | set(warm.environment)
                     if env.get(k) != warm.environment.get(k) and not _per_command(k))
    if differs:  # imports read the environment (Ray's and torch's settings): theirs must be the client's
        return f"the environment differs from the one it imported under ({', '.join(differs[:5])})"
    return None


def _per_command(name: str) -> bool:
    return name in PER_COMMAND_ENV or name.startswith("DVC_")


def _become_client_process(request: dict, fds: list[int], set_by_imports: dict[str, str]) -> None:
    """Turn this forked child into what the client's process would have been once it had
    imported the stage: its stdio, folder and environment, plus what those imports set."""
    os.setsid()  # its own process group, so that the client's signals reach all it starts
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**request["env"], **set_by_imports})
    for signum in SignalRelay.SIGNALS:  # the client's dispositions, not the server's
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, signal.SIG_IGN if signum in request.get("ignored_signals", []) else default)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = _text_stream(1, unbuffered)
    sys.stderr = _text_stream(2, True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


def _text_stream(fd: int, unbuffered: bool) -> io.TextIOWrapper:
    """A stream on ``fd`` buffered as Python buffers its own stdout/stderr at start-up."""
    raw = io.FileIO(fd, "w", closefd=False)
    interactive = raw.isatty()
    return io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), line_buffering=interactive or unbuffered,
                            write_through=unbuffered, errors="backslashreplace" if fd == 2 else "strict")


def _wait_or_kill(conn: socket.socket, pid: int) -> int:
    """The child's exit status (128 + signal when a signal ended it). A client that goes away
    takes the child with it."""
    pidfd = os.pidfd_open(pid)
    while True:
        ready, _, _ = select.select([pidfd, conn], [], [])
        if pidfd in ready:
            return _status(os.waitpid(pid, 0)[1])
        if not conn.recv(MAX_MESSAGE):  # the client closed: it was killed
            return _stop(pid)


def _stop(pid: int) -> int:
    """SIGTERM to the child's process group, SIGKILL after a grace period; its exit status."""
    signal_child(pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < deadline:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return _status(wait_status)
        time.sleep(0.1)
    signal_child(pid, signal.SIGKILL)
    return _status(os.waitpid(pid, 0)[1])


def _status(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def _module_stamps(root: Path) -> dict[str, float]:
    """Modification times of every source file this process imported from the project at ``root``."""
    stamps = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve().is_relative_to(root) and ".venv" not in Path(path).parts:
            stamps[path] = _mtime(path)
    return stamps


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        print("usage: python -m pipeline.runtime.stage_server SOCKET PACKAGE", file=sys.stderr)
        raise SystemExit(2)
    request = serve(*argv)
    if os.environ.get(TRACE_ENV):
        _trace_imports(request.stage)
    run_forked_stage(request)


def run_forked_stage(request: StageRequest) -> None:
    """Run the stage in this forked child and end the process as multiprocessing ends its forked
    children: exit handlers, flushed streams, ``os._exit``. A normal interpreter shutdown would
    release every object inherited from the server, copying each page it touches (~3 s here)."""
    import atexit
    import traceback

    try:
        status = run_stage_in_process(request.package, request.stage, request.args)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else _print_code(exit_.code))
    except KeyboardInterrupt:
        traceback.print_exc()
        status = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 -- as the interpreter would: the traceback, status 1
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _print_code(code: object) -> int:
    print(code, file=sys.stderr)
    return 1


def _trace_imports(stage: str) -> None:
    """At exit, name the top-level packages the stage imported after the fork (candidates for
    ``LAZY_IMPORTS``)."""
    import atexit

    warm = set(sys.modules)

    def report() -> None:
        late = sorted({name.split(".")[0] for name in set(sys.modules) - warm})
        print(f"stage_server: {stage} imported {len(set(sys.modules) - warm)} module(s) after the fork: "
              f"{', '.join(late)}", file=sys.stderr)

    atexit.register(report)


if __name__ == "__main__":
    main(sys.argv[1:])
