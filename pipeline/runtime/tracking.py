"""MLflow tracking: one experiment per pipeline, one run per stage execution.

Each run is tagged with its stage, variant, git commit and the hash of the params section it
read, and linked to the runs that produced its inputs through ``lineage.json`` files that every
stage writes beside its outputs. Everything goes through an explicit :class:`MlflowClient` and a
run id, never MLflow's global "active run", so a Ray worker on another node can log into the
same run by id.

The embedded default store is ``sqlite:///mlflow.db`` with artifacts in ``mlartifacts/`` (MLflow's
file store is in maintenance mode); ``MLFLOW_TRACKING_URI`` points it at a server instead.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.config import Params  # noqa: E402
from pipeline.io import file_sha256, flatten, write_json  # noqa: E402  (flatten: re-exported)

LINEAGE_FILE = "lineage.json"
SMALL_ARTIFACT_BYTES = 2 * 1024 * 1024  # larger outputs are logged as path + sha256, not copied
_MLFLOW_PARAM_CHARS = 6000


def numbers_of(results: Mapping[str, Any]) -> dict[str, int | float | bool]:
    """A stage's results as the flat numbers it publishes: dotted keys (``flatten``), numeric
    leaves only (strings, lists and None are dropped); booleans stay booleans in the JSON (a
    check that passed reads ``true``) and are logged to MLflow as 0/1."""
    return {k: v for k, v in flatten(results).items() if isinstance(v, (int, float))}


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


class TrackingUnreachable(ConnectionError):
    """The MLflow server named by ``MLFLOW_TRACKING_URI`` does not answer."""


def require_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line naming the server, when an HTTP tracking server does not
    answer its health check: MLflow's client would otherwise retry for ~4 minutes and end in a
    traceback. Local stores (sqlite, file) need no check."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnreachable(f"MLflow server {uri} does not answer ({reason}): start it, or unset "
                                  "MLFLOW_TRACKING_URI to use the local sqlite store") from None


def experiment_id(client: MlflowClient, name: str) -> str:
    """Get or create the pipeline's experiment; a SQLite store keeps artifacts in ``mlartifacts/``
    beside its database file (so a store on shared storage has its artifacts there too)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if (uri := tracking_uri()).startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit(cwd: str | Path | None = None) -> str:
    """The commit the code ran at, with '-dirty' when the work tree differs; 'unknown' outside git.

    ``$SPARSECLIP_GIT_COMMIT`` wins: a cluster job runs an uploaded copy of the code without
    ``.git``, so the submitter (``pipeline.runtime.submit``) passes the commit along.
    """
    if commit := os.environ.get("SPARSECLIP_GIT_COMMIT"):
        return commit
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=cwd
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=cwd,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def read_lineage(out_dir: str | Path) -> dict[str, Any] | None:
    """The lineage record an upstream stage left in its output folder, or None if it has none."""
    path = Path(out_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class StageRun:
    """A live MLflow run of one stage; thin, explicit wrappers over :class:`MlflowClient`."""

    client: MlflowClient
    run_id: str
    stage: str
    variant: str | None

    def log_params(self, params: Mapping[str, Any]) -> None:
        entries = [Param(k, _param_text(v)) for k, v in flatten(params).items()]
        for start in range(0, len(entries), 100):
            self.client.log_batch(self.run_id, params=entries[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the numbers of a (nested) mapping, booleans as 0/1; NaN and non-numbers are
        skipped. ``step`` makes them a curve."""
        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step or 0) for k, v in numbers_of(metrics).items() if not math.isnan(v)]
        for start in range(0, len(entries), 500):
            self.client.log_batch(self.run_id, metrics=entries[start : start + 500])

    def publish(self, results: Mapping[str, Any], path: str | Path | None = None, *, log: bool = True
                ) -> dict[str, int | float | bool]:
        """Publish a stage's results: :func:`numbers_of` them, write them to ``path`` (the DVC
        metrics file, when the stage has one) and log them to this run (``log=False`` where the
        run already holds them, e.g. as training curves). Returns the numbers."""
        numbers = numbers_of(results)
        if path is not None:
            write_json(path, numbers)
        if log:
            self.log_metrics(numbers)
        return numbers

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_file(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_dict(self, payload: Any, name: str) -> None:
        self.client.log_dict(self.run_id, payload, name)

    def log_outputs(self, paths: Iterable[str | Path], artifact_dir: str = "outputs") -> list[dict]:
        """Log stage outputs: small files as artifacts, large ones as path + size + sha256.

        The full listing goes to ``<artifact_dir>/index.json`` so a run names every file it wrote.
        """
        index = []
        for path in _files_under(paths):
            size = path.stat().st_size
            entry = {"path": str(path), "bytes": size, "sha256": file_sha256(path)}
            if size <= SMALL_ARTIFACT_BYTES:
                parent = Path(artifact_dir) / _relative(path).parent
                self.log_file(path, parent.as_posix())
                entry["artifact"] = (parent / path.name).as_posix()
            index.append(entry)
        self.log_dict({"files": index}, f"{artifact_dir}/index.json")
        return index


@contextmanager
def stage_run(
    params: Params,
    stage: str,
    *,
    variant: str | None = None,
    section: Mapping[str, Any] | None = None,
    section_name: str | None = None,
    upstream: Iterable[str | Path] = (),
    lineage_dir: str | Path | None = None,
    resume_key: str | None = None,
) -> Iterator[StageRun]:
    """Open an MLflow run for one stage execution, tagged and linked; close it FINISHED or FAILED.

    ``section`` is the params the stage read (logged as params); ``upstream`` the output folders
    of the stages it depends on, whose lineage files give the parent run ids; ``lineage_dir`` is
    where this run's own lineage file is written, for the stages downstream.

    Runs of this stage and variant left RUNNING by a process that died (killed, or its machine
    lost power: same host, pid gone) are closed as KILLED first, so no run stays RUNNING forever.
    With ``resume_key`` (a training's identity: its params and data), the newest such orphan
    with the same key is continued instead: the rerun logs into the killed run, whose metric
    history the resumed training extends rather than repeats.
    """
    require_reachable(tracking_uri())
    client = MlflowClient(tracking_uri())
    exp_id = experiment_id(client, params.project.experiment)
    resumed = close_orphans(client, exp_id, stage, variant, resume_key)
    name = f"{stage}-{variant}" if variant else stage
    section_name = section_name or stage
    upstream_runs = {}
    for folder in upstream:
        record = read_lineage(folder)
        if record:
            key = f"{record['stage']}-{record['variant']}" if record.get("variant") else record["stage"]
            upstream_runs[key] = record["run_id"]
    tags = {
        "stage": stage,
        "variant": variant or "",
        "git_commit": git_commit(),
        "params_section": section_name,
        "params_hash": params.section_hash(section_name) if section_name in Params.model_fields else "",
        "upstream_run_ids": json.dumps(upstream_runs, sort_keys=True),
        **{f"upstream.{key}": run_id for key, run_id in upstream_runs.items()},
        **dvc_experiment_tags(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **({"resume_key": resume_key} if resume_key else {}),
    }
    if resumed:
        handle = StageRun(client, resumed, stage, variant)
        handle.set_tags({**tags, "resumed": "true"})
    else:
        run = client.create_run(exp_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
        handle = StageRun(client, run.info.run_id, stage, variant)
    if section is not None:
        handle.log_params(section)
    try:
        yield handle
    except BaseException:
        client.set_terminated(handle.run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    if lineage_dir is not None:
        write_lineage(lineage_dir, handle, exp_id, upstream_runs)
    client.set_terminated(handle.run_id, RunStatus.to_string(RunStatus.FINISHED))


def close_orphans(client: MlflowClient, exp_id: str, stage: str, variant: str | None,
                  resume_key: str | None = None) -> str | None:
    """Close this stage's (and variant's) orphaned RUNNING runs as KILLED, except the newest whose
    ``resume_key`` tag equals ``resume_key``, whose id is returned for the caller to continue.
    An orphan ran on this host under a pid that no longer exists; a run still alive elsewhere
    (another machine, a parallel ``dvc exp`` worker) is never touched."""
    query = f"attributes.status = 'RUNNING' and tags.stage = '{stage}' and tags.variant = '{variant or ''}'"
    orphans = [run for run in client.search_runs([exp_id], query, order_by=["attributes.start_time DESC"])
               if _is_orphan(run.data.tags)]
    keep = next((run.info.run_id for run in orphans
                 if resume_key and run.data.tags.get("resume_key") == resume_key), None)
    for run in orphans:
        if run.info.run_id != keep:
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return keep


def _is_orphan(tags: Mapping[str, str]) -> bool:
    if tags.get("host") != socket.gethostname() or not tags.get("pid", "").isdigit():
        return False
    pid = int(tags["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment this stage runs in (``dvc exp run`` sets these variables), so runs of one
    experiment can be found again: its metrics files are not committed to Git, its runs are here."""
    names = {"dvc_exp": "DVC_EXP_NAME", "dvc_exp_baseline": "DVC_EXP_BASELINE_REV"}
    return {tag: os.environ[var] for tag, var in names.items() if os.environ.get(var)}


def write_lineage(out_dir: str | Path, run: StageRun, exp_id: str, upstream: Mapping[str, str]) -> None:
    record = {
        "stage": run.stage,
        "variant": run.variant,
        "run_id": run.run_id,
        "experiment_id": exp_id,
        "upstream": dict(upstream),
    }
    write_json(Path(out_dir) / LINEAGE_FILE, record)


def metric_curves(run_id: str, prefix: str = "") -> dict[int, dict[str, float]]:
    """Every metric of a run whose name starts with ``prefix``, as {step: {name: value}}."""
    client = MlflowClient(tracking_uri())
    rows: dict[int, dict[str, float]] = {}
    for name in sorted(client.get_run(run_id).data.metrics):
        if name.startswith(prefix):
            for point in client.get_metric_history(run_id, name):
                rows.setdefault(point.step, {})[name] = point.value
    return dict(sorted(rows.items()))


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:_MLFLOW_PARAM_CHARS]


def _relative(path: Path) -> Path:
    """A path as the project names it: relative to the working directory when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return Path(*path.resolve().parts[1:])


def _files_under(paths: Iterable[str | Path]) -> Iterator[Path]:
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
