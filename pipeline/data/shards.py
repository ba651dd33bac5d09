"""Webdataset tar shards, as img2dataset writes them: ``key.jpg``, ``key.txt``, ``key.json`` per
record, plus a parquet index per shard (key, caption, size) for tools that want a table.

Writing is deterministic (fixed member order, zero mtimes and owners) so the same records give
the same bytes, and atomic (a temporary file renamed into place) so an interrupted run never
leaves a half shard that looks whole.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.records import Record
from pipeline.fingerprint import file_digest

SPLITS = ("train", "val", "test")


MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_shard(records: Iterable[Record], tar_path: str | Path) -> int:
    """Write records to ``tar_path`` and its ``.parquet`` index; return how many were written."""
    tar_path = Path(tar_path)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    tmp = tar_path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for record in records:
            key = record.key.replace("/", "_")
            meta = json.dumps(record.meta, sort_keys=True).encode()
            for ext, payload in (("jpg", record.jpeg), ("txt", record.caption.encode()), ("json", meta)):
                _add_member(tar, f"{key}.{ext}", payload)
            rows.append({"key": key, "caption": record.caption, "group": str(record.meta.get("group", key)),
                         "width": record.meta.get("width"), "height": record.meta.get("height")})
    os.replace(tmp, tar_path)
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("group", pa.string()),
                        ("width", pa.int32()), ("height", pa.int32())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tar_path.with_suffix(".parquet"))
    return len(rows)


def read_shard(tar_path: str | Path) -> Iterator[Record]:
    """Records of one shard, in order; samples lacking a part raise, since shards are ours."""
    parts: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if key not in parts:
                    parts[key] = {}
                    order.append(key)
                parts[key][ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as err:
        raise ValueError(f"{tar_path}: unreadable shard ({err}): re-run the sample stage") from None
    for key in order:
        sample = parts[key]
        try:
            yield Record(key, sample["jpg"], sample["txt"].decode(), json.loads(sample["json"]))
        except KeyError as err:
            raise ValueError(f"{tar_path}: sample {key!r} lacks its .{err.args[0]} member") from None


def split_shards(out_dir: str | Path, split: str) -> list[Path]:
    """The tar shards of one split, sorted: the ones the sample's manifest lists, each checked,
    with its parquet index, against the manifest's sha256 (a shard on disk that it does not list
    is stale, an error naming it), or every ``shard-*.tar`` of a folder without a manifest. A
    missing split folder or listed shard is an error naming it.

    Every reader of the sample lists its shards here, so none can read a truncated or edited
    shard: the check lives where the files are found, not in each stage that remembers it."""
    out_dir = Path(out_dir)
    folder = out_dir / split
    if not folder.is_dir():
        raise FileNotFoundError(f"no '{split}' split under {out_dir} (run the sample stage first)")
    on_disk = sorted(folder.glob("shard-*.tar"))
    listed = manifest_shards(out_dir)
    if listed is None:
        return on_disk
    entries = [entry for entry in listed if Path(entry["path"]).parts[0] == split]
    shards = sorted(_listed_file(out_dir, entry) for entry in entries)
    if stale := sorted(set(on_disk) - set(shards)):
        raise ValueError(f"{stale[0]}: a shard the manifest does not list ({len(stale)} such in {folder}): "
                         "left from another sample; re-run the sample stage into a fresh folder")
    for entry in entries:
        _check_hash(out_dir, entry)
        if "index_sha256" in entry:  # its parquet index too (older manifests have no hash of it)
            _check_hash(out_dir, {"path": index_name(entry["path"]), "sha256": entry["index_sha256"]})
    return shards


def present_splits(out_dir: str | Path, splits: Iterable[str]) -> list[str]:
    """The splits of ``splits`` the sample has: a folder on disk or shards in the manifest (whose
    missing folder is then an error naming a shard, never a silently empty split)."""
    listed = {Path(entry["path"]).parts[0] for entry in manifest_shards(out_dir) or []}
    return [split for split in splits if split in listed or (Path(out_dir) / split).is_dir()]


def manifest_shards(out_dir: str | Path) -> list[dict[str, Any]] | None:
    """The manifest's shard entries (path, records, sha256), or None for a folder without one."""
    manifest = _manifest(out_dir)
    return None if manifest is None else manifest.get("shards")


