"""Nothing a params file says can destroy data: output folders stay inside the project, a stage
deletes only folders it wrote, a bare ``dvc repro`` validates params before anything runs, one
training of a variant at a time, and sizes, resources and writability are checked before work."""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import OUTPUT_ROOTS_ENV, ParamsError, load_params
from pipeline.io import (
    OWNER_MARKER,
    BusyError,
    UnsafeOutputError,
    check_output_dir,
    claim_output_dir,
    exclusive_lock,
    remove_output_dir,
    staged_output_dir,
)

from .conftest import REPO
from .test_dvc import set_params

OUT_DIR_KEYS = ["sample.out_dir", "train.out_dir", "vocab.out_dir", "reference.out_dir", "extract.out_dir",
                "metrics.out_dir", "sae.out_dir", "atlas.out_dir", "vlm.out_dir", "steer.out_dir", "report.out_dir",
                "ablation.out_dir"]


@pytest.fixture
def in_project(tmp_path, monkeypatch):
    """A project folder as the working directory, with no extra output roots."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv(OUTPUT_ROOTS_ENV, raising=False)
    return project


# --------------------------------------------------------------------------- item 1: where outputs may go


@pytest.mark.parametrize("key", OUT_DIR_KEYS)
@pytest.mark.parametrize("value", [".", "..", "./", "data/../..", "/", "/tmp"])
def test_an_output_folder_outside_the_project_or_at_its_root_is_refused(in_project, key, value):
    with pytest.raises(ParamsError, match=rf"{key} = '{value}': resolves to .*not a folder inside the project"):
        load_params(REPO / "params.yaml", overrides={key: value})


def test_an_output_folder_through_a_link_out_of_the_project_is_refused(in_project, tmp_path):
    (in_project / "linked").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ParamsError, match="sample.out_dir = 'linked/sample': resolves to"):
        load_params(REPO / "params.yaml", overrides={"sample.out_dir": "linked/sample"})
    assert load_params(REPO / "params.yaml", overrides={"sample.out_dir": "other/sample"}).sample.out_dir


@pytest.mark.parametrize("key", ["ray.storage_path", "vlm.lm_cache"])
def test_shared_folders_may_lie_outside_but_never_above_the_project(in_project, key, tmp_path):
    for value in (".", "..", "/", str(in_project.parent)):
        with pytest.raises(ParamsError, match=rf"{key} = .*the project or a folder above it"):
            load_params(REPO / "params.yaml", overrides={key: value})
    for value in (str(tmp_path / "nfs" / "ray"), "s3://bucket/ray", "ray_results"):
        assert load_params(REPO / "params.yaml", overrides={key: value})


def test_a_stage_deletes_only_folders_it_can_prove_it_wrote(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "code.py").write_text("precious")
    with pytest.raises(UnsafeOutputError, match=f"holds files this pipeline did not write.*{OWNER_MARKER}"):
        remove_output_dir(foreign)
    assert (foreign / "code.py").read_text() == "precious"

    link = tmp_path / "link"
    link.symlink_to(claim_output_dir(tmp_path / "owned-elsewhere", "test"), target_is_directory=True)
    with pytest.raises(UnsafeOutputError, match="is a link or a file"):
        remove_output_dir(link)
    assert (tmp_path / "owned-elsewhere" / OWNER_MARKER).is_file()

    owned = claim_output_dir(tmp_path / "owned", "test")
    (owned / "model.pt").write_text("weights")
    remove_output_dir(owned)
    empty = tmp_path / "empty"
    empty.mkdir()
    remove_output_dir(empty)
    remove_output_dir(tmp_path / "never-existed")
    assert not owned.exists() and not empty.exists()


def test_an_output_that_cannot_be_written_fails_before_any_work(tmp_path):
    (tmp_path / "models").write_text("a file where the folder should be")
    with pytest.raises(UnsafeOutputError, match="is a link or a file"):
        check_output_dir(tmp_path / "models")
    with pytest.raises(UnsafeOutputError, match="cannot be created: .*models is a file"):
        check_output_dir(tmp_path / "models" / "sparse")
    if os.geteuid() != 0:  # root writes through any mode bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(UnsafeOutputError, match="not writable"):
            check_output_dir(locked / "sparse")


def test_a_failed_write_leaves_the_previous_output_and_no_partial_one(tmp_path):
    """What a full disk does mid-export: the staging folder goes, the old output stays whole."""
    out = claim_output_dir(tmp_path / "models" / "sparse", "train")
    (out / "model.pt").write_text("the previous model")
    with pytest.raises(OSError, match="No space left"):
        with staged_output_dir(out, "train") as staging:
            (staging / "model.pt").write_text("half of a new mod")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert (out / "model.pt").read_text() == "the previous model"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sparse"]

    with staged_output_dir(out, "train") as staging:
        (staging / "model.pt").write_text("the new model")
    assert (out / "model.pt").read_text() == "the new model" and (out / OWNER_MARKER).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["sparse"]


def tree_state(root: Path, allowed: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (size, mtime), except under the ``allowed`` prefixes."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and not str(p.relative_to(root)).startswith(allowed)}


def stage_env(repo: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo)}
    for key in ("MLFLOW_TRACKING_URI", OUTPUT_ROOTS_ENV, "SPARSECLIP_STAGE_SERVER"):
        env.pop(key, None)
    return env


# The tracking store and DVC's and git's own bookkeeping may change; nothing else may.
BOOKKEEPING = (".git/", ".dvc/tmp", ".dvc/cache", "mlflow.db", "mlartifacts", "data/params_checked.json")


@pytest.mark.parametrize("out_dir", [".", "..", "pipeline"])
def test_the_sample_stage_into_the_project_or_its_code_changes_nothing(repo_copy, out_dir):
    """``sample.out_dir: .`` once replaced the whole project (code, .git, an untracked file)."""
    (repo_copy / "untracked.txt").write_text("mine")
    set_params(repo_copy, **{"sample.out_dir": out_dir, "sample.source.generator.num_records": 60})
    outside = tree_state(repo_copy.parent, ("repo/.git/", "repo/mlflow.db", "repo/mlartifacts"))
    done = subprocess.run([sys.executable, "-m", "stages", "sample"], cwd=repo_copy, env=stage_env(repo_copy),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "sample.out_dir" in done.stderr if out_dir != "pipeline" else "holds files this pipeline did not write" in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr
    assert tree_state(repo_copy.parent, ("repo/.git/", "repo/mlflow.db", "repo/mlartifacts")) == outside


# --------------------------------------------------------------------------- item 2: dvc repro


def test_a_bare_dvc_repro_runs_nothing_for_a_shell_active_or_path_like_variant(repo_copy):
    """DVC deletes ``models/${key}`` and runs ``python -m stages train ${key}`` through a shell before
    Python reads a param; the check_params stage, which every stage depends on, stops it first."""
    set_params(repo_copy, **{"sample.source.generator.num_records": 60, "sample.shard_size": 30})
    sampled = subprocess.run(["dvc", "repro", "sample"], cwd=repo_copy, env=stage_env(repo_copy),
                             capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stdout[-2000:] + sampled.stderr[-2000:]
    canary = repo_copy / "models" / "a" / "b" / "canary.txt"  # up to date: DVC goes straight to train@...
    canary.parent.mkdir(parents=True)
    canary.write_text("keep me")
    variants = yaml.safe_load((repo_copy / "params.yaml").read_text())["train"]["variants"]
    set_params(repo_copy, **{"train.variants": {**variants, "x;touch PWNED1": {}, "a/b": {}}})
    before = tree_state(repo_copy, BOOKKEEPING)
    done = subprocess.run(["dvc", "repro"], cwd=repo_copy, env=stage_env(repo_copy), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "variant name 'x;touch PWNED1'" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not list(repo_copy.rglob("PWNED1")) and canary.read_text() == "keep me"
    assert tree_state(repo_copy, BOOKKEEPING) == before


def test_every_stage_depends_on_the_params_check():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "params.yaml" in stages["check_params"]["params"][0]
    for name, stage in stages.items():
        if name != "check_params":
            deps = (stage.get("do") or stage)["deps"]
            assert "data/params_checked.json" in deps, name


def test_make_pipeline_refuses_bad_params_in_one_line(repo_copy):
    set_params(repo_copy, **{"train.epochs": -1})
    done = subprocess.run([sys.executable, "-m", "pipeline.runtime.shared_cluster", "true"], cwd=repo_copy,
                          env=stage_env(repo_copy), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "train.epochs = -1" in done.stderr


# --------------------------------------------------------------------------- item 8: weak spots


@pytest.mark.parametrize("amount", [math.nan, -1.0, math.inf])
def test_resource_amounts_must_be_finite_and_not_negative(amount):
    with pytest.raises(ParamsError, match=rf"train.resources_per_worker: .*finite numbers >= 0; got CPU: {amount}"):
        load_params(REPO / "params.yaml", overrides={"train.resources_per_worker": {"CPU": amount}})


def test_a_lock_is_held_by_one_process_at_a_time(tmp_path):
    lock = tmp_path / ".sparse.lock"
    with exclusive_lock(lock, "a training of variant 'sparse'"):
        with pytest.raises(BusyError, match=rf"'sparse' is already running \(pid {os.getpid()} holds"):
            with exclusive_lock(lock, "a training of variant 'sparse'"):
                pass
    with exclusive_lock(lock, "again"):  # released
        pass


@pytest.mark.integration
def test_a_second_training_of_a_variant_stops_at_once_naming_the_first(workdir):
    """Two ``python -m stages train sparse`` at once shared a Ray run folder and one died in Ray."""
    from pipeline.clip.train import training_lock

    params_file = workdir / "params.yaml"
    params_file.write_text((REPO / "params.yaml").read_text())
    params = load_params(params_file)
    with training_lock(params, "sparse"):
        done = subprocess.run([sys.executable, "-m", "stages", "train", "sparse"], cwd=workdir,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"a training of variant 'sparse' is already running (pid {os.getpid()}" in done.stderr


def test_an_expansion_too_large_for_memory_fails_before_ray_starts(workdir):
    from pipeline.clip.train import run_training

    params = load_params(REPO / "params.yaml", overrides={"train.model.expansion": 10_000_000})
    with pytest.raises(ValueError, match=r"expansion 10000000: the two wide heads hold 83,200,000,000 parameters"):
        run_training(params, "sparse")
    assert not (workdir / "ray_results").exists()


def test_an_unwritable_model_folder_fails_before_training(workdir):
    from pipeline.clip.train import run_training

    (workdir / "models").write_text("not a folder")
    with pytest.raises(UnsafeOutputError, match="models is a file"):
        run_training(load_params(REPO / "params.yaml"), "sparse")


def test_an_empty_vocabulary_fails_in_the_vocab_stage(tmp_path):
    from pipeline.config import VocabParams
    from pipeline.vocab import build_vocabulary

    (tmp_path / "words.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"vocabulary is empty: vocab.path .*words.txt gave no word"):
        build_vocabulary(VocabParams(source="file", path=str(tmp_path / "words.txt")))
