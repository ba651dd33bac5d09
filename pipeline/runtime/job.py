"""The driver of a pipeline job on a Ray cluster: ``dvc repro`` in a workspace every node sees.

``python -m pipeline.runtime.submit`` uploads the project's code, params and DVC files -- never its
outputs -- as the job's ``working_dir``; Ray unpacks it on every node, so every worker imports
the same code. Stage outputs are another matter: a train worker on one node reads the
``data/sample`` shards that Ray Data tasks on other nodes wrote, so outputs must live on storage
all nodes mount. This driver therefore copies the code into a *workspace* on shared storage (an
NFS path) and runs ``dvc repro`` there. Reusing a workspace makes the next job incremental,
exactly as ``dvc repro`` is on a laptop.

The cluster's values reach the stages the same way as on a laptop, through ``params.yaml``: an
override file (``deploy/params.paper.yaml``) is merged into the workspace's copy, and
``$SPARSECLIP_STORAGE_PATH`` sets ``ray.storage_path``; DVC then records them in ``dvc.lock``.

    python -m pipeline.runtime.job --workspace /mnt/shared/sparseclip [--params-override FILE] [-- ARGS]

``ARGS`` go to ``dvc repro`` (stage names, ``-s``, ``-f``); none reproduces the whole pipeline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.io import flatten
from pipeline.runtime.cli import run_stage

# Top-level paths that are never code: environments, caches, the DVC cache and every stage's
# outputs. Not uploaded with a job, and not copied into a workspace (which keeps its own).
NOT_CODE = (
    ".git", ".venv", ".whl", ".gl", ".dvc/cache", ".dvc/tmp", ".pytest_cache", ".ruff_cache", ".cache",
    "data", "models", "activations", "metrics", "plots", "reports", "vlm",
    "ray_results", "mlruns", "mlartifacts", "mlflow.db", "dvc_plots",
)
# Caches the checkout's own setup builds, that a workspace on the same machine links instead of
# building again: the packaged language model, converted from GGUF once by scripts/setup.sh (~30 s).
SHARED_CACHES = (".cache/lm",)
STORAGE_ENV = "SPARSECLIP_STORAGE_PATH"
# Mappings whose entries an override file removes with ``name: null`` (every other null is a value).
DROPPABLE = ("train.variants",)


def ray_excludes() -> list[str]:
    """``NOT_CODE`` as the gitignore-style, root-anchored patterns of a runtime_env's ``excludes``."""
    return [f"/{name}" for name in NOT_CODE] + ["__pycache__/", "*.egg-info/"]


def read_override(path: str | Path | None) -> dict[str, Any]:
    """The dotted overrides of a params override file (none without a file).

    Mappings merge key by key and everything else replaces, so an override file only names
    what changes (``train.resources_per_worker: {GPU: 1}`` keeps the base's ``CPU``).
    """
    if not path:
        return {}
    from pipeline.config import ParamsError, yaml_problem

    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(tree, Mapping):
        raise ParamsError(f"{path}: a params override file is a mapping of sections")
    return flatten(tree)


def apply_overrides(params_file: Path, overrides: Mapping[str, Any]) -> None:
    """Write ``overrides`` into a params file, then validate it as every stage will read it."""
    from pipeline.config import load_params

    tree = yaml.safe_load(params_file.read_text()) or {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        if value is None and ".".join(parents) in DROPPABLE:
            node.pop(leaf, None)  # DVC's foreach must not see the dropped entry either
        else:
            node[leaf] = value
    params_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    load_params(params_file)


def materialise(source: Path, workspace: Path) -> None:
    """Copy the job's code into the workspace; outputs (and dvc.lock) already there stay; the
    source's :data:`SHARED_CACHES` are linked where the workspace has none of its own."""
    workspace.mkdir(parents=True, exist_ok=True)
    keep_lock = (workspace / "dvc.lock").is_file()

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).resolve().relative_to(source)
        return {n for n in names if (rel / n).as_posix() in NOT_CODE or n == "__pycache__"
                or (keep_lock and rel == Path(".") and n == "dvc.lock")}

    shutil.copytree(source, workspace, ignore=ignore, dirs_exist_ok=True)
    for name in SHARED_CACHES:  # an uploaded job's code has none: its workspace builds its own
        built, link = source / name, workspace / name
        if built.is_dir() and not (link.exists() or link.is_symlink()):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(built.resolve(), target_is_directory=True)


def run_job(workspace: Path, repro_args: list[str], params_override: str | None = None,
            dvc_push: bool = False) -> int:
    """Materialise the workspace, set its params, run ``dvc repro``; return its exit status."""
    source, workspace = Path.cwd().resolve(), workspace.resolve()
    overrides = read_override(params_override)
    if os.environ.get(STORAGE_ENV):
        overrides["ray.storage_path"] = os.environ[STORAGE_ENV]
    if workspace != source:
        materialise(source, workspace)
    apply_overrides(workspace / "params.yaml", overrides)
    if not (workspace / ".git").exists():  # an uploaded copy: DVC works without Git this way
        _dvc(workspace, "config", "--local", "core.no_scm", "true")
    print(f"[job] workspace {workspace}: dvc repro {' '.join(repro_args)}", flush=True)
    status = _run(workspace, repro_command(repro_args))
    if status == 0 and dvc_push:
        status = _dvc(workspace, "push")
    return status


def repro_command(repro_args: list[str]) -> list[str]:
    """``dvc repro`` wrapped as ``make pipeline`` wraps it (:mod:`pipeline.runtime.shared_cluster`):
    on one machine every stage joins one local Ray cluster and runs warm, instead of each starting
    its own Ray and importing torch again (~13 s a stage, 19 stages in the Flickr8k preset); where
    a cluster is named (``RAY_ADDRESS`` of a submitted job, ``ray.address``) it runs unchanged."""
    return [sys.executable, "-m", "pipeline.runtime.shared_cluster", sys.executable, "-m", "dvc", "repro", *repro_args]


def _dvc(workspace: Path, *args: str) -> int:
    return _run(workspace, [sys.executable, "-m", "dvc", *args])


def _run(workspace: Path, command: list[str]) -> int:
    return subprocess.run(command, cwd=workspace, env=workspace_env(workspace), check=False).returncode


def workspace_env(workspace: Path) -> dict[str, str]:
    """This environment with the workspace first on ``PYTHONPATH``: a stage imports the workspace's
    code from its folder, and so must the Ray workers it starts, whose folder is not the workspace
    (with this project installed editable, they would otherwise import the checkout it came from,
    which may have changed since the workspace was copied)."""
    paths = [str(workspace), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runtime.job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, help="shared folder (NFS) where the stages run")
    parser.add_argument("--params-override", help="params file merged into params.yaml (path in the project)")
    parser.add_argument("--dvc-push", action="store_true", help="`dvc push` the outputs after a successful repro")
    parser.add_argument("repro_args", nargs=argparse.REMAINDER, help="after --: arguments of `dvc repro`")
    run_stage(_job, parser, argv)


def _job(args: argparse.Namespace) -> None:
    """Run the job; bad params or a bad override file end in one line and exit 2 (``run_stage``)."""
    repro_args = args.repro_args[1:] if args.repro_args[:1] == ["--"] else args.repro_args
    raise SystemExit(run_job(Path(args.workspace), repro_args, args.params_override, args.dvc_push))


if __name__ == "__main__":
    main()
