"""The sample stage's pieces: seeded planning, validation of bad records, shards, eval sets."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pytest
from PIL import Image

from pipeline.config import SampleParams, SourceParams
from pipeline.data.evalsets import load_zero_shot_tasks
from pipeline.data.generator import render_record
from pipeline.data.records import RawRecord, Record, Skip, SkipReason, validate
from pipeline.data.sampling import build_shard, plan_shards, run_sample, split_of
from pipeline.data.shards import read_shard, read_split
from pipeline.data.sources import CsvSource


def jpeg(size=(32, 32), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def dirty_shards(tmp_path):
    """A webdataset source with one good sample and one of each kind of bad input."""
    path = tmp_path / "source-000.tar"
    samples = {
        "good": {"jpg": jpeg(), "txt": b"a red square", "json": b'{"url": "x"}'},
        "corrupt": {"jpg": jpeg()[:40] + b"garbage", "txt": b"a cat", "json": b"{}"},
        "empty": {"jpg": jpeg(), "txt": b"   \n", "json": b"{}"},
        "nosidecar": {"jpg": jpeg(), "txt": b"a dog"},
        "badjson": {"jpg": jpeg(), "txt": b"a dog", "json": b"{not json"},
        "tiny": {"jpg": jpeg((8, 8)), "txt": b"a dot", "json": b"{}"},
        "wide": {"jpg": jpeg((200, 20)), "txt": b"a line", "json": b"{}"},
        "noimage": {"txt": b"a ghost", "json": b"{}"},
        "good2": {"jpg": jpeg(colour=(0, 0, 255)), "txt": b"a blue square", "json": b"{}"},
    }
    with tarfile.open(path, "w") as tar:
        for key, parts in samples.items():
            for ext, payload in parts.items():
                add(tar, f"{key}.{ext}", payload)
    return path


def test_split_assignment_is_seeded_stable_and_proportional():
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    splits = [split_of(str(i), 0, fractions) for i in range(5000)]
    assert splits == [split_of(str(i), 0, fractions) for i in range(5000)]
    counts = Counter(splits)
    assert abs(counts["train"] / 5000 - 0.8) < 0.03 and abs(counts["test"] / 5000 - 0.1) < 0.02
    assert splits != [split_of(str(i), 1, fractions) for i in range(5000)]


def test_plan_is_deterministic_respects_n_and_keeps_groups_together():
    refs = [f"r{i}" for i in range(1000)]
    groups = [f"img{i // 5}" for i in range(1000)]  # five captions per image, like Flickr
    params = SampleParams(n=600, seed=3, shard_size=100)
    plan = plan_shards(refs, groups, params)
    assert plan == plan_shards(refs, groups, params)
    chosen = [r for shard in plan for r in shard.refs]
    assert len(chosen) == len(set(chosen)) == 600
    assert all(len(shard.refs) <= 100 for shard in plan)
    split_of_group = {}
    for shard in plan:
        for ref in shard.refs:
            group = groups[int(ref[1:])]
            assert split_of_group.setdefault(group, shard.split) == shard.split
    assert plan != plan_shards(refs, groups, SampleParams(n=600, seed=4, shard_size=100))


@pytest.mark.parametrize(
    "raw, reason",
    [
        (RawRecord("a", "a", None, "cap"), SkipReason.IMAGE_MISSING),
        (RawRecord("a", "a", b"\xff\xd8 not a jpeg", "cap"), SkipReason.IMAGE_CORRUPT),
        (RawRecord("a", "a", jpeg((8, 8)), "cap"), SkipReason.IMAGE_TOO_SMALL),
        (RawRecord("a", "a", jpeg((100, 20)), "cap"), SkipReason.IMAGE_BAD_ASPECT),
        (RawRecord("a", "a", jpeg(), None), SkipReason.CAPTION_MISSING),
        (RawRecord("a", "a", jpeg(), " \t"), SkipReason.CAPTION_EMPTY),
        (RawRecord("a", "a", jpeg(), "cap", None), SkipReason.SIDECAR_MISSING),
        (RawRecord("a", "a", jpeg(), "cap", None, "invalid JSON"), SkipReason.SIDECAR_CORRUPT),
    ],
)
def test_validation_names_the_reason(raw, reason):
    result = validate(raw, min_side=16, max_aspect=4.0, require_sidecar=True)
    assert isinstance(result, Skip) and result.reason == reason


def test_validation_keeps_jpeg_bytes_and_converts_other_formats():
    original = jpeg()
    kept = validate(RawRecord("k", "g", original, " a  red\nsquare "), min_side=16, max_aspect=4, require_sidecar=False)
    assert isinstance(kept, Record) and kept.jpeg == original and kept.caption == "a red square"
    png = io.BytesIO()
    Image.new("RGBA", (20, 20)).save(png, format="PNG")
    converted = validate(RawRecord("k", "g", png.getvalue(), "x"), min_side=16, max_aspect=4, require_sidecar=False)
    assert Image.open(io.BytesIO(converted.jpeg)).format == "JPEG"


def test_preprocessor_fast_path_gives_torchvision_bits():
    """Images already at the input size skip torchvision; the pixels must be the same bits."""
    import numpy as np

    from pipeline.data.loading import ClipBatchPreprocessor

    pre = ClipBatchPreprocessor(32, 16)
    images = [render_record(i, seed=5, image_size=32).jpeg for i in range(8)] + [jpeg((40, 24)), jpeg((32, 32))]
    batch = pre({"jpg": images, "txt": ["a red square"] * len(images)})
    for got, data in zip(batch["image"], images, strict=True):
        with Image.open(io.BytesIO(data)) as image:
            expected = pre.transform(image.convert("RGB")).numpy()
        np.testing.assert_array_equal(got, expected)
    assert batch["image"].shape == (len(images), 3, 32, 32) and batch["image"].dtype == np.float32
    # float16 (what Ray Data moves) is the float32 result rounded; an empty batch keeps the shape
    half = ClipBatchPreprocessor(32, 16, np.float16)({"jpg": images, "txt": ["a red square"] * len(images)})
    np.testing.assert_array_equal(half["image"], batch["image"].astype(np.float16))
    assert pre({"jpg": [], "txt": []})["image"].shape == (0, 3, 32, 32)


def test_shards_are_deterministic_bytes(tmp_path):
    params = SampleParams(out_dir=str(tmp_path / "out"))
    plan = {"split": "train", "index": 0, "refs": [str(i) for i in range(20)]}
    build_shard(plan, params.model_dump(mode="json"), str(tmp_path / "a"))
    build_shard(plan, params.model_dump(mode="json"), str(tmp_path / "b"))
    a, b = (tmp_path / d / "train" / "shard-00000.tar" for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    records = list(read_shard(a))
    expected = render_record(3, 0)
    assert records[3].jpeg == expected.jpeg and records[3].meta["truth"] == expected.truth


def test_csv_source_reports_missing_columns_and_files(tmp_path):
    (tmp_path / "img.jpg").write_bytes(jpeg())
    (tmp_path / "pairs.csv").write_text("image,caption\nimg.jpg,a red square\nmissing.jpg,a dog\nimg.jpg,\n")
    source = CsvSource(SourceParams(kind="csv", path=str(tmp_path / "pairs.csv")))
    raws = list(source.load(source.refs()))
    results = [validate(r, min_side=16, max_aspect=4, require_sidecar=False) for r in raws]
    assert isinstance(results[0], Record)
    assert results[1].reason == SkipReason.IMAGE_MISSING and "pairs.csv:row 3" in results[1].origin
    assert results[2].reason == SkipReason.CAPTION_EMPTY
    (tmp_path / "other.csv").write_text("path,text\nimg.jpg,x\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['caption', 'image'\]"):
        CsvSource(SourceParams(kind="csv", path=str(tmp_path / "other.csv")))


def test_webdataset_source_scans_each_tar_once_per_process(dirty_shards, tmp_path):
    from pipeline.data import sources

    source = sources.WebDatasetSource(SourceParams(kind="webdataset", path=str(dirty_shards)))
    sources._tar_index.cache_clear()
    refs = source.refs()
    assert [r.split("::")[1] for r in refs] == ["good", "corrupt", "empty", "nosidecar", "badjson", "tiny",
                                                "wide", "noimage", "good2"]
    # shard-sized subsets, out of order: each reads its members from the one scan refs() made
    first, second = list(source.load(refs[5:][::-1])), list(source.load(refs[:5]))
    assert sources._tar_index.cache_info().misses == 1
    assert [r.key for r in first] == ["good2", "noimage", "wide", "tiny"]
    assert first[0].image == jpeg(colour=(0, 0, 255)) and first[0].caption == "a blue square"
    assert first[1].image is None and first[1].sidecar == {}
    assert second[3].sidecar is None and second[4].sidecar_error.startswith("invalid JSON")
    # a rewritten tar (other size) is scanned again, never served from the stale index
    with tarfile.open(dirty_shards, "w") as tar:
        for ext, payload in {"jpg": jpeg(), "txt": b"a new caption", "json": b"{}"}.items():
            add(tar, f"fresh.{ext}", payload)
    assert [r.caption for r in source.load([f"{dirty_shards}::fresh"])] == ["a new caption"]
    assert sources._tar_index.cache_info().misses == 2


def test_webdataset_refs_carry_offsets_so_loading_scans_no_tar(tmp_path):
    """Twelve tars (more than the per-process index keeps) and a shard drawing from all of them
    in shuffled order: loading reads every member at its offset with no scan, the bytes equal
    tarfile's; a gzipped tar gets plain refs (its offsets are into the decompressed stream) and is
    read through tarfile; a tar rewritten after listing is scanned afresh, not read at old offsets."""
    import gzip
    import random

    from pipeline.data import sources

    for t in range(12):
        with tarfile.open(tmp_path / f"src-{t:02d}.tar", "w") as tar:
            for i in range(3):
                for ext, payload in {"jpg": jpeg(colour=(20 * t, i, 0)), "txt": f"caption {t} {i}".encode(),
                                     "json": b"{}"}.items():
                    add(tar, f"s{t:02d}_{i}.{ext}", payload)
    source = sources.WebDatasetSource(SourceParams(kind="webdataset", path=str(tmp_path / "src-*.tar")))
    refs = source.refs()
    assert len(refs) == 36 and all("@jpg=" in r for r in refs)
    assert [source.group(r) for r in refs[:2]] == ["s00_0", "s00_1"]
    shard = random.Random(0).sample(refs, len(refs))
    sources._tar_index.cache_clear()
    records = list(source.load(shard))
    assert sources._tar_index.cache_info().misses == 0  # no tar was scanned
    for ref, record in zip(shard, records):
        t, i = int(record.key[1:3]), int(record.key[4])
        assert record.key == source.group(ref) and record.caption == f"caption {t} {i}"
        assert record.image == jpeg(colour=(20 * t, i, 0)) and record.sidecar == {}

    gz = tmp_path / "packed.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "src-00.tar").read_bytes()))
    packed = sources.WebDatasetSource(SourceParams(kind="webdataset", path=str(gz)))
    packed_refs = packed.refs()
    assert all("@" not in r for r in packed_refs)
    assert [r.caption for r in packed.load(packed_refs)] == [f"caption 0 {i}" for i in range(3)]

    stale = [r for r in refs if "src-05.tar" in r]
    with tarfile.open(tmp_path / "src-05.tar", "w") as tar:  # rewritten: new sizes, new offsets
        add(tar, "pad.txt", b"x" * 5000)
        for i in range(3):
            add(tar, f"s05_{i}.txt", f"rewritten {i}".encode())
    assert [r.caption for r in source.load(stale)] == [f"rewritten {i}" for i in range(3)]
    assert [r.image for r in source.load(stale)] == [None] * 3


def test_run_sample_skips_and_counts_bad_records(ray_local, dirty_shards, tmp_path):
    params = SampleParams(
        source=SourceParams(kind="webdataset", path=str(dirty_shards)),
        splits={"train": 1.0, "val": 0.0, "test": 0.0},
        out_dir=str(tmp_path / "out"),
    )
    manifest = run_sample(params, ray_local_params())
    assert manifest["written"] == 2 and manifest["skipped"] == 7
    assert manifest["skipped_by_reason"] == {
        "image_bad_aspect": 1, "image_corrupt": 1, "image_missing": 1, "image_too_small": 1,
        "caption_empty": 1, "sidecar_corrupt": 1, "sidecar_missing": 1,
    }
    listed = {s["key"]: s["reason"] for s in manifest["skipped_records"]}
    assert listed["corrupt"] == "image_corrupt" and listed["nosidecar"] == "sidecar_missing"
    assert all(str(dirty_shards) in s["origin"] for s in manifest["skipped_records"])
    written = list(read_split(tmp_path / "out", "train"))
    assert [r.caption for r in written] == ["a red square", "a blue square"]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["skipped_by_reason"] == manifest["skipped_by_reason"]


def test_generated_sample_and_eval_sets(ray_local, tmp_path):
    params = SampleParams(n=150, shard_size=40, out_dir=str(tmp_path / "out"),
                          source=SourceParams(generator={"num_records": 300}))
    manifest = run_sample(params, ray_local_params())
    assert manifest["written"] == 150 and manifest["source_records"] == 300
    assert sum(manifest["records_by_split"].values()) == 150
    summary = manifest["eval_sets"]
    tasks = load_zero_shot_tasks(tmp_path / "out")
    assert set(tasks) == {"shape", "colour", "size", "position", "background", "count", "word"}
    assert "circle" in tasks["shape"]["classes"] and tasks["count"]["classes"] == ["one", "two", "three"]
    test_records = list(read_split(tmp_path / "out", "test"))
    assert summary["retrieval"]["test"] == len(test_records)
    n_objects = sum(len(r.meta["truth"]["objects"]) for r in test_records)
    assert summary["crops"]["test"] == n_objects
    crops = list(read_shard(tmp_path / "out" / "eval" / "crops" / "test.tar"))
    assert all(c.meta["label"] == c.meta["object"]["shape"] for c in crops)


def test_a_rerun_into_an_existing_sample_replaces_it_whole(ray_local, tmp_path):
    """Sampling 200 then 60 records into one folder used to leave the first run's extra shards for
    the readers (161 in the manifest, 2,383 read); now the second sample is all there is."""
    out = tmp_path / "out"
    for n in (200, 60):
        params = SampleParams(n=n, shard_size=20, out_dir=str(out), source=SourceParams(generator={"num_records": 300}))
        manifest = run_sample(params, ray_local_params())
    read = sum(len(list(read_split(out, split))) for split in ("train", "val", "test"))
    assert manifest["written"] == 60 and read == 60
    listed = {shard["path"] for shard in manifest["shards"]}
    assert {str(p.relative_to(out)) for p in out.glob("*/shard-*.tar")} == listed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or previous folder left


def ray_local_params():
    from pipeline.config import RayParams

    return RayParams(num_cpus=2)


@pytest.mark.flickr
def test_a_sample_with_an_empty_split_fails_and_keeps_the_previous_one(ray_local, tmp_path):
    """Every image missing (or a split too small to get a record) is an error at the sample stage,
    naming the split, not two minutes later in training; the sample already there stays."""
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(f"gone{i}.jpg,a dog\n" for i in range(20)))
    from pipeline.io import claim_output_dir

    out = claim_output_dir(tmp_path / "out", "sample")  # a previous sample, as the stage marks it
    (out / "keep.txt").write_text("the previous sample")
    params = SampleParams(source=SourceParams(kind="csv", path=str(tmp_path / "pairs.csv")), out_dir=str(out))
    with pytest.raises(ValueError, match=r"no record landed in the train, val, test split\(s\) \(0 written of 20.*image_missing"):
        run_sample(params, ray_local_params())
    assert (out / "keep.txt").read_text() == "the previous sample"


def test_readers_take_the_manifests_shards_and_check_their_hashes(ray_local, tmp_path):
    """A stale shard beside the sample, a truncated one: each an error naming the file."""
    import shutil

    from pipeline.data.shards import split_shards, verify_shards

    out = tmp_path / "sample"
    run_sample(SampleParams(source=SourceParams(generator={"num_records": 120}), shard_size=40, out_dir=str(out)),
               ray_local_params())
    listed = split_shards(out, "train")
    assert verify_shards(out) == len(json.loads((out / "manifest.json").read_text())["shards"])
    stale = out / "train" / "shard-00099.tar"
    shutil.copy(listed[0], stale)
    with pytest.raises(ValueError, match="shard-00099.tar: a shard the manifest does not list"):
        split_shards(out, "train")
    stale.unlink()
    listed[0].write_bytes(listed[0].read_bytes()[:3000])
    with pytest.raises(ValueError, match=f"{listed[0].name}: its sha256 differs"):
        verify_shards(out)
    with pytest.raises(ValueError, match=f"{listed[0].name}: unreadable shard"):
        list(read_shard(listed[0]))


def test_flickr_csv_by_params_override(ray_local, flickr_dir, tmp_path):
    """Real photos through the same stage: only the source params change."""
    params = SampleParams(
        source=SourceParams(kind="csv", path=str(flickr_dir / "captions.csv"), image_root=str(flickr_dir / "images")),
        n=300, shard_size=100, out_dir=str(tmp_path / "flickr"),
    )
    manifest = run_sample(params, ray_local_params())
    assert manifest["written"] + manifest["skipped"] == 300 and manifest["written"] > 290
    by_split = {s: list(read_split(tmp_path / "flickr", s)) for s in ("train", "val", "test")}
    groups = {s: {r.meta["group"] for r in recs} for s, recs in by_split.items()}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"])
    assert manifest["eval_sets"]["zeroshot_tasks"] == []
