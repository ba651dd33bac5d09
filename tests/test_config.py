"""params.yaml -> one typed object; every mistake is reported with its key, value and expectation."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import ParamsError, load_params

from .conftest import REPO


def write(tmp_path, tree) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_unknown_key_is_named_with_the_allowed_keys(tmp_path):
    path = write(tmp_path, {"sample": {"shard_sise": 10}})
    with pytest.raises(ParamsError) as err:
        load_params(path)
    text = str(err.value)
    assert "sample.shard_sise = 10: unknown key" in text
    assert "shard_size" in text and "out_dir" in text


def test_wrong_value_names_key_value_and_expectation(tmp_path):
    path = write(tmp_path, {"sample": {"n": -5, "source": {"kind": "ftp"}}})
    with pytest.raises(ParamsError) as err:
        load_params(path)
    text = str(err.value)
    assert "sample.n = -5: Input should be greater than or equal to 1" in text
    assert "sample.source.kind = 'ftp'" in text and "'generated'" in text


def test_types_are_strict_so_a_typo_cannot_be_coerced(tmp_path):
    """'yes' is not a boolean and 20.0 epochs is not a whole number: lax parsing would read the
    first as True and silently truncate the second."""
    path = write(tmp_path, {"train": {"use_gpu": "yes", "epochs": 20.5, "keep_ray_checkpoints": 1}})
    with pytest.raises(ParamsError) as err:
        load_params(path)
    text = str(err.value)
    assert "train.use_gpu = 'yes': Input should be a valid boolean" in text
    assert "train.epochs = 20.5: Input should be a valid integer" in text
    assert "train.keep_ray_checkpoints = 1: Input should be a valid boolean" in text
    assert load_params(write(tmp_path, {"train": {"optim": {"lr": 1}}})).train.optim.lr == 1.0  # int for float is fine


def test_cross_field_rules(tmp_path):
    with pytest.raises(ParamsError, match="split fractions must sum to 1, got 1.2"):
        load_params(write(tmp_path, {"sample": {"splits": {"train": 1.0, "val": 0.1, "test": 0.1}}}))
    with pytest.raises(ParamsError, match="needs source.path"):
        load_params(write(tmp_path, {"sample": {"source": {"kind": "csv"}}}))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_overrides_and_immutability(tmp_path):
    params = load_params(write(tmp_path, {}), overrides={"sample.source.generator.num_records": 7})
    assert params.sample.source.generator.num_records == 7
    with pytest.raises(Exception):
        params.sample.n = 3  # frozen: stages cannot mutate shared configuration


def test_section_hash_changes_only_with_its_section(tmp_path):
    a = load_params(write(tmp_path, {}))
    b = load_params(write(tmp_path, {"project": {"seed": 9}}))
    assert a.section_hash("sample") == b.section_hash("sample")
    assert a.section_hash("project") != b.section_hash("project")


@pytest.mark.parametrize("name", ["..", ".", "a/b", "sparse/cap40", "../escape", " sparse", "x" * 65, "-dash", ""])
def test_variant_names_that_are_not_plain_folder_names_are_refused(name):
    """A variant name becomes models/<name>, activations/<name> and a DVC stage; '..' used to write
    into the project root and make the next run rmtree it."""
    with pytest.raises(ParamsError, match="variant name"):
        load_params(REPO / "params.yaml", overrides={"train.variants": {name: {}}, "sae.source_variant": name,
                                                      "atlas.variants": [], "vlm.variants": [name],
                                                      "steer.variant": name})


def test_plain_variant_names_pass():
    params = load_params(REPO / "params.yaml", overrides={"train.variants": {"sparse-cap40_v2": {}},
                                                          "sae.source_variant": "sparse-cap40_v2",
                                                          "atlas.variants": [], "vlm.variants": ["sparse-cap40_v2"],
                                                          "steer.variant": "sparse-cap40_v2"})
    assert list(params.train.variants) == ["sparse-cap40_v2"]


def test_a_split_the_pipeline_reads_cannot_get_fraction_zero():
    """It used to pass `sample` and fail `train` minutes later with an empty split."""
    with pytest.raises(ParamsError, match=r"fraction 0 to test \(read by extract.splits\)"):
        load_params(REPO / "params.yaml", overrides={"sample.splits": {"train": 0.9, "val": 0.1, "test": 0.0}})
    with pytest.raises(ParamsError, match=r"val \(read by train \(validation\)\)"):
        load_params(REPO / "params.yaml", overrides={"sample.splits": {"train": 0.9, "val": 0.0, "test": 0.1},
                                                      "extract.splits": ["test"]})
    params = load_params(REPO / "params.yaml", overrides={"sample.splits": {"train": 0.9, "val": 0.1, "test": 0.0},
                                                          "extract.splits": ["val"]})
    assert params.sample.splits.test == 0.0  # nothing reads test then: allowed
