"""Running on a cluster: the job a submission builds, the paper-scale params and manifests, and,
for real, a two-node Ray cluster on loopback that runs `dvc repro train@sparse` submitted through
the Jobs API, with the two training workers on different nodes and every run in MLflow."""

from __future__ import annotations

import json
import math
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.exceptions import AuthenticationError

from pipeline.clip.model import clip_config
from pipeline.config import ParamsError, load_params
from pipeline.runtime.job import apply_overrides, materialise, ray_excludes, read_override
from pipeline.runtime.submit import build_job, client, ray_job_submit_command

from .conftest import REPO

PAPER = REPO / "deploy" / "params.paper.yaml"
# The embedded pipeline at test size (tests/tiny.py's TINY_RUN), as an override file.
TINY = {
    "sample": {"source": {"generator": {"num_records": 180}}, "shard_size": 60},
    "train": {
        "model": {"inline": {"embed_dim": 16,
                             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                            "head_width": 16},
                             "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2,
                                          "layers": 1}},
                  "expansion": 8},
        "optim": {"lr": 0.002, "warmup_steps": 2},
        "global_batch_size": 32, "epochs": 2, "log_every": 1, "eval_every": 4, "checkpoint_every": 3,
        "placement_strategy": "SPREAD", "num_workers": 2, "threads_per_worker": 1,  # one worker per node
    },
}


# --------------------------------------------------------------------------- the job, without a cluster


