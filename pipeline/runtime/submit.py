"""Submit the pipeline, or some of its stages, to a Ray cluster as a Ray job.

The job uploads this project's code, params and DVC files as its ``working_dir`` (outputs,
environments and caches are excluded), and runs :mod:`pipeline.runtime.job`, which runs ``dvc repro``
in a workspace on shared storage. Three things travel with it as environment variables:

- ``SPARSECLIP_STORAGE_PATH``: ``ray.storage_path``, where Ray Train keeps checkpoints (local,
  NFS or ``s3://``; every node must reach it);
- ``MLFLOW_TRACKING_URI``: the tracking server every stage logs to (default: a SQLite store in
  the workspace);
- ``SPARSECLIP_GIT_COMMIT``: the commit submitted, tagged on every MLflow run (no ``.git``
  travels with the job).

    python -m pipeline.runtime.submit --address http://head:8265 --workspace /mnt/shared/sparseclip \\
        --params-override deploy/params.paper.yaml --mlflow-uri http://mlflow:5000 -- train@sparse

With token authentication on (Ray's default), the token is read like ``ray job submit`` reads it:
``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import DEFAULT_PARAMS, load_params
from pipeline.runtime.cli import INPUT_ERRORS, fail
from pipeline.runtime.job import STORAGE_ENV, ray_excludes, read_override

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class JobSpec:
    """Everything ``JobSubmissionClient.submit_job`` (or ``ray job submit``) is given."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)


def build_job(project: str | Path, repro_args: list[str], *, workspace: str | None = None,
              params_override: str | None = None, storage_path: str | None = None,
              mlflow_uri: str | None = None, git_commit: str | None = None,
              submission_id: str | None = None) -> JobSpec:
    """The job for ``dvc repro <repro_args>``; params are validated here, before anything runs."""
    project = Path(project).resolve()
    submission_id = submission_id or f"sparseclip-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    override_rel = _inside(project, params_override) if params_override else None
    params = load_params(project / DEFAULT_PARAMS, read_override(override_rel and project / override_rel))
    storage = _shared_path(project, storage_path or params.ray.storage_path)
    if workspace is None:
        if "://" in storage:
            raise ValueError(f"ray.storage_path {storage} is not a filesystem path: give --workspace, a folder "
                             "every node mounts (NFS), for the stage outputs")
        workspace = f"{storage}/workspaces/{submission_id}"
    env = {STORAGE_ENV: storage, "SPARSECLIP_GIT_COMMIT": git_commit or _git_commit(project)}
    if mlflow_uri := mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    command = ["python", "-m", "pipeline.runtime.job", "--workspace", workspace]
    if override_rel:
        command += ["--params-override", override_rel.as_posix()]
    return JobSpec(
        submission_id=submission_id,
        entrypoint=shlex.join([*command, "--", *repro_args]),
        runtime_env={"working_dir": str(project), "excludes": ray_excludes(), "env_vars": env},
        metadata={"project": "sparseclip", "git_commit": env["SPARSECLIP_GIT_COMMIT"],
                  "workspace": workspace, "repro": " ".join(repro_args) or "(all stages)"},
    )


def ray_job_submit_command(spec: JobSpec, address: str) -> str:
    """The same job as a ``ray job submit`` command line, for people who prefer the Ray CLI."""
    import json

    return shlex.join(["ray", "job", "submit", "--address", address, "--submission-id", spec.submission_id,
                       "--runtime-env-json", json.dumps(spec.runtime_env), "--metadata-json",
                       json.dumps(spec.metadata), "--", *shlex.split(spec.entrypoint)])


def client(address: str, token: str | None = None):
    """A Jobs API client; sends the token explicitly, whatever ``RAY_AUTH_MODE`` says here.

    Ray checks the address as it connects and says what is wrong in as many ways as can go
    wrong (``ValueError`` for no URL, ``RuntimeError`` for a server whose ``/api/version`` is
    missing, a JSON or HTTP error for one that answers something else): all of them mean "no
    Ray Jobs API there", raised as one ``ConnectionError`` whose message is one line.
    """
    from ray.job_submission import JobSubmissionClient

    token = token or find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except (ValueError, RuntimeError, KeyError, OSError) as err:
        raise ConnectionError(" ".join(f"{type(err).__name__}: {err}".split())) from err


