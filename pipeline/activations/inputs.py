"""What extraction encodes, as Ray Datasets of input rows -- without torch.

Each set the analysis needs (images of the sample's shards, captions, vocabulary words,
zero-shot prompts, object crops, labelled folders) is an :class:`InputSet`; all pending sets of
one run become a single Ray Dataset whose rows share one schema (``INPUT_COLUMNS`` plus the
``TAGS`` that tell the encoding actor what to do). The row-shaping functions here run as Ray Data
*tasks*, so this module imports neither torch nor open_clip: a task worker that unpickles one of
them imports only this module, not the ~7 s of CPU that the model stack costs on every fresh
worker (measured: the extract stage's actors started 17-20 s into a run while light tasks
imported torch on the same 2 cores).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pipeline.data.records import IMAGE_DECODE_ERRORS
from pipeline.data.shards import index_rows, present_splits, split_paths
from pipeline.fingerprint import inputs_fingerprint

if TYPE_CHECKING:
    from pipeline.config import ExtractParams

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
FINAL = "final"

# Every input row carries these columns (empty where a set has none), so sets of different
# kinds can share one Ray Data run; ``kind`` and ``checkpoint`` tell the actor what to do.
INPUT_COLUMNS = ("key", "group", "split", "meta", "task", "label", "jpg", "text")
TAGS = ("set", "kind", "checkpoint")
PASSTHROUGH = ("key", "group", "split", "meta", "task", "label", "text", "set")  # text: captions tag photos


@dataclass(frozen=True)
class InputSet:
    """A set to extract, how to encode it (``kind``) and with which weights (``checkpoint``).

    Its inputs come from exactly one of: ``rows`` (dicts of the input columns, e.g. words:
    every rows-set of a run shares one ``from_items`` dataset), ``shard_keys`` (images of the
    sample's shards: every such set shares one read of the shards, each image fanned out to the
    sets that want it) or ``build`` (any other Ray Dataset, which names the files or folders it
    reads in ``sources``). Sharing keeps a run at a handful of datasets however many sets and
    snapshots it extracts: Ray's cost is per task, not per row.
    """

    kind: str = "image"  # image | text | tokens (one output row per spatial token)
    checkpoint: str = FINAL  # a key of the actor's ``weights``
    rows: list[dict[str, Any]] | None = None
    shard_keys: tuple[tuple[str, ...], frozenset[str]] | None = None  # (shard paths, image keys)
    build: Callable[[], Any] | None = None
    sources: tuple[str, ...] = ()  # what ``build`` reads: its content is part of the fingerprint

    def __post_init__(self):
        if sum(x is not None for x in (self.rows, self.shard_keys, self.build)) != 1:
            raise ValueError("an InputSet takes exactly one of rows, shard_keys, build")
        if self.build is not None and not self.sources:
            raise ValueError("an InputSet built from files names them in `sources`, or a change to them "
                             "would go unseen by its completion fingerprint")

    def fingerprint(self) -> str:
        """Everything this set's output is made of: the bytes of its shards and sources, its keys
        or rows (the words themselves, the captions), its kind and checkpoint. The set is encoded
        again when any of it changes, and only then."""
        paths, keys = self.shard_keys or ((), frozenset())
        return inputs_fingerprint([*paths, *self.sources], self.kind, self.checkpoint, self.rows, keys)


def text_set(texts: list[dict[str, Any]], checkpoint: str = FINAL) -> InputSet:
    return InputSet("text", checkpoint, rows=texts)


def image_set(data_dir: str | Path, splits: list[str], keys: set[str], kind: str = "image",
              checkpoint: str = FINAL) -> InputSet:
    """Images of the sample's split shards whose key is in ``keys``."""
    paths = tuple(p for s in present_splits(data_dir, splits) for p in split_paths(data_dir, s))
    return InputSet(kind, checkpoint, shard_keys=(paths, frozenset(keys)))


def crop_set(tar_path: Path) -> InputSet:
    """The object crops of the evaluation sets (one webdataset tar, each with its label)."""
    def build():
        import ray.data

        return ray.data.read_webdataset(str(tar_path), decoder=None).map_batches(_crop_columns)

    return InputSet(build=build, sources=(str(tar_path),))


def folder_set(name: str, folder: str | Path) -> InputSet:
    """An ImageNet-layout folder of labelled images."""
    def build():
        import ray.data

        return ray.data.from_items(folder_rows(name, folder)).map_batches(_read_path)

    return InputSet(build=build, sources=(str(folder),))


def image_rows(data_dir: str | Path, splits: list[str]) -> list[dict[str, Any]]:
    """One row per unique image (first record of each group) of the splits, from the indexes of
    the verified shards."""
    rows, seen = [], set()
    for split, shard, row in index_rows(data_dir, splits):
        if row["group"] not in seen:
            seen.add(row["group"])
            rows.append({"key": row["key"], "group": row["group"], "split": split, "shard": str(shard.resolve())})
    return rows


def _webdataset_columns(batch: dict[str, Any]) -> dict[str, Any]:
    url = [str(u) for u in batch["__url__"]]
    metas = [bytes(m).decode() for m in batch["json"]]
    return {
        "key": np.asarray(batch["__key__"], dtype=object),
        "group": np.asarray([str(json.loads(m).get("group", k)) for m, k in zip(metas, batch["__key__"])], dtype=object),
        "split": np.asarray([Path(u).parent.name for u in url], dtype=object),
        "meta": np.asarray(metas, dtype=object),
        "jpg": np.asarray(list(batch["jpg"]), dtype=object),
    }