def test_job_uploads_code_only_and_carries_storage_mlflow_and_commit():
    spec = build_job(REPO, ["train@sparse"], workspace="/mnt/shared/ws", params_override="deploy/params.paper.yaml",
                     storage_path="s3://bucket/ray", mlflow_uri="http://mlflow:5000", git_commit="abc123",
                     submission_id="sc-1")
    assert spec.entrypoint == ("python -m pipeline.runtime.job --workspace /mnt/shared/ws "
                               "--params-override deploy/params.paper.yaml -- train@sparse")
    assert spec.runtime_env["working_dir"] == str(REPO)
    assert {"/.venv", "/.git", "/.dvc/cache", "/data", "/models", "/mlruns", "/mlflow.db"} <= set(
        spec.runtime_env["excludes"])
    assert "/pipeline" not in spec.runtime_env["excludes"]  # pipeline/data is code, /data is output
    assert spec.runtime_env["env_vars"] == {"SPARSECLIP_STORAGE_PATH": "s3://bucket/ray",
                                            "SPARSECLIP_GIT_COMMIT": "abc123",
                                            "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    command = ray_job_submit_command(spec, "http://head:8265")
    assert command.startswith("ray job submit --address http://head:8265 --submission-id sc-1")
    assert command.endswith("-- python -m pipeline.runtime.job --workspace /mnt/shared/ws "
                            "--params-override deploy/params.paper.yaml -- train@sparse")


def test_job_defaults_and_refusals(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = build_job(REPO, [], storage_path=str(tmp_path / "shared"), git_commit="c", submission_id="sc-2")
    assert spec.metadata["workspace"] == f"{tmp_path}/shared/workspaces/sc-2"  # outputs beside the checkpoints
    assert spec.entrypoint.endswith("--")  # no repro arguments: the whole pipeline
    with pytest.raises(ValueError, match="give --workspace"):
        build_job(REPO, [], storage_path="s3://bucket/ray", git_commit="c")
    outside = tmp_path / "over.yaml"
    outside.write_text("train: {epochs: 2}\n")
    with pytest.raises(ValueError, match="outside the project"):
        build_job(REPO, [], workspace="/ws", params_override=str(outside), git_commit="c")
    inside = REPO / "deploy" / "params.paper.yaml"
    with pytest.raises(ParamsError, match="not divisible by num_workers 255"):  # validated before anything is submitted
        load_params(REPO / "params.yaml", {**read_override(inside), "train.num_workers": 255})


def test_paper_params_are_valid_at_the_papers_scale():
    for params in (load_params(REPO / "params.yaml", read_override(PAPER)), load_params(PAPER)):
        model = params.train.model_for("sparse")
        assert (model.arch, model.expansion) == ("ViT-L-14", 72)
        assert clip_config(model)["embed_dim"] * model.expansion == 55296
        assert (params.train.global_batch_size, params.train.num_workers) == (32768, 256)
        assert params.train.use_gpu and params.train.resources_per_worker["GPU"] == 1
        assert params.extract.actor_gpus == 1 and params.ray.storage_path.startswith("s3://")
    merged = load_params(REPO / "params.yaml", read_override(PAPER))
    assert merged.train.resources_per_worker == {"CPU": 8, "GPU": 1}
    assert set(merged.train.variants) >= set(load_params(REPO / "params.yaml").train.variants)
    # the paper's recipe exactly: none of the embedded default's knobs (docs/findings.md, "Sparsity in the embedded run")
    assert merged.train.optim.neutral_heads
    caps = {name: merged.train.model_for(name).logit_scale_cap for name in merged.train.variants}
    assert caps == {"dense": 100, "sparse": 50, "sparse_plus": 40, "sparse_avg": 50}
    for name in merged.train.variants:
        model = merged.train.model_for(name)
        assert model.head_bias_init is None and model.logit_scale_mode == "learnable"
        assert model.initial_logit_scale == pytest.approx(math.log(1 / 0.07), abs=1e-4)


def test_deploy_manifests_agree_with_the_paper_params():
    params = load_params(REPO / "params.yaml", read_override(PAPER))
    rayjob = yaml.safe_load((REPO / "deploy" / "rayjob.paper.yaml").read_text())
    assert rayjob["kind"] == "RayJob" and rayjob["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus == params.train.num_workers
    assert "pipeline.runtime.job" in rayjob["spec"]["entrypoint"] and "deploy/params.paper.yaml" in rayjob["spec"]["entrypoint"]
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["excludes"] == ray_excludes()
    launcher = yaml.safe_load((REPO / "deploy" / "cluster.paper.yaml").read_text())
    workers = launcher["available_node_types"]["gpu_8x"]
    assert workers["min_workers"] * workers["resources"]["GPU"] == params.train.num_workers


def test_workspace_keeps_outputs_and_gets_params(tmp_path):
    source, workspace = tmp_path / "src", tmp_path / "ws"
    for name in ("pipeline/data/x.py", "params.yaml", "dvc.lock", "data/big.tar", ".venv/bin/python",
                 ".cache/lm/smollm2/config.json", ".cache/other/x"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(name)
    (source / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (workspace / "models").mkdir(parents=True)
    (workspace / "models" / "m.pt").write_text("an earlier job's output")
    (workspace / "dvc.lock").write_text("the workspace's own lock")
    materialise(source, workspace)
    assert (workspace / "pipeline/data/x.py").is_file() and not (workspace / "data").exists()
    assert not (workspace / ".venv").exists() and (workspace / "models" / "m.pt").is_file()
    assert (workspace / "dvc.lock").read_text() == "the workspace's own lock"
    # the language model the checkout's setup converted is linked, not converted again; other caches stay out
    assert (workspace / ".cache/lm").resolve() == (source / ".cache/lm").resolve()
    assert (workspace / ".cache/lm/smollm2/config.json").is_file() and not (workspace / ".cache/other").exists()
    materialise(source, workspace)  # a second job into the same workspace keeps the link
    assert (workspace / ".cache/lm").is_symlink()
    apply_overrides(workspace / "params.yaml", {**read_override(PAPER), "ray.storage_path": "/nfs/ray"})
    params = load_params(workspace / "params.yaml")
    assert params.train.num_workers == 256 and params.ray.storage_path == "/nfs/ray"


def test_processes_a_workspace_stage_starts_import_the_workspaces_code(tmp_path):
    """A Ray worker's folder is not the workspace; with the project installed editable it would
    import the checkout the workspace was copied from, unless the workspace comes first."""
    import subprocess
    import sys

    from pipeline.runtime.job import workspace_env

    workspace = tmp_path / "ws"
    (workspace / "pipeline").mkdir(parents=True)
    (workspace / "pipeline" / "__init__.py").write_text("")
    elsewhere = tmp_path / "worker-folder"
    elsewhere.mkdir()
    found = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=elsewhere,
                           env=workspace_env(workspace), capture_output=True, text=True, check=True).stdout.strip()
    assert found == str(workspace / "pipeline" / "__init__.py")


def test_a_job_driver_does_not_repeat_the_jobs_env_vars(monkeypatch):
    """Ray refuses to merge a driver's runtime_env with its job's when both set one variable."""
    from pipeline.runtime import cluster

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////shared/mlflow.db")
    assert cluster._worker_env()["MLFLOW_TRACKING_URI"] == "sqlite:////shared/mlflow.db"
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"MLFLOW_TRACKING_URI": "sqlite:////x"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env = cluster._worker_env()
    assert "MLFLOW_TRACKING_URI" not in env and env["HF_HUB_OFFLINE"] == "1"


def test_one_machine_workers_start_no_preemption_watcher(ray_local):
    """Nothing drains a node of a one-machine cluster: Ray Train's watcher actor is switched off
    there (one process less per training) and left on for a cluster on the network."""
    import os

    from pipeline.runtime import cluster

    @ray_local.remote(num_cpus=0.1)
    def switch():
        return os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")

    assert ray_local.get(switch.remote()) == "0"  # the session's local cluster
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in cluster._worker_env(one_machine=False)


def test_ray_workers_silence_only_the_placement_group_cleaners_state_api_warning(ray_local):
    """Without a dashboard the cleaner's State API poll fails every second (hundreds of warnings per
    training); every worker process starts with that one logger at ERROR, the others untouched."""
    import logging

    from pipeline.runtime.cluster import NOISY_WORKER_LOGGERS

    @ray_local.remote(num_cpus=0.1)
    def levels():
        return [logging.getLogger(n).getEffectiveLevel() for n in (*NOISY_WORKER_LOGGERS, "ray.train")]

    *noisy, train = ray_local.get(levels.remote())
    assert noisy == [logging.ERROR] * len(NOISY_WORKER_LOGGERS) and train < logging.ERROR


def test_ray_trains_report_lines_are_raised_to_warning_in_workers(ray_local):
    """Ray Train logs each report on a logger named by its file's path, out of reach of its own
    LoggingConfig: every worker raises exactly that logger to WARNING."""
    import logging

    @ray_local.remote(num_cpus=0.1)
    def level():
        import ray.train.v2._internal.execution.context as context

        return logging.getLogger(context.__file__).getEffectiveLevel()  # the name Ray Train logs under

    assert ray_local.get(level.remote()) == logging.WARNING


# --------------------------------------------------------------------------- a real two-node cluster


@pytest.fixture(scope="module")
def two_nodes():
    """A head (dashboard + Jobs API on 127.0.0.1) and one more node, each 1 CPU, token auth on."""
    bootstrap = Path.home() / "ray_bootstrap_config.yaml"
    if not bootstrap.exists():  # without it the dashboard probes cloud metadata addresses
        bootstrap.write_text("provider: {type: local}\n")
    temp = tempfile.mkdtemp(prefix="scray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    with open(Path(temp) / "cluster.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.local_cluster", temp, "2"], cwd=REPO, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        if not line:
            pytest.fail(f"the local cluster did not start:\n{(Path(temp) / 'cluster.log').read_text()[-3000:]}")
        yield {**json.loads(line), "token": token}
    finally:
        proc.stdin.close()  # the helper shuts its nodes down when its stdin closes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_submitted_pipeline_trains_on_both_nodes_and_logs_to_mlflow(two_nodes, repo_copy, tmp_path):
    (repo_copy / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    workspace, storage, db = tmp_path / "ws", tmp_path / "shared", tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    with pytest.raises(AuthenticationError):  # token auth is on: a wrong token is refused
        client(two_nodes["dashboard"], token="not-the-token").list_jobs()

    env = {**os.environ, "RAY_AUTH_TOKEN": two_nodes["token"], "SPARSECLIP_GIT_COMMIT": "cafe1234"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.runtime.submit", "--address", two_nodes["dashboard"], "--project", str(repo_copy),
         "--workspace", str(workspace), "--storage-path", str(storage), "--mlflow-uri", f"sqlite:///{db}",
         "--params-override", "tiny.yaml", "--submission-id", "sc-two-nodes", "--timeout", "420",
         "--", "train@sparse"],
        cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        client(two_nodes["dashboard"], token=two_nodes["token"]).stop_job("sc-two-nodes")
    assert done.returncode == 0, f"job failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"

    assert (workspace / "models" / "sparse" / "model.pt").is_file()
    assert "train@sparse" in yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    params = load_params(workspace / "params.yaml")
    assert params.train.global_batch_size == 32 and params.ray.storage_path == str(storage)
    workers = json.loads((workspace / "models" / "sparse" / "workers.json").read_text())
    assert [w["rank"] for w in workers] == [0, 1]
    assert {w["node_id"] for w in workers} == set(two_nodes["node_ids"]), "the workers shared a node"

    mlflow = MlflowClient(f"sqlite:///{db}")
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("sparseclip").experiment_id])
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert set(by_stage) == {"sample", "tower_cache", "train"} and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["git_commit"] for r in runs} == {"cafe1234"}
    train = by_stage["train"]
    assert train.data.tags["ray_nodes"] == "2" and train.data.tags["upstream.sample"] == by_stage["sample"].info.run_id
    assert train.data.tags["upstream.tower_cache"] == by_stage["tower_cache"].info.run_id
    n_train = json.loads((workspace / "data/sample/manifest.json").read_text())["records_by_split"]["train"]
    steps = [m.step for m in mlflow.get_metric_history(train.info.run_id, "train/loss")]
    assert steps == list(range(1, n_train // 32 * 2 + 1))  # every step of 2 epochs, once
    assert (db.parent / "mlartifacts").is_dir()  # artifacts beside the shared store
    assert storage.is_dir()  # Ray Train's checkpoints went to the shared storage path


@pytest.mark.integration
def test_shared_cluster_runs_a_command_whose_ray_stages_join_it(tmp_path):
    """`make pipeline` wraps `dvc repro` in one loopback cluster: a child's connect() joins it (no new
    cluster), the child's exit status comes back, and nothing of the cluster is left behind."""
    child = ("import json, os; from pipeline.runtime.cluster import connect; from pipeline.config import RayParams; "
             "r = connect(RayParams(num_cpus=1)); "
             "print(json.dumps({'cpus': r['CPU'], 'loopback': 'node:127.0.0.1' in r, 'tmp': os.environ['RAY_TMPDIR']})); "
             "raise SystemExit(3)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    (tmp_path / "params.yaml").write_text("ray: {num_cpus: 2}\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.runtime.shared_cluster", sys.executable, "-c", child],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 3, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["cpus"] == 2.0 and seen["loopback"]  # the shared head's 2 CPUs, not the child's own 1
    assert not Path(seen["tmp"]).exists()


@pytest.mark.integration
def test_a_local_job_runs_its_stages_in_one_shared_cluster(tmp_path, monkeypatch):
    """`make pipeline-flickr8k` is a job in a workspace: its `dvc repro` is wrapped as `make pipeline`'s
    is, so every stage sees the one loopback head (and the warm stage server) instead of starting
    its own Ray; nothing of the cluster is left once the job ends."""
    from pipeline.runtime.job import run_job

    source, workspace = tmp_path / "src", tmp_path / "ws"
    source.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=source, check=True)
    (source / "params.yaml").write_text((REPO / "params.yaml").read_text())
    stage = "import json, os; json.dump({k: os.environ.get(k) for k in ('RAY_ADDRESS', 'RAY_TMPDIR')}, open('seen.json', 'w'))"
    (source / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"probe": {"cmd": f'{sys.executable} -c "{stage}"',
                                                                           "outs": ["seen.json"]}}}))
    for name in ("RAY_ADDRESS", "RAY_TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(source)
    assert run_job(workspace, [], params_override=None) == 0
    seen = json.loads((workspace / "seen.json").read_text())
    assert seen["RAY_ADDRESS"].startswith("127.0.0.1:")
    assert not Path(seen["RAY_TMPDIR"]).exists()


def test_a_data_pool_that_leaves_no_cpu_for_its_feeders_fails_at_once(ray_local, monkeypatch):
    """ray.num_cpus: 1 with two 0.5-CPU actors read 0 rows for minutes: now one message naming
    the params and the cluster's CPUs, before Ray Data starts."""
    from pipeline.runtime import cluster

    cluster.require_data_pool("extract", actors=2, task_cpus=0.5)  # 1.5 of the test cluster's 2 CPUs
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {"CPU": 1.0})
    with pytest.raises(ValueError, match=r"2 actor\(s\) x ray.task_cpus 0.5 CPU .* needs 1.5 CPUs; the cluster has 1"):
        cluster.require_data_pool("extract", actors=2, task_cpus=0.5)
    cluster.require_data_pool("extract", actors=1, task_cpus=0.5)
    with pytest.raises(ValueError, match=r"extract.actor_gpus 1 GPU needs 1 GPUs; the cluster has 0"):
        cluster.require_data_pool("extract", actors=1, task_cpus=0.5, actor_gpus=1.0)


def test_trainings_the_cluster_cannot_hold_fail_at_once_naming_what_is_missing(ray_local, workdir):
    """use_gpu on a machine without a GPU used to wait forever in Ray Train's start-up loop."""
    import time

    from pipeline.clip.train import run_training
    from pipeline.runtime.cluster import require_resources, worker_resources
    from pipeline.config import load_params

    from .conftest import REPO

    assert worker_resources({"CPU": 0.5}, use_gpu=True) == {"CPU": 0.5, "GPU": 1.0}
    assert worker_resources({"CPU": 1, "GPU": 0.5}, use_gpu=True) == {"CPU": 1.0, "GPU": 0.5}
    require_resources("train", {"CPU": 0.5}, 2, wait=False)  # fits: no error
    require_resources("train", {"GPU": 1.0}, 1, wait=True)  # an autoscaler may add it: no check
    with pytest.raises(ValueError, match=r"1 x 1 GPU .* set use_gpu: false"):
        require_resources("train", {"CPU": 0.5, "GPU": 1.0}, 1, wait=False)
    with pytest.raises(ValueError, match=r"64 x 1 CPU"):
        require_resources("vlm", {"CPU": 1.0}, 64, wait=False)

    (workdir / "data").mkdir()
    (workdir / "data" / "manifest.json").write_text('{"records_by_split": {"train": 1000}}')
    params = load_params(REPO / "params.yaml", overrides={"train.use_gpu": True, "sample.out_dir": str(workdir / "data"),
                                                          "ray.storage_path": str(workdir / "ray_results")})
    started = time.perf_counter()
    with pytest.raises(ValueError, match="train: cannot place the workers"):
        run_training(params, "sparse")
    assert time.perf_counter() - started < 60


LISTENERS = r"""
import json, sys, tempfile, psutil, ray
from pipeline.runtime.cluster import connect
from pipeline.config import load_params
from pipeline.runtime.raytrain import make_trainer
import ray.data

def listeners(process):
    # program names without their folders: a deep checkout path would push "gcs_server" past the cut
    try:
        name = " ".join(a.rsplit("/", 1)[-1] for a in process.cmdline()[:2])[:80]
        return [{"process": name, "address": c.laddr.ip, "port": c.laddr.port}
                for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:  # a worker that has just exited
        return []

def training_worker(config):  # inside Ray Train, with its torch process group up
    import torch.distributed as dist
    assert dist.is_initialized() and dist.get_world_size() == 2
    dist.barrier()
    with open(f"{config['out']}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(listeners(psutil.Process()), f)
    dist.barrier()

params = load_params("params.yaml")
connect(params.ray)
assert ray.data.range(8).map_batches(lambda b: b, num_cpus=0.25).count() == 8
ray.get(ray.remote(num_cpus=0.25)(lambda: 1).remote())
with tempfile.TemporaryDirectory() as out:
    params = params.model_copy(update={"ray": params.ray.model_copy(update={"storage_path": out})})
    group = params.train.model_copy(update={"num_workers": 2, "resources_per_worker": {"CPU": 0.25}})
    make_trainer(params, "probe", group, training_worker, {"out": out}, "probe").fit()
    found = [entry for rank in (0, 1) for entry in json.load(open(f"{out}/rank{rank}.json"))]
tree = [psutil.Process(), *psutil.Process().children(recursive=True)]
found += [entry for p in tree for entry in listeners(p)]
print("LISTENERS " + json.dumps(found))
ray.shutdown()
"""


@pytest.mark.integration
def test_a_stage_that_starts_its_own_cluster_listens_on_loopback_only():
    """A stage run alone (no shared cluster, no RAY_ADDRESS) starts a local Ray; every socket its
    Ray processes listen on (GCS, raylet, driver, workers, agents) is on 127.0.0.1, and so is every
    socket of a two-worker training while its torch process group is up (the rendezvous store,
    which torch binds to every interface unless handed a loopback socket, and gloo's pairs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    done = subprocess.run([sys.executable, "-c", LISTENERS], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [x for x in done.stdout.splitlines() if x.startswith("LISTENERS ")]
    listeners = json.loads(line.removeprefix("LISTENERS "))
    names = " ".join(entry["process"] for entry in listeners)
    assert "gcs_server" in names and "raylet" in names, listeners  # the check saw Ray's own processes
    assert "RayTrainWorker" in names, listeners  # ... and the training's workers, group up
    exposed = [entry for entry in listeners if entry["address"] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, exposed


def test_long_params_train_every_model_nine_times_longer_with_the_papers_heads():
    """deploy/params.long.yaml (`make pipeline-long`) merges into params.yaml as a valid file: the
    embedded data and models, 18 epochs instead of 2, the paper's neutral heads, caps that keep
    Sparse+ sparser than Sparse."""
    base = load_params(REPO / "params.yaml")
    long = load_params(REPO / "params.yaml", read_override(REPO / "deploy" / "params.long.yaml"))
    assert long.sample == base.sample and long.train.model.inline == base.train.model.inline
    assert long.train.epochs == 9 * base.train.epochs and set(long.train.variants) == set(base.train.variants)
    assert long.train.optim.neutral_heads and long.train.model.head_bias_init is None
    caps = {name: long.train.model_for(name).logit_scale_cap for name in long.train.variants}
    assert caps["sparse_plus"] < caps["sparse"] and long.train.model_for("sparse_avg").pooling == "avg"