def find_token() -> str | None:
    """Ray's token, from where the Ray CLI looks: the variable, the file it names, the default file."""
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token.strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            return Path(path).read_text().strip()
    return None


def submit(spec: JobSpec, address: str, token: str | None = None):
    """Submit the job; return the client, to follow it."""
    jobs = client(address, token)
    jobs.submit_job(entrypoint=spec.entrypoint, submission_id=spec.submission_id,
                    runtime_env=spec.runtime_env, metadata=spec.metadata)
    return jobs


def follow(jobs, submission_id: str, timeout_s: float | None = None, poll_s: float = 2.0) -> str:
    """Print the job's log as it grows until it ends (or the timeout passes); return its status."""
    start, printed = time.monotonic(), 0
    while True:
        status = str(jobs.get_job_status(submission_id).value)
        logs = jobs.get_job_logs(submission_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if status in TERMINAL or (timeout_s is not None and time.monotonic() - start > timeout_s):
            return status
        time.sleep(poll_s)


def _inside(project: Path, path: str) -> Path:
    """A path relative to the project (files outside it are not uploaded with the job)."""
    full = (project / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    if not full.is_file():
        raise FileNotFoundError(f"params override file not found: {path}")
    try:
        return full.relative_to(project)
    except ValueError:
        raise ValueError(f"{path} is outside the project {project}: it would not reach the cluster") from None


def _shared_path(project: Path, path: str) -> str:
    """URIs stay; a relative path is made absolute against the project (right for one machine only)."""
    return path if "://" in path or Path(path).is_absolute() else str((project / path).resolve())


def _git_commit(project: Path) -> str:
    from pipeline.runtime.tracking import (
        git_commit,  # imports MLflow: only when a job is built
    )

    return git_commit(project)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runtime.submit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS")
                        or (os.environ.get("RAY_ADDRESS", "") if os.environ.get("RAY_ADDRESS", "").startswith("http")
                            else DEFAULT_ADDRESS), help=f"Ray dashboard (Jobs API) URL (default {DEFAULT_ADDRESS})")
    parser.add_argument("--project", default=".", help="the project folder uploaded as working_dir")
    parser.add_argument("--workspace", help="shared folder where the stages run and write their outputs "
                        "(default: <storage path>/workspaces/<submission id>)")
    parser.add_argument("--params-override", help="params file merged into params.yaml, e.g. deploy/params.paper.yaml")
    parser.add_argument("--storage-path", help="Ray Train storage shared by all nodes (default: ray.storage_path)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI for every stage (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--submission-id")
    parser.add_argument("--dry-run", action="store_true", help="print the equivalent `ray job submit` and exit")
    parser.add_argument("--no-wait", action="store_true", help="submit and return without following the job")
    parser.add_argument("--timeout", type=float, help="stop following after this many seconds")
    parser.add_argument("repro_args", nargs=argparse.REMAINDER, help="after --: arguments of `dvc repro`")
    args = parser.parse_args(argv)
    repro_args = args.repro_args[1:] if args.repro_args[:1] == ["--"] else args.repro_args
    try:
        spec = build_job(args.project, repro_args, workspace=args.workspace, params_override=args.params_override,
                         storage_path=args.storage_path, mlflow_uri=args.mlflow_uri,
                         submission_id=args.submission_id)
    except INPUT_ERRORS as err:
        fail(parser.prog, err)
    if args.dry_run:
        print(ray_job_submit_command(spec, args.address))
        return
    try:
        jobs = submit(spec, args.address)
    except ConnectionError as err:
        fail(parser.prog, f"no Ray Jobs API at {args.address} ({err}): is the cluster up, and is that its "
                          "dashboard address (--address or RAY_API_SERVER_ADDRESS)?")
    print(f"submitted {spec.submission_id} to {args.address}; workspace {spec.metadata['workspace']}\n"
          f"  follow: ray job logs -f {spec.submission_id} --address {args.address}", flush=True)
    if args.no_wait:
        return
    status = follow(jobs, spec.submission_id, args.timeout)
    print(f"\njob {spec.submission_id}: {status}")
    raise SystemExit(0 if status == "SUCCEEDED" else 1)


if __name__ == "__main__":
    main()
