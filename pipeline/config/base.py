"""The base of every params section and the rules shared by all: strict, frozen sections, and
output folders that must lie inside the project."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
)

# Stages run from the project root (DVC runs every command there), so relative paths in
# params.yaml, and the params file itself, resolve against the working directory.
DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """A params file that cannot be used; the message lists every problem found."""


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --------------------------------------------------------------------------- output paths


# Folders besides the project where output folders may also lie (os.pathsep-separated): a
# cluster's scratch space, or the test suite's temporary folders. Set by the environment, never
# by a params file.
OUTPUT_ROOTS_ENV = "SPARSECLIP_OUTPUT_ROOTS"


def _inside_project(value: str) -> str:
    """An output folder resolves strictly inside the project (the working directory every stage
    runs in) or one of ``$SPARSECLIP_OUTPUT_ROOTS``: never the project itself, a parent of it, or a
    link out of it. Stages replace their output folders whole, so ``out_dir: .`` or ``..`` would
    otherwise delete the project."""
    project = Path.cwd().resolve()
    resolved = (project / value).resolve()
    extra = [Path(p).resolve() for p in os.environ.get(OUTPUT_ROOTS_ENV, "").split(os.pathsep) if p]
    if resolved == project or resolved in project.parents or not any(root in resolved.parents
                                                                     for root in [project, *extra]):
        raise ValueError(f"resolves to {resolved}, which is not a folder inside the project ({project}); "
                         "an output folder must be a subfolder of the project, e.g. 'data/sample'")
    return value


def _not_above_project(value: str) -> str:
    """A folder shared beyond the project (Ray storage, a model cache) may live anywhere (an NFS
    mount, ``s3://``), but never at the filesystem root, the project itself or one of its parents,
    whose run folders a stage deletes when it is done with them."""
    if "://" in value:
        return value
    root, resolved = Path.cwd().resolve(), (Path.cwd() / value).resolve()
    if resolved == root or resolved in root.parents or resolved == Path(resolved.anchor):
        raise ValueError(f"resolves to {resolved}, the project or a folder above it; use a folder of "
                         "its own, e.g. 'ray_results'")
    return value


OutputDir = Annotated[str, AfterValidator(_inside_project)]
SharedDir = Annotated[str, AfterValidator(_not_above_project)]


# --------------------------------------------------------------------------- project-wide


class ProjectParams(Section):
    """The pipeline's MLflow experiment and the global seed."""

    experiment: str = Field("sparseclip", min_length=1, description="MLflow experiment: one per pipeline")
    seed: int = Field(0, ge=0)


class RayParams(Section):
    """Which Ray cluster the stages join, or the size of the local one they start."""

    address: str | None = Field(
        None, description="Ray cluster to join; None: $RAY_ADDRESS if set, else a local cluster"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (None: all)")
    task_cpus: float = Field(
        0.5, gt=0, description="CPUs per Ray Data task/actor; fractional so 2-core machines never deadlock"
    )
    storage_path: SharedDir = Field(
        "ray_results", description="Ray Train storage that all nodes share: local path, NFS mount or s3://"
    )
    wait_for_resources: bool = Field(
        False, description="false: a training whose workers the cluster cannot hold fails at once, naming what "
        "is missing; true: wait (an autoscaling cluster adds nodes)")


