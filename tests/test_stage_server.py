"""The warm stage server: a stage forked from it runs as its own command would, or not at all.

A server here preloads one light stage module (report) and, for the tests' sake, runs a probe
instead of the stage when the arguments ask for one (`--probe-*`): printing what the child sees,
or sleeping so that a test can interrupt or kill its client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runtime import stage_server
from pipeline.runtime.stage_server import SERVER_ENV, WarmState, _refusal

from .conftest import REPO

SERVER = """
import json, os, sys, time
from pipeline.runtime.stage_server import serve, run_forked_stage
request = serve(sys.argv[1], "stages", ["stages.report"])
if request.args[:1] == ["--probe-env"]:
    print(json.dumps({"cwd": os.getcwd(), "pid": os.getpid(), "pgid": os.getpgid(0),
                      "env": {k: os.environ.get(k) for k in request.args[1:]}}), flush=True)
    raise SystemExit(7)
if request.args[:1] == ["--probe-signals"]:
    import signal
    print(json.dumps({"sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN}), flush=True)
    raise SystemExit(0)
if request.args[:1] == ["--probe-sleep"]:
    print(os.getpid(), flush=True)
    while True:  # short sleeps: a signal that lands between the print and a long sleep's syscall would
        time.sleep(0.05)  # wait out that sleep; the loop's next turn raises it
run_forked_stage(request)
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The server's private folder: its socket and its own output (``server.log``)."""
    return tmp_path_factory.mktemp("warm")


@pytest.fixture(scope="module")
def server(folder):
    """A server on a socket in a private folder, and the environment that sends stages to it."""
    address = str(folder / "stages.sock")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_DISABLE_TELEMETRY", None)  # pipeline.runtime.tracking sets it when imported: the child must too
    log = folder / "server.log"  # the server's and its supervisors' own output
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, address], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out)
    deadline = time.monotonic() + 120
    while not Path(address).exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)
    yield {**env, SERVER_ENV: address}
    proc.terminate()
    proc.wait(timeout=30)


def stage(env: dict, *args: str, cwd: Path = REPO, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_a_warm_stage_runs_in_the_clients_folder_with_its_environment_and_output(server, tmp_path):
    # SERVER_ENV is the one variable the client has and the server had not
    proc = stage(server, "report", "--probe-env", "MLFLOW_DISABLE_TELEMETRY", "PYTHONPATH", cwd=tmp_path)
    assert proc.returncode == 7, proc.stderr  # the child's exit status is the command's
    seen = json.loads(proc.stdout)
    assert seen["cwd"] == str(tmp_path) and seen["pid"] != os.getpid()
    assert seen["pgid"] == seen["pid"]  # its own process group: the client's signals reach all it starts
    assert seen["env"] == {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO)}  # + what imports set
    assert "declined" not in proc.stderr and "cold" not in proc.stderr


def test_a_warm_stage_is_the_real_stage_with_its_errors_and_status(server):
    proc = stage(server, "report", "--experiment")  # argparse: the option needs a value
    assert proc.returncode == 2 and "usage: python -m stages.report" in proc.stderr
    assert "cold" not in proc.stderr


def test_without_a_server_or_with_a_dead_one_the_stage_runs_in_its_own_process(server, tmp_path):
    for env in ({k: v for k, v in server.items() if k != SERVER_ENV}, {**server, SERVER_ENV: str(tmp_path / "no")}):
        proc = stage(env, "report", "--experiment")
        assert proc.returncode == 2 and "usage: python -m stages.report" in proc.stderr
    assert "no warm stage server" in proc.stderr and "running report cold" in proc.stderr
    assert stage(server, "nosuch").returncode == 2


def test_a_client_under_another_environment_is_declined_and_runs_cold(server):
    proc = stage({**server, "OMP_NUM_THREADS": "3"}, "report", "--experiment")
    assert "declined (the environment differs from the one it imported under (OMP_NUM_THREADS))" in proc.stderr
    assert proc.returncode == 2 and "usage: python -m stages.report" in proc.stderr


def sigint(disposition):
    """For Popen: start the child with SIGINT at ``disposition`` whatever this process has (a
    test run started in the background ignores SIGINT, and its children inherit that)."""
    return lambda: signal.signal(signal.SIGINT, disposition)


def test_the_stage_ignores_sigint_exactly_when_its_client_does(server):
    for disposition, ignored in ((signal.SIG_DFL, False), (signal.SIG_IGN, True)):
        proc = subprocess.run([sys.executable, "-m", "stages", "report", "--probe-signals"], cwd=REPO, env=server,
                              capture_output=True, text=True, timeout=60, preexec_fn=sigint(disposition))
        assert json.loads(proc.stdout) == {"sigint_ignored": ignored}, proc.stderr


def test_interrupting_the_client_interrupts_the_stage(server):
    client = subprocess.Popen([sys.executable, "-m", "stages", "report", "--probe-sleep"], cwd=REPO, env=server,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=sigint(signal.SIG_DFL))
    child = int(client.stdout.readline())
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=30) == 128 + signal.SIGINT  # the child's KeyboardInterrupt, as a shell reports it
    assert not _alive(child)


def test_killing_the_client_takes_its_stage_with_it(server, folder):
    client = subprocess.Popen([sys.executable, "-m", "stages", "report", "--probe-sleep"], cwd=REPO, env=server,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    child = int(client.stdout.readline())
    client.kill()
    client.wait()
    deadline = time.monotonic() + stage_server.KILL_GRACE_S + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child)
    time.sleep(0.5)  # the supervisor reaps the child and ends
    assert "Traceback" not in (folder / "server.log").read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(")")[-1].split()[0] != "Z"


def test_refused_when_a_module_changed_another_checkout_asks_or_the_environment_differs(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("x = 1\n")
    env = {"HOME": "/root", "PWD": "/a", "DVC_ROOT": "/b", "PS1": "(.venv) $ "}
    warm = WarmState({str(module): os.stat(module).st_mtime}, "/repo/stages", ("train",), env, {})
    client = {k: v for k, v in env.items() if k != "PS1"}  # DVC's non-interactive shell drops the prompt
    request = {"stage": "train", "package": "/repo/stages", "env": {**client, "PWD": "/c", "SHLVL": "2"}}
    assert _refusal(request, warm) is None  # per-command variables do not count
    assert "not /copy/stages" in _refusal({**request, "package": "/copy/stages"}, warm)
    assert "unknown stage" in _refusal({**request, "stage": "nosuch"}, warm)
    assert "(HOME)" in _refusal({**request, "env": {**client, "HOME": "/x"}}, warm)
    assert "(EXTRA)" in _refusal({**request, "env": {**client, "EXTRA": "1"}}, warm)
    os.utime(module, (0, 0))
    assert f"changed since it imported them, e.g. {module}" in _refusal(request, warm)


def test_the_server_does_not_fork_while_another_thread_is_alive():
    """In a fresh interpreter (this one may hold Ray's threads): one thread forks, two do not."""
    probe = (
        "import threading\n"
        "from pipeline.runtime.stage_server import fork_refusal\n"
        "print(fork_refusal())\n"
        "release = threading.Event(); worker = threading.Thread(target=release.wait); worker.start()\n"
        "print(fork_refusal())\n"
        "release.set(); worker.join()\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    alone, with_thread = out.splitlines()
    assert alone == "None" and "2 threads are alive" in with_thread
