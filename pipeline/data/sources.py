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
import re
import tarfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
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
            rec = render_record(int(ref), p.seed, p.image_size, p.max_objects, p.word_probability,
                                position_probability=p.position_probability)
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
        """``file::key::stamp@ext=offset+size;...``: where each member of the sample lies, from
        the one scan of each tar that listing its keys needs anyway, so :meth:`load` seeks straight
        to the bytes and no worker reads a tar header again (with a per-process index instead,
        workers re-scanned tars whenever a shard drew from more tars than the index kept:
        ``benchmarks/sample_throughput.py`` at 10 tars ran 0.62x the plain loop). ``stamp`` is the
        tar's size and mtime: a tar rewritten since is scanned afresh, never read at stale
        offsets. A key with a member only tarfile can read (GNU sparse) gets a plain
        ``file::key`` ref and the scan."""
        return [_member_ref(file, key, members) for file in self.files for key, members in tar_index(file).items()]

    def group(self, ref: str) -> str:
        return ref.split(_REF_SEP)[1]

    def load(self, refs: Sequence[str]) -> Iterator[RawRecord]:
        loaded: dict[str, RawRecord] = {}
        for file, items in _by_file(refs).items():
            stamp = _stamp(file)
            with open(file, "rb") as raw, ExitStack() as scan:
                index = tar = None
                for item in items:
                    key, _, located = item.partition(_REF_SEP)
                    places, source = _parse_places(located, stamp), raw
                    if places is None:  # no offsets, or stale ones: find the key by a scan
                        if index is None:
                            index, tar = tar_index(file), scan.enter_context(tarfile.open(file))
                        places, source = index.get(key, {}), tar
                    parts = {ext: _read_member(source, where) for ext, where in places.items()}
                    loaded[f"{file}{_REF_SEP}{item}"] = self._record(file, key, parts)
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

    A tar has no index: finding a member means reading every header before it (2.4 s for a
    10,000-sample tar here). :meth:`WebDatasetSource.refs` scans each tar once and writes the
    offsets into the refs, so shard builders never scan; this index serves that scan and the refs
    that cannot carry offsets (compressed tars, GNU sparse members). It is kept per process for
    the last 8 files (~7 MB each for 10,000 samples: offsets, not TarInfo objects), keyed by size
    and mtime so a rewritten tar is scanned again."""
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


def _read_member(source, where: Member) -> bytes:
    """A member's bytes, as ``tar.extractfile`` reads a regular file: ``source`` is the opened
    TarFile (offsets into its, possibly decompressed, stream; a GNU sparse member's TarInfo) or,
    for an uncompressed tar, the raw file, whose offsets are the same."""
    if isinstance(where, tarfile.TarInfo):
        return source.extractfile(where).read()
    offset, size = where
    stream = source.fileobj if isinstance(source, tarfile.TarFile) else source
    stream.seek(offset)
    return stream.read(size)


def _stamp(file: str) -> str:
    stat = os.stat(file)
    return f"{stat.st_size}.{stat.st_mtime_ns}"


def _member_ref(file: str, key: str, members: dict[str, Member]) -> str:
    """``file::key::stamp@ext=offset+size;...``, or ``file::key`` where offsets cannot say it."""
    if not _uncompressed(file) or any(isinstance(m, tarfile.TarInfo) or not _PLAIN_EXT.fullmatch(ext)
                                      for ext, m in members.items()):
        return f"{file}{_REF_SEP}{key}"
    places = ";".join(f"{ext}={offset}+{size}" for ext, (offset, size) in members.items())
    return f"{file}{_REF_SEP}{key}{_REF_SEP}{_stamp(file)}@{places}"


def _parse_places(located: str, stamp: str) -> dict[str, Member] | None:
    """The members' (offset, size) from a ref's tail; None if it has none or the tar changed."""
    ref_stamp, _, places = located.partition("@")
    if not places or ref_stamp != stamp:
        return None
    out: dict[str, Member] = {}
    for place in places.split(";"):
        ext, _, span = place.partition("=")
        offset, _, size = span.partition("+")
        out[ext] = (int(offset), int(size))
    return out


_PLAIN_EXT = re.compile(r"[^=;+@]*")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: offsets are into the decompressed stream


@functools.lru_cache(maxsize=1024)
def _uncompressed(file: str) -> bool:
    with open(file, "rb") as f:
        head = f.read(6)
    return not head.startswith(_COMPRESSED)


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