def _manifest(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _eval_files(out_dir: str | Path) -> list[dict[str, Any]]:
    """The manifest's entries (path, sha256) of the eval sets' files; none in an older manifest."""
    return ((_manifest(out_dir) or {}).get("eval_sets") or {}).get("files", [])


def hashed_files(out_dir: str | Path, folder: str | Path) -> list[dict[str, Any]]:
    """Manifest entries (path relative to ``out_dir``, sha256) of every file under ``folder``:
    what the sample stage records so that readers can check the eval sets as they check shards."""
    out_dir = Path(out_dir)
    return [{"path": p.relative_to(out_dir).as_posix(), "sha256": file_digest(p)}
            for p in sorted(Path(folder).rglob("*")) if p.is_file()]


def sample_file(out_dir: str | Path, name: str) -> Path:
    """``out_dir/name`` (an eval set's file), checked against the manifest's sha256 of it when the
    manifest lists it, as :func:`split_shards` checks the shards."""
    for entry in _eval_files(out_dir):
        if entry["path"] == name:
            _check_hash(out_dir, entry)
    return Path(out_dir) / name


def _listed_file(out_dir: str | Path, entry: dict[str, Any]) -> Path:
    """The path of a file the manifest lists; an error naming it when it is not on disk."""
    path = Path(out_dir) / entry["path"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: listed in {Path(out_dir) / MANIFEST} but missing (re-run the sample stage)")
    return path


def _check_hash(out_dir: str | Path, entry: dict[str, Any]) -> Path:
    """The listed file, if its bytes are the ones the manifest hashed (once per process while its
    size and mtime stay put); else one line naming it, the expected and the found hash."""
    path = _listed_file(out_dir, entry)
    if (found := file_digest(path)) != entry["sha256"]:
        records = f"; the manifest lists {entry['records']} records" if "records" in entry else ""
        raise ValueError(f"{path}: its sha256 differs from the manifest's (expected {entry['sha256'][:16]}..., "
                         f"found {found[:16]}..., {path.stat().st_size} bytes{records}): truncated or changed "
                         "since the sample stage wrote it; re-run the sample stage")
    return path


def verify_shards(out_dir: str | Path) -> int:
    """Check every shard of every split against the manifest before a long job reads them (each
    split's reader checks its own anyway, once per process). Returns the shards checked."""
    listed = manifest_shards(out_dir) or []
    for entry in listed:
        _check_hash(out_dir, entry)
    return len(listed)


def split_paths(data_dir: str | Path, split: str) -> list[str]:
    """Absolute shard paths (Ray workers may run elsewhere); an empty split is an error."""
    paths = [str(p.resolve()) for p in split_shards(data_dir, split)]
    if not paths:
        raise FileNotFoundError(f"the '{split}' split under {data_dir} has no shards")
    return paths


def read_split(out_dir: str | Path, split: str) -> Iterator[Record]:
    for shard in split_shards(out_dir, split):
        yield from read_shard(shard)


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def select_rows(rows: Iterable[Any], group_of, part: tuple[int, int] = (0, 1), limit: int | None = None,
                one_per_group: bool = False) -> list[Any]:
    """Rows rank, rank + world, ... of ``rows`` (``part = (rank, world)``), each group's first only
    with ``one_per_group`` (``group_of(row)``), at most ``limit``: the one selection that decoding a
    split and reading its cached tower features both make, so they pick the same rows."""
    rank, world = part
    if not 0 <= rank < world:
        raise ValueError(f"part {part}: rank must be in [0, world)")
    selected, groups = [], set()
    for i, row in enumerate(rows):
        if i % world != rank:
            continue
        if one_per_group:
            group = group_of(row)
            if group in groups:
                continue
            groups.add(group)
        selected.append(row)
        if limit is not None and len(selected) >= limit:
            break
    return selected


def index_rows(data_dir: str | Path, splits: Iterable[str]) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """(split, shard, row: key, group, caption) of every record of the splits the sample has,
    from the shard indexes (no image is read) of the verified shards of :func:`split_shards`."""
    for split in present_splits(data_dir, splits):
        for shard in split_shards(data_dir, split):
            for row in pq.read_table(shard.with_suffix(".parquet"), columns=["key", "group", "caption"]).to_pylist():
                yield split, shard, row


def index_name(shard: str) -> str:
    """The relative path of a shard's parquet index."""
    return shard.removesuffix(".tar") + ".parquet"


def caption_rows(data_dir: str | Path, splits: list[str]) -> list[dict[str, Any]]:
    """Every caption of the given splits from the shard indexes (no image is read)."""
    return [{"key": row["key"], "group": row["group"], "split": split, "text": row["caption"]}
            for split, _, row in index_rows(data_dir, splits)]