def folder_rows(name: str, folder: str | Path) -> list[dict[str, Any]]:
    """An ImageNet-layout folder (one subfolder per class) as rows of (key, label, path)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"extract.labelled_folders.{name}: no such folder: {folder}")
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = class_dir.name.replace("_", " ")
        for image in sorted(class_dir.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                rows.append({"key": f"{class_dir.name}/{image.name}", "label": label, "path": str(image.resolve())})
    if not rows:
        raise ValueError(f"extract.labelled_folders.{name}: no images in class subfolders of {folder}")
    return rows


def _read_path(batch: dict[str, Any]) -> dict[str, Any]:
    """The folder rows with their image bytes; a file that does not decode (a text file named
    ``.jpg``, a truncated download) is skipped with a warning naming it, as the sample stage skips
    a corrupt image, rather than failing the encoding actor with a traceback that names no file.
    The set's row count in the extraction manifest says how many images were encoded."""
    images = [_image_bytes(str(p)) for p in batch["path"]]
    keep = [i for i, image in enumerate(images) if image is not None]
    return {**{k: np.asarray(v, dtype=object)[keep] for k, v in batch.items() if k != "path"},
            "jpg": np.asarray([images[i] for i in keep], dtype=object)}


def _image_bytes(path: str) -> bytes | None:
    """The file's bytes if they decode as an image (a cheap draft-size decode, which still reads
    every byte of a JPEG, so truncation shows); None, with a warning naming the file, if not."""
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except IMAGE_DECODE_ERRORS as err:  # what the sample stage counts as a corrupt image
        log.warning("labelled folder: skipped %s: unreadable image (%s: %s)", path, type(err).__name__, err)
        return None
    return data


def prompt_rows(tasks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"key": f"{task}|{c:04d}|{t:02d}", "task": task, "label": name, "text": template.format(name)}
        for task, spec in tasks.items()
        for c, name in enumerate(spec["classes"])
        for t, template in enumerate(spec["templates"])
    ]


def input_dataset(sets: dict[str, InputSet], params: ExtractParams, task_cpus: float):
    """One Ray Dataset of every input row of ``sets``, tagged with its set, kind and checkpoint."""
    import ray.data

    light = {"num_cpus": task_cpus}  # row shuffling, not encoding: never hold a whole CPU
    parts = []
    rows = [{**row, "set": name, "kind": spec.kind, "checkpoint": spec.checkpoint}
            for name, spec in sets.items() if spec.rows is not None for row in spec.rows]
    if rows:
        blocks = max(params.actors, -(-len(rows) // (params.batch_size * 16)))
        parts.append(ray.data.from_items(rows, override_num_blocks=blocks).map_batches(_filled, **light))
    wanted: dict[str, list[tuple[str, str, str]]] = {}
    for name, spec in sets.items():
        for key in spec.shard_keys[1] if spec.shard_keys else ():
            wanted.setdefault(key, []).append((name, spec.kind, spec.checkpoint))
    if wanted:
        paths = sorted({p for spec in sets.values() if spec.shard_keys for p in spec.shard_keys[0]})
        shards = ray.data.read_webdataset(paths, decoder=None, include_paths=False).map_batches(
            _webdataset_columns, batch_format="numpy", **light)
        parts.append(shards.map_batches(_fan_out, fn_kwargs={"wanted": wanted}, **light))
    for name, spec in sets.items():
        if spec.build is not None:
            parts.append(spec.build().map_batches(_filled, fn_kwargs={"tags": (name, spec.kind, spec.checkpoint)},
                                                  **light))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _filled(batch: dict[str, Any], tags: tuple[str, str, str] | None = None) -> dict[str, Any]:
    """Every input and tag column present (missing ones empty); ``tags`` sets set/kind/checkpoint."""
    n = len(batch["key"])
    out = {c: np.asarray(batch[c], dtype=object) if c in batch else np.full(n, b"" if c == "jpg" else "", dtype=object)
           for c in INPUT_COLUMNS + TAGS}
    if tags:
        out.update({c: np.full(n, value, dtype=object) for c, value in zip(TAGS, tags)})
    return out


def _fan_out(batch: dict[str, Any], wanted: dict[str, list[tuple[str, str, str]]]) -> dict[str, Any]:
    """Each shard image once per set that wants it; images no set wants are dropped."""
    picks = [(i, tags) for i, key in enumerate(batch["key"]) for tags in wanted.get(str(key), ())]
    rows = np.asarray([i for i, _ in picks], dtype=np.int64)
    out = _filled({k: np.asarray(v, dtype=object)[rows] for k, v in batch.items()})
    for j, column in enumerate(TAGS):
        out[column] = np.asarray([tags[j] for _, tags in picks], dtype=object)
    return out


def _crop_columns(batch: dict[str, Any]) -> dict[str, Any]:
    metas = [json.loads(bytes(m)) for m in batch["json"]]
    return {"key": np.asarray(batch["__key__"], dtype=object),
            "label": np.asarray([m["label"] for m in metas], dtype=object),
            "jpg": np.asarray(list(batch["jpg"]), dtype=object)}
