"""Where image-caption pairs come from: the embedded generator, an open_clip CSV, webdataset tars
(img2dataset's output), or parquet files with image bytes.

A source lists cheap, stable references (``refs``) on the driver, so sampling is a seeded
choice over strings; :meth:`Source.load` then reads the chosen records on Ray workers, grouped
so each tar or parquet file is opened once. Loading never raises for bad data: a missing file,
caption or sidecar becomes ``None`` in the :class:`RawRecord` for validation to count.
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import os
import tarfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pyarrow.parquet as pq

from pipeline.config import SourceParams
from pipeline.data.generator import render_record
from pipeline.data.records import RawRecord

_REF_SEP = "::"


class Source(Protocol):
    def refs(self) -> list[str]:
        """All records the source holds, as stable strings."""

    def group(self, ref: str) -> str:
        """Records of the same group (one image, several captions) share a split."""

    def load(self, refs: Sequence[str]) -> Iterator[RawRecord]:
        """The records behind ``refs``, in order."""


class GeneratedSource:
    """The embedded concept dataset: record ``i`` is rendered from (seed, i) alone."""

    def __init__(self, params: SourceParams):
        self.params = params.generator

    def refs(self) -> list[str]:
        return [str(i) for i in range(self.params.num_records)]

    def group(self, ref: str) -> str:
        return ref

    def load(self, refs: Sequence[str]) -> Iterator[RawRecord]:
        p = self.params
        for ref in refs:
            rec = render_record(int(ref), p.seed, p.image_size, p.max_objects, p.word_probability)
            yield RawRecord(rec.key, rec.key, rec.jpeg, rec.caption, {"truth": rec.truth}, origin=f"generated:{ref}")


class CsvSource:
    """An open_clip-style CSV: one row per pair, an image path column and a caption column."""

    def __init__(self, params: SourceParams):
        self.path = Path(params.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"sample.source.path: CSV file not found: {self.path}")
        self.root = Path(params.image_root) if params.image_root else self.path.parent
        with open(self.path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=params.csv_separator)
            missing = {params.image_key, params.caption_key} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(
                    f"{self.path}: missing column(s) {sorted(missing)}; header is {reader.fieldnames} "
                    "(set sample.source.image_key / caption_key / csv_separator)"
                )
            self.rows = [(row[params.image_key], row[params.caption_key]) for row in reader]

    def refs(self) -> list[str]:
        return [str(i) for i in range(len(self.rows))]

    def group(self, ref: str) -> str:
        return self.rows[int(ref)][0]

    def load(self, refs: Sequence[str]) -> Iterator[RawRecord]:
        for ref in refs:
            image_path, caption = self.rows[int(ref)]
            full = self.root / image_path
            image = full.read_bytes() if full.is_file() else None
            key = f"{Path(image_path).stem}_{int(ref):07d}"
            sidecar = {"source_image": image_path}
            yield RawRecord(key, image_path, image, caption, sidecar, origin=f"{self.path}:row {int(ref) + 2}")


class WebDatasetSource:
    """Tar shards in the webdataset layout: ``key.jpg``, ``key.txt``, ``key.json`` per sample."""

    def __init__(self, params: SourceParams):
        self.files = _expand(params.path)
        self.image_ext = params.image_key if params.image_key != "image" else "jpg"
        self.caption_ext = params.caption_key if params.caption_key != "caption" else "txt"

    def refs(self) -> list[str]:
        refs = []
        for file in self.files:
            refs.extend(f"{file}{_REF_SEP}{key}" for key in tar_index(file))
        return refs

    def group(self, ref: str) -> str:
        return ref.split(_REF_SEP, 1)[1]

    def load(self, refs: Sequence[str]) -> Iterator[RawRecord]:
        wanted = _by_file(refs)
        loaded: dict[str, RawRecord] = {}
        for file, keys in wanted.items():
            index = tar_index(file)
            with tarfile.open(file) as tar:
                for key in keys:
                    parts = {ext: _read_member(tar, where) for ext, where in index.get(key, {}).items()}
                    loaded[f"{file}{_REF_SEP}{key}"] = self._record(file, key, parts)
        yield from (loaded[ref] for ref in refs)

    def _record(self, file: str, key: str, parts: dict[str, bytes]) -> RawRecord:
        caption = parts.get(self.caption_ext)
        sidecar, error = None, None
        if "json" in parts:
            try:
                sidecar = json.loads(parts["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                error = f"invalid JSON: {err}"
        text = caption.decode("utf-8", errors="replace") if caption is not None else None
        return RawRecord(key, key, parts.get(self.image_ext), text, sidecar, error, origin=f"{file}:{key}")


class ParquetSource:
    """Parquet files with image bytes and captions in columns (img2dataset's parquet output)."""

    def __init__(self, params: SourceParams):
        self.files = _expand(params.path)
        self.image_col, self.caption_col = params.image_key, params.caption_key

    def refs(self) -> list[str]:
        return [f"{f}{_REF_SEP}{i}" for f in self.files for i in range(pq.ParquetFile(f).metadata.num_rows)]

    def group(self, ref: str) -> str:
        return ref

    def load(self, refs: Sequence[str]) -> Iterator[RawRecord]:
        loaded: dict[str, RawRecord] = {}
        for file, rows in _by_file(refs).items():
            table = pq.read_table(file, columns=[self.image_col, self.caption_col])
            images, captions = table[self.image_col], table[self.caption_col]
            for row in rows:
                i = int(row)
                image = images[i].as_py()
                key = f"{Path(file).stem}_{i:07d}"
                loaded[f"{file}{_REF_SEP}{row}"] = RawRecord(
                    key, key, image, captions[i].as_py(), None, origin=f"{file}:row {i}"
                )
        yield from (loaded[ref] for ref in refs)


SOURCES = {"generated": GeneratedSource, "csv": CsvSource, "webdataset": WebDatasetSource, "parquet": ParquetSource}


def make_source(params: SourceParams) -> Source:
    return SOURCES[params.kind](params)


def _expand(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise FileNotFoundError(f"sample.source.path: no files match {pattern!r}")
    return files


Member = tuple[int, int] | tarfile.TarInfo  # (data offset, size); a TarInfo only for a GNU sparse file


def tar_index(file: str) -> dict[str, dict[str, Member]]:
    """Where each regular member of a tar lies, by key and extension, in the tar's order.

    A tar has no index: finding a member means reading every header before it. The sample stage
    asks for one shard's records per task, and a source tar of 10,000 samples feeds about ten
    shards, so scanning it once per shard re-read every header ten times (the stage ran 2-4x slower
    than one pass over the source, ``benchmarks/sample_throughput.py``). The index is kept per process for the
    last 8 files (~7 MB each for 10,000 samples: offsets, not TarInfo objects), keyed by size and
    mtime so a rewritten tar is scanned again. Scanning a 10,000-sample tar took 2.4 s here."""
    stat = os.stat(file)
    return _tar_index(file, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _tar_index(file: str, size: int, mtime_ns: int) -> dict[str, dict[str, Member]]:
    index: dict[str, dict[str, Member]] = defaultdict(dict)
    with tarfile.open(file) as tar:
        for member in tar:
            if member.isfile():
                key, ext = _split_member(member.name)
                index[key][ext] = member if member.issparse() else (member.offset_data, member.size)
    return dict(index)


def _read_member(tar: tarfile.TarFile, where: Member) -> bytes:
    """A member's bytes: what ``tar.extractfile`` reads for a regular file, from the same file object."""
    if isinstance(where, tarfile.TarInfo):
        return tar.extractfile(where).read()
    offset, size = where
    tar.fileobj.seek(offset)
    return tar.fileobj.read(size)


def _split_member(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): webdataset keys end at the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def _by_file(refs: Sequence[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for ref in refs:
        file, item = ref.split(_REF_SEP, 1)
        grouped[file].append(item)
    return grouped
