"""Every reader of the sample checks the manifest's hashes of what it reads, and a finished set is
reused only while everything it was made of is unchanged (issue 27, items 4 and 5)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.activations.extract import run_extraction
from pipeline.activations.inputs import image_rows
from pipeline.activations.reference import run_reference
from pipeline.config import ExtractParams, RayParams, ReferenceParams
from pipeline.data.sampling import run_sample
from pipeline.io import OWNER_MARKER

from .tiny import sampled_tiny_params

SHARD = "test/shard-00000.tar"
MISMATCH = r"{}: its sha256 differs from the manifest's \(expected [0-9a-f]{{16}}\.\.\., found [0-9a-f]{{16}}\.\.\."
EXTRACT = {"actors": 1, "batch_size": 16, "token_sample": 0, "evolution_vocab": 0, "splits": ["test"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_local):
    """A sampled tiny dataset, a tiny sparse model and a two-word vocabulary, made once."""
    from pipeline.clip.model import build_model, save_model

    root = tmp_path_factory.mktemp("integrity")
    params = sampled_tiny_params(root)
    save_model(build_model(params.train.model), root / "model")
    (root / "vocab").mkdir()
    (root / "vocab" / "words.txt").write_text("red\ncircle\n")
    return root, params


@pytest.fixture
def damaged(tiny, tmp_path):
    """A copy of the sample whose first test shard lost its last record, cut at a member boundary:
    a well-formed tar, just shorter (what a copy interrupted between files leaves)."""
    root, params = tiny
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    drop_last_record(data / SHARD)
    return data, params.model_copy(update={"sample": params.sample.model_copy(update={"out_dir": str(data)})})


@pytest.fixture
def fresh(tiny, tmp_path):
    """A private copy of the sample, model and vocabulary, so the tests may change them."""
    root, params = tiny
    for name in ("data", "model", "vocab"):
        shutil.copytree(root / name, tmp_path / name)
    return tmp_path, params.model_copy(update={
        "sample": params.sample.model_copy(update={"out_dir": str(tmp_path / "data")}),
        "train": params.train.model_copy(update={"out_dir": str(tmp_path / "models")})})


def drop_last_record(tar_path: Path) -> None:
    """Rewrite a shard without its last record's members: still a valid tar, one record short."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    last = members[-1][0].name.rpartition(".")[0]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in members:
            if member.name.rpartition(".")[0] != last:
                tar.addfile(member, io.BytesIO(payload))


def home(params) -> Path:
    """The folder that holds ``model/`` and ``vocab/``: the one the params' models go under."""
    return Path(params.train.out_dir).parent


def read_reference(data: Path, params, out: Path):
    return run_reference(ReferenceParams(image_size=64, batch_size=32, out_dir=str(out)), ExtractParams(**EXTRACT),
                         data, 0.25, "test")


def read_extract(data: Path, params, out: Path):
    return run_extraction(home(params) / "model", data, home(params) / "vocab", out, ExtractParams(**EXTRACT), 0.25,
                          "test")


def read_sae(data: Path, params, out: Path):
    from pipeline.sae.baseline import training_inputs

    sae = params.sae.model_copy(update={"train_splits": ["test"], "multimodal": False, "residual_layer": None,
                                        "cls_layer": None})
    return training_inputs(params.model_copy(update={"sae": sae}), home(params) / "model", out)


def read_vlm(data: Path, params, out: Path):
    from pipeline.data.loading import ClipBatchPreprocessor
    from pipeline.vlm.train import qa_examples

    return qa_examples(str(data), "test", params.vlm, ClipBatchPreprocessor(32, 8))


def read_atlas_images(data: Path, params, out: Path):
    from pipeline.atlas.build import ImageStore

    return ImageStore(data, ["test"], {"any"})


def read_captions(data: Path, params, out: Path):
    from pipeline.data.shards import caption_rows

    return caption_rows(data, ["test"])


def read_cached_split(data: Path, params, out: Path):
    from pipeline.data.loading import ClipBatchPreprocessor, load_split_arrays

    return load_split_arrays(data, "test", ClipBatchPreprocessor(32, 8))


READERS = [read_reference, read_extract, read_sae, read_vlm, read_atlas_images, read_captions, read_cached_split]


@pytest.mark.parametrize("reader", READERS, ids=lambda f: f.__name__.removeprefix("read_"))
def test_every_reader_refuses_a_truncated_shard_naming_it(damaged, tmp_path, reader):
    """Before: the reference stage embedded what the short shard still held and exited 0."""
    data, params = damaged
    with pytest.raises(ValueError, match=MISMATCH.format(SHARD)):
        reader(data, params, tmp_path / "out")


