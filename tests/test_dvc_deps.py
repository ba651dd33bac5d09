"""Every DVC stage depends on all the code it runs.

A stage whose command imports a module that is not among its ``deps`` is not rerun when that
module changes, and ``dvc repro`` then reports stale numbers as current. This walks the imports of
each stage's entry point (every ``import`` statement, function-level ones included, within
``pipeline/`` and ``stages/``) and checks that each file reached is covered by a dep of that
stage (the file itself or a folder above it).

The one exception is a short, explicit list of runtime modules that decide how a stage process
starts, never what it computes: they are no stage's dep, so editing one leaves ``dvc status``
clean. A module that can change a number (the Ray cluster's worker threads, Ray Train's driver,
the process group's all-reduce, MLflow reads of the report) is not on it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

PIPELINES = ("dvc.yaml", "ablation/dvc.yaml")
PACKAGES = ("pipeline", "stages")
# Runtime modules that change no output of any stage, and why; no dvc.yaml lists them.
RESULT_NEUTRAL = {
    "pipeline/runtime/__init__.py": "a docstring",
    "pipeline/runtime/stage_server.py": "where a stage's imports come from: a forked child runs the same code "
                                        "on disk as a fresh process, or the stage runs cold",
    "pipeline/runtime/stage_client.py": "hands a stage to the warm-stage server, or runs it in this process: "
                                        "the same stage module either way",
    "pipeline/runtime/shared_cluster.py": "starts the local Ray head the stages join; the stages' resources "
                                          "come from params.yaml",
    "pipeline/runtime/cli.py": "argument parsing and the one-line error message of a failed stage",
    "pipeline/runtime/job.py": "copies the code into a workspace and runs dvc repro there (no stage imports it)",
    "pipeline/runtime/submit.py": "packs a Ray job (no stage imports it)",
}


def module_file(name: str) -> Path | None:
    """The repo file of a dotted module name under PACKAGES (a module or a package's __init__)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(path: Path) -> set[Path]:
    """Repo files that ``path`` imports directly, with the packages each import passes through."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1] if path.name != "__init__.py"
                       else path.relative_to(REPO).parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import submodule`
    found = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            if file := module_file(".".join(parts[:i])):
                found.add(file)
    return found


def import_closure(entry: Path) -> set[Path]:
    seen, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += imported_files(path) - seen
    return seen


def stages() -> list[tuple[str, str, list[str]]]:
    """(pipeline file, stage name, code deps) of every stage whose command runs a module of ours."""
    found = []
    for pipeline in PIPELINES:
        for name, stage in yaml.safe_load((REPO / pipeline).read_text())["stages"].items():
            body = stage.get("do", stage)
            root = ((REPO / pipeline).parent / body.get("wdir", ".")).resolve()  # deps are relative to wdir
            command = re.search(r"python -m (stages \w+|[\w.]+)", body["cmd"])
            deps = [str((root / d).resolve().relative_to(REPO)) for d in body.get("deps", []) if "${" not in d]
            module = command.group(1).replace("stages ", "stages.") if command else ""  # python -m stages NAME
            found.append((pipeline, name, module, deps))
    return found


@pytest.mark.parametrize("pipeline,name,module,deps", stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_deps_cover_every_module_its_command_imports(pipeline, name, module, deps):
    entry = module_file(module)
    assert entry is not None, f"{pipeline}: stage {name} runs {module!r}, which is not a module of this repo"
    dispatcher = import_closure(REPO / "stages" / "__main__.py") if module.startswith("stages.") else set()
    missing = sorted(
        str(f.relative_to(REPO)) for f in import_closure(entry) | dispatcher
        if f.relative_to(REPO).as_posix() not in RESULT_NEUTRAL and not any(f.relative_to(REPO).as_posix() == d or f.relative_to(REPO).as_posix().startswith(d.rstrip("/") + "/")
                   for d in deps)
    )
    assert not missing, f"{pipeline}: stage {name!r} imports files its deps do not cover: {missing}"


def test_the_walk_follows_function_level_and_relative_imports():
    closure = {str(p.relative_to(REPO)) for p in import_closure(REPO / "stages" / "sae.py")}
    assert "pipeline/sae/model.py" in closure  # `from .model import ...` inside pipeline/sae/__init__.py
    assert "pipeline/runtime/cluster.py" in closure  # imported inside run_sae_baseline, not at the top


@pytest.mark.parametrize("pipeline,name,module,deps", stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_stage_depends_on_a_result_neutral_runtime_module(pipeline, name, module, deps):
    """So a runtime-only edit (the warm-stage server, say) reruns nothing."""
    named = sorted(set(deps) & set(RESULT_NEUTRAL))
    assert not named, f"{pipeline}: stage {name!r} lists result-neutral runtime modules as deps: {named}"


def test_the_library_never_imports_the_stages():
    """pipeline/ is the library, stages/ the application on top of it: the arrow points one way."""
    offenders = sorted(
        str(path.relative_to(REPO)) for path in (REPO / "pipeline").rglob("*.py")
        if any(f.is_relative_to(REPO / "stages") for f in imported_files(path))
    )
    assert not offenders, f"library modules importing the stages: {offenders}"


def test_every_result_neutral_module_exists():
    assert all((REPO / path).is_file() for path in RESULT_NEUTRAL), "a listed module was moved or removed"


@pytest.mark.parametrize("lock", ["dvc.lock", "ablation/dvc.lock"])
def test_locked_code_folders_hash_their_sources_alone(lock):
    """A code folder's hash in a lock counts exactly its ``.py`` sources: bytecode caches are
    ignored (.dvcignore), so a fresh clone's ``dvc status`` agrees with a checkout where Python
    has already run, instead of calling every stage's code modified."""
    stages = yaml.safe_load((REPO / lock).read_text())["stages"]
    for name, stage in stages.items():
        for dep in stage.get("deps", []):
            folder = REPO / dep["path"]
            if dep["path"].startswith(PACKAGES) and folder.is_dir():
                sources = [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                assert dep["nfiles"] == len(sources), f"{lock}: {name} hashes {dep['path']} with {dep['nfiles']} files"