def test_the_reference_stage_ends_on_a_truncated_shard_with_one_line_and_status_2(damaged, workdir, capsys):
    import yaml

    from stages.reference import main

    data, params = damaged
    params = params.model_copy(update={"reference": params.reference.model_copy(
        update={"out_dir": str(workdir / "reference"), "image_size": 64}),
        "extract": params.extract.model_copy(update={"splits": ["test"]})})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    with pytest.raises(SystemExit) as exit_:
        main(["--params", "params.yaml"])
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("python -m stages.reference: error:")]
    assert exit_.value.code == 2 and "Traceback" not in err
    assert str(data / SHARD) in line and "sha256 differs" in line
    assert not (workdir / "reference" / "images").exists()


def test_an_edited_zero_shot_task_file_is_refused_by_name(fresh):
    """The eval sets are hashed in the manifest too (training and extraction read this one)."""
    from pipeline.data.evalsets import load_zero_shot_tasks

    root, _ = fresh
    zeroshot = root / "data" / "eval" / "zeroshot.json"
    tasks = json.loads(zeroshot.read_text())
    tasks["tasks"]["shape"]["classes"].pop()
    zeroshot.write_text(json.dumps(tasks))
    with pytest.raises(ValueError, match=MISMATCH.format("eval/zeroshot.json")):
        load_zero_shot_tasks(root / "data")


def test_an_edited_shard_index_is_refused_by_name(fresh):
    """The captions and keys that extraction reads from a shard's parquet index are hashed too."""
    import pyarrow as pa

    from pipeline.data.shards import caption_rows

    root, _ = fresh
    index = root / "data" / SHARD.replace(".tar", ".parquet")
    table = pq.read_table(index)
    captions = ["a caption the shard does not hold"] + table.column("caption").to_pylist()[1:]
    pq.write_table(table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions)), index)
    with pytest.raises(ValueError, match=MISMATCH.format(SHARD.replace(".tar", ".parquet"))):
        caption_rows(root / "data", ["test"])


def test_a_truncated_crop_shard_is_refused_by_name(fresh):
    from pipeline.activations.extract import extraction_plan

    root, _ = fresh
    drop_last_record(root / "data" / "eval" / "crops" / "test.tar")
    with pytest.raises(ValueError, match=MISMATCH.format("eval/crops/test.tar")):
        extraction_plan(root / "model", root / "data", root / "vocab", ExtractParams(**EXTRACT))


# --------------------------------------------------------------------------- item 5: stale sets


def set_keys(folder: Path) -> list[str]:
    return sorted(pq.read_table(folder, columns=["key"]).column("key").to_pylist())


def test_a_changed_vocabulary_is_encoded_again_and_only_it(fresh):
    """Before: the rerun said 'already complete, skipping' and kept the old words."""
    root, params = fresh
    acts = root / "acts"
    read_extract(root / "data", params, acts)
    assert set_keys(acts / "vocab") == ["circle", "red"]
    images = {p.name: p.stat().st_mtime_ns for p in (acts / "images").iterdir()}
    (root / "vocab" / "words.txt").write_text("blue\nsquare\ndog\n")
    manifest = read_extract(root / "data", params, acts)
    assert set_keys(acts / "vocab") == ["blue", "dog", "square"] and manifest["vocabulary"] == 3
    assert images == {p.name: p.stat().st_mtime_ns for p in (acts / "images").iterdir()}  # images kept
    assert (acts / "vocab" / OWNER_MARKER).is_file()


def test_a_new_sample_is_encoded_again_by_extract_and_reference(fresh):
    """Before: a new sample in the same folder (its manifest and shards new) left both stages'
    sets as they were, keyed by the old sample's images."""
    root, params = fresh
    acts, reference = root / "acts", root / "reference"
    read_extract(root / "data", params, acts)
    read_reference(root / "data", params, reference)
    before = set_keys(acts / "images")
    run_sample(params.sample.model_copy(update={"seed": 1}), RayParams(num_cpus=2))
    wanted = sorted(r["key"] for r in image_rows(root / "data", ["test"]))
    assert wanted != before
    read_extract(root / "data", params, acts)
    read_reference(root / "data", params, reference)
    assert set_keys(acts / "images") == wanted and set_keys(reference / "images") == wanted


def test_a_set_folder_the_pipeline_did_not_write_is_never_replaced(fresh):
    """A set's folder is replaced only when it carries the pipeline's marker: a folder of the
    user's under the set's name fails the run before any encoding, its files untouched."""
    root, params = fresh
    (root / "acts" / "vocab").mkdir(parents=True)
    (root / "acts" / "vocab" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"acts/vocab\b.*did not write"):
        read_extract(root / "data", params, root / "acts")
    assert (root / "acts" / "vocab" / "notes.txt").read_text() == "mine"
    assert not (root / "acts" / "images").exists()


def test_a_set_name_is_one_plain_folder_name(tmp_path):
    from pipeline.activations.inputs import text_set
    from pipeline.activations.pool import write_sets

    with pytest.raises(ValueError, match=r"set name '\.\./x': must be one plain folder name"):
        write_sets("t", {"../x": text_set([{"key": "a", "text": "a"}])}, tmp_path, "f", {}, ExtractParams(), 0.25,
                   actor=object)
