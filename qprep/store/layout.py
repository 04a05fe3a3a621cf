"""The store: a Zarr v3 group of token arrays plus a Parquet manifest per shard.

```
store.zarr/
  zarr.json                          group attributes under "qprep": schema version, extraction
                                     config and fingerprint, model, hidden size, dtypes, shard count
  shards/<shard>/<key>/video         zarr array [rows, hidden] (bf16 stored as its uint16 bits)
  shards/<shard>/<key>/audio         zarr array [rows, hidden] (families with an audio tower)
  shards/<shard>/<key>/deepstack     zarr array [rows, levels, hidden]: the vision tower's deepstack
                                     features, row for row beside `video` (its offsets and lengths)
                                     (a store at the merger-input level: `video` [rows, merge², vision
                                     width], `deepstack` [rows, levels, merge², vision width], one row
                                     per merged token still, so the manifest's spans are unchanged)
  manifest/<shard>.parquet           one row per entry (qprep.schemas.manifest), the commit point
  .qprep/                            lock and hash caches (not part of the data)
```

A shard's arrays are written first under a directory named by the shard's key; the shard becomes
visible when its manifest file is replaced in one step (on a local disk: fsync'd, then
`os.replace`; on an object store: one PUT). Readers only follow manifests, so a killed writer
leaves at most unreferenced arrays, which the next writer removes. This module is the only one
that knows these paths; qprep.store.fs knows how to read and write them on a local disk or
behind a URL (`s3://bucket/prefix/store.zarr`).

Size. A commit rewrites its whole shard (the kept entries' tokens are copied into the new key's
arrays), so a shard's size bounds what a changed entry costs. A new store's shard count follows
from the entries its first run plans (`shard_count_for`: about `ENTRIES_PER_SHARD` entries a
shard, never fewer than `MIN_SHARDS` shards) and is recorded in its attributes, where readers and
every later run read it; a store keeps its count (stores written before the rule keep their 256).
A shard's arrays are written a chunk at a time from parts that may be read lazily
(`LazyTokens`), so a commit holds one chunk and one entry, not the shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qprep.errors import StoreError
from qprep.schemas.dtypes import storage_dtype
from qprep.schemas.manifest import MANIFEST_SCHEMA, ManifestRow, conformed, manifest_table, shard_keys
from qprep.store.fs import LocalFiles, RemoteFiles, files_at

# 1: video (and audio) arrays. 2: also a deepstack array; written only by stores that have one, so
# that a qprep reading version 1 alone refuses such a store rather than read it without its levels.
# 3: rows of other kinds than video (images; `ManifestRow.kind`), whose tokens share the video
# arrays; written only by stores that take them, so a qprep that knows only videos refuses such a store.
# 4: the visual arrays hold the merger's input (`level` "merger-input"); written only by such stores.
# 5: rows of audio files (kind "audio"), with an audio span and no visual tokens; written only by stores
# that take them, so a qprep that knows no audio entries refuses such a store rather than read one as a video.
SCHEMA_VERSION = 5
READS = (1, 2, 3, 4, 5)
KINDS = ("video", "audio", "deepstack")
# The manifest row's span (`ManifestRow.span`) that places a kind's rows; deepstack rows are the
# video rows' twins. (A store without deepstack levels holds no such array: the layout of
# the stores written before it existed is unchanged.)
SPAN = {"video": "video", "audio": "audio", "deepstack": "video"}
CHUNK_BYTES = 4 << 20  # rows per chunk are chosen so a chunk holds about this much
# A new store's shard count: about this many entries a shard (a changed entry rewrites its shard's
# tokens: 256 small images at a 7B model's width, 4 tokens each, are 7 MB; 256 640x480 photos,
# about 390 tokens each, 0.7 GB), and never fewer shards than qprep's stores have always had.
ENTRIES_PER_SHARD = 256
MIN_SHARDS = 256
SCRATCH = "scratch"  # in .qprep/ of a local store: tokens waiting for their shard's commit (never read by readers)
# qprep's own files, in .qprep/
LAST_RUN = "last-run.json"  # the videos directory and summary of the latest run
WEIGHT_DIGESTS = "weight-digests.json"  # tower weight hashes by file, size and mtime (not re-hashed when equal)
MODEL_SPEC = "model-spec.json"  # the preprocessor spec, by the config files it was read from
GROUP, MANIFEST, SHARDS, PRIVATE = "zarr.json", "manifest", "shards", ".qprep"
LOCK = f"{PRIVATE}/lock"


def shard_count_for(entries: int) -> int:
    """The shard count of a new store whose first run plans `entries` entries."""
    return max(MIN_SHARDS, math.ceil(entries / ENTRIES_PER_SHARD))


class LazyTokens(Protocol):
    """An entry's tokens that a commit reads only when it writes them (a kept entry's rows in the
    committed arrays, fresh tokens waiting in a scratch file)."""

    shape: tuple[int, ...]

    def read(self) -> np.ndarray: ...


Tokens = np.ndarray | LazyTokens  # what a commit takes for one entry's rows of one kind


@dataclass(frozen=True)
class LastRun:
    """The latest run's videos folder (where `status` and `verify` look by default), whether it
    followed links out of it, and its summary (None while it runs, or when it died)."""

    videos: str | None = None
    follow_links: bool = False
    summary: dict | None = None


class Store:
    def __init__(self, files: LocalFiles | RemoteFiles, attrs: dict[str, Any]):
        self.files = files
        self.attrs = attrs

    @property
    def root(self) -> Path | str:
        """The store's directory (a Path), or its URL for a store behind one."""
        return self.files.root

    @property
    def location(self) -> str:
        """What reopens this store: its path or its URL."""
        return self.files.location

    # ---- creating and opening -------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, *, config: dict, fingerprint: str, model: str, hidden_size: int,
               dtype: str, shard_count: int, has_audio: bool, deepstack_levels: int = 0,
               images: bool = False, merger_input: tuple[int, int] | None = None,
               audio_files: bool = False) -> "Store":
        """`merger_input`: (merge², vision width) for a store of the merger's input (level
        "merger-input"); None for merged tokens. `audio_files`: the store takes audio files."""
        import zarr

        files = files_at(root)
        if not files.is_empty():
            # zarr's mode "w" would empty the directory: never point it at someone's files
            raise StoreError(f"{files.root} exists and is neither empty nor a qprep store; refusing to write there")
        attrs = {
            "schema_version": (5 if audio_files else 4 if merger_input else 3 if images
                               else 2 if deepstack_levels else 1),
            "fingerprint": fingerprint,
            "config": config,
            "model": model,
            "hidden_size": hidden_size,
            "dtype": dtype,
            "storage_dtype": storage_dtype(dtype).name,
            "shard_count": shard_count,
            "has_audio": has_audio,
            "deepstack_levels": deepstack_levels,
        }
        if merger_input:
            attrs.update(level="merger-input", merger_input=list(merger_input))
        files.makedirs()
        try:  # "w-", not "w" (which empties the directory): a store another process just created stays
            zarr.open_group(files.zarr_store("", read_only=False), mode="w-", zarr_format=3,
                            attributes={"qprep": attrs})
        except FileExistsError:
            raise StoreError(f"{files.root} was created by another process meanwhile") from None
        files.makedirs(MANIFEST, SHARDS)
        return cls(files, attrs)

    @classmethod
    def open(cls, root: str | Path) -> "Store":
        files = files_at(root)
        try:
            meta = files.read(GROUP)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoreError(f"{files.root}: not a qprep store (no zarr.json)") from None
        try:
            attrs = json.loads(meta)["attributes"]["qprep"]
        except (KeyError, json.JSONDecodeError) as exc:
            raise StoreError(f"{files.root}: a Zarr group, but not a qprep store ({exc})") from exc
        if attrs.get("schema_version") not in READS:
            raise StoreError(f"{files.root}: store schema version {attrs.get('schema_version')}, this qprep reads "
                             f"versions {', '.join(map(str, READS))}; re-extract with --rebuild")
        return cls(files, attrs)

    @staticmethod
    def exists(root: str | Path) -> bool:
        return files_at(root).exists(GROUP)

    @staticmethod
    def remove(root: str | Path) -> None:
        """Delete a store (for --rebuild); refuses a directory that is not a qprep store, and a store
        another process is writing (it holds the lock)."""
        store = Store.open(root)
        with store.lock():
            store.files.remove_all(last=LOCK)

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def shard_count(self) -> int:
        return int(self.attrs["shard_count"])

    @property
    def hidden_size(self) -> int:
        return int(self.attrs["hidden_size"])

    @property
    def deepstack_levels(self) -> int:
        return int(self.attrs.get("deepstack_levels", 0))

    @property
    def level(self) -> str:
        """Where the visual tokens were taken from the vision tower (`qprep.schemas.towers.LEVELS`)."""
        return self.attrs.get("level", "merged")

    @property
    def merger_input(self) -> tuple[int, int] | None:
        """(merge², vision width) of a merged token's merger input; None: the store holds merged tokens."""
        shape = self.attrs.get("merger_input")
        return tuple(shape) if shape else None

    def kinds(self) -> tuple[str, ...]:
        """The token arrays each shard of this store holds."""
        return tuple(kind for kind in KINDS if kind == "video" or (kind == "audio" and self.attrs.get("has_audio"))
                     or (kind == "deepstack" and self.deepstack_levels))

    def row_shape(self, kind: str) -> tuple[int, ...]:
        """The shape of one row of a kind's array."""
        if kind == "audio":
            return (self.hidden_size,)
        visual = self.merger_input or (self.hidden_size,)
        return (self.deepstack_levels, *visual) if kind == "deepstack" else visual

    def size_bytes(self) -> int:
        """Bytes of every file of the store."""
        return self.files.size()

    # ---- the manifest ---------------------------------------------------------------------------

    def shard_files(self) -> dict[int, str]:
        """Committed shards and their manifest files (relative to the store's root)."""
        out = {}
        for name in self.files.files(MANIFEST):
            stem, _, suffix = name.partition(".")
            if suffix == "parquet" and stem.isdigit():
                out[int(stem)] = f"{MANIFEST}/{name}"
        return dict(sorted(out.items()))

    def manifest(self) -> pa.Table:
        """All committed rows, in shard order."""
        found = self.files.read_many(list(self.shard_files().values()))
        # ParquetFile, not read_table: the latter imports pyarrow.dataset and pandas (0.3 s)
        tables = [conformed(pq.ParquetFile(pa.BufferReader(data)).read()) for data in found.values()]
        return pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()

    # ---- writing a shard ------------------------------------------------------------------------

    def commit_shard(self, shard: int, key: str, rows: list[ManifestRow], tokens: dict[str, Sequence[Tokens]]) -> int:
        """Write a shard's arrays, then make it visible in one atomic step. Returns bytes written.

        `rows` are the manifest rows in their final order; `tokens[kind][i]` is row i's tokens in
        the storage dtype (empty for failed rows), an array or `LazyTokens` read when written.
        Offsets and lengths are filled in here.
        """
        data_dir = self._data_dir(shard, key)
        self.files.remove_tree(data_dir)  # left by a run that died before committing this very key
        itemsize = np.dtype(self.attrs["storage_dtype"]).itemsize
        size = sum(math.prod(part.shape) * itemsize for kind in self.kinds() for part in tokens[kind])
        with self._full_disk_named(f"shard {shard} ({size / 1e6:.2f} MB of tokens)", unfinished=data_dir):
            written = 0
            for kind in self.kinds():
                parts = tokens[kind]
                offset = 0
                for row, part in zip(rows, parts):
                    span = SPAN[kind]
                    if span == kind:
                        row.set_span(span, offset, int(part.shape[0]))
                    elif row.span(span) != (offset, int(part.shape[0])):
                        raise StoreError(f"video {row.id}: {part.shape[0]} {kind} rows for "
                                         f"{row.span(span)[1]} {span} rows")
                    offset += int(part.shape[0])
                written += self._write_array(data_dir, kind, parts, offset)
            for row in rows:
                row.shard_key = key
            written += self._replace_manifest(shard, manifest_table(rows))
        self._drop_other_keys(shard, keep=key)
        return written

    def rewrite_manifest(self, shard: int, rows: list[ManifestRow]) -> int:
        """Replace a shard's manifest over its existing arrays (rows keep their offsets)."""
        with self._full_disk_named(f"shard {shard}'s manifest"):
            return self._replace_manifest(shard, manifest_table(rows))

    def remove_shard(self, shard: int) -> None:
        """Retire a shard whose videos are all gone."""
        self.files.remove(self._manifest_path(shard))
        self.files.remove_tree(f"{SHARDS}/{_shard_name(shard)}")

    def collect_garbage(self, manifest: pa.Table) -> None:
        """Remove what a killed writer left: unreferenced arrays and unfinished manifest files.
        `manifest` is the committed manifest (`self.manifest()`); its scratch goes with `scratch`."""
        self.files.remove_unfinished(MANIFEST)
        committed = shard_keys(manifest)
        for shard_name in self.files.dirs(SHARDS):
            if not shard_name.isdigit():
                continue
            keep = committed.get(int(shard_name))
            for key_name in self.files.dirs(f"{SHARDS}/{shard_name}"):
                if key_name != _key_name(keep or ""):
                    self.files.remove_tree(f"{SHARDS}/{shard_name}/{key_name}")
            if keep is None:
                self.files.remove_tree(f"{SHARDS}/{shard_name}")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time: a second `qprep extract` on the same store is refused, not mixed in."""
        with self.files.lock(LOCK, busy=f"{self.root}: another qprep extract is writing this store"):
            yield

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A local directory for the writer's tokens waiting for their shard's commit (the lock's
        holder's alone), emptied first (a killed run's) and removed afterwards: in the store's
        .qprep/ for a local store (the disk the tokens go to anyway), a temporary directory for a
        store behind a URL."""
        if isinstance(self.files, LocalFiles):
            path = self.files.root / PRIVATE / SCRATCH
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)
        else:
            with tempfile.TemporaryDirectory(prefix="qprep-scratch-") as path:
                yield Path(path)

    def read_json(self, name: str) -> dict:
        try:
            return json.loads(self.files.read(f"{PRIVATE}/{name}"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def last_run(self) -> LastRun:
        """What the latest `qprep extract` on this store recorded (empty before the first)."""
        recorded = self.read_json(LAST_RUN)
        return LastRun(videos=recorded.get("videos"), follow_links=bool(recorded.get("follow_links", False)),
                       summary=recorded.get("summary"))

    def record_run(self, run: LastRun) -> None:
        self.write_json(LAST_RUN, dataclasses.asdict(run))

    def write_json(self, name: str, value: dict) -> None:
        data = json.dumps(value).encode()
        with self._full_disk_named(f"{PRIVATE}/{name}"):
            self.files.replace(f"{PRIVATE}/{name}", lambda sink: sink.write(data), durable=False)

    # ---- reading tokens -------------------------------------------------------------------------

    def array(self, shard: int, key: str, kind: str):
        import zarr

        return zarr.open_array(self.files.zarr_store(f"{self._data_dir(shard, key)}/{kind}", read_only=True),
                               mode="r", zarr_format=3)

    # ---- internals ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _full_disk_named(self, what: str, unfinished: str | None = None) -> Iterator[None]:
        """A full disk (ENOSPC) becomes a StoreError naming the store and what did not fit: zarr's and
        pyarrow's own errors name neither. `unfinished`, the arrays directory being written, is removed
        with any temporary manifest to give the space back; committed shards are never touched."""
        try:
            yield
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            if unfinished is not None:
                self.files.remove_tree(unfinished)
                self.files.remove_unfinished(MANIFEST)
            raise StoreError(f"{self.location}: no space left on device while writing {what}. The shards "
                             f"committed so far are intact; free some space and run the same command again: "
                             f"it goes on from there.") from exc

    def _data_dir(self, shard: int, key: str) -> str:
        return f"{SHARDS}/{_shard_name(shard)}/{_key_name(key)}"

    def _manifest_path(self, shard: int) -> str:
        return f"{MANIFEST}/{_shard_name(shard)}.parquet"

    def _write_array(self, data_dir: str, kind: str, parts: Sequence[Tokens], rows: int) -> int:
        """Write one kind's array from its parts, a chunk at a time: at most a chunk and one part
        are in memory, and every chunk is written whole (no chunk is read back)."""
        import zarr

        storage = self.attrs["storage_dtype"]
        row_shape = self.row_shape(kind)
        # Edge chunks are stored whole: never make a chunk longer than the array.
        chunk_rows = max(1, min(rows, CHUNK_BYTES // (math.prod(row_shape) * np.dtype(storage).itemsize)))
        array = zarr.create_array(
            store=self.files.zarr_store(f"{data_dir}/{kind}", read_only=False), shape=(rows, *row_shape),
            dtype=storage, chunks=(chunk_rows, *row_shape), compressors=None, fill_value=0, zarr_format=3,
            attributes={"logical_dtype": self.attrs["dtype"]},
        )
        start = 0
        for chunk in _chunks((part for part in parts if part.shape[0]), chunk_rows):
            array[start:start + chunk.shape[0]] = chunk.astype(storage, copy=False)
            start += chunk.shape[0]
        return self.files.persist(f"{data_dir}/{kind}")

    def _replace_manifest(self, shard: int, table: pa.Table) -> int:
        return self.files.replace(self._manifest_path(shard), lambda sink: pq.write_table(table, sink), durable=True)

    def _drop_other_keys(self, shard: int, keep: str) -> None:
        shard_dir = f"{SHARDS}/{_shard_name(shard)}"
        for key_name in self.files.dirs(shard_dir):
            if key_name != _key_name(keep):
                self.files.remove_tree(f"{shard_dir}/{key_name}")


def _chunks(parts: Iterator[Tokens], chunk_rows: int) -> Iterator[np.ndarray]:
    """The rows of `parts`, in order, cut into blocks of `chunk_rows` rows (the last may be shorter);
    each part is read when its rows are reached."""
    pending: list[np.ndarray] = []
    held = 0
    for part in parts:
        values = part if isinstance(part, np.ndarray) else part.read()
        while values.shape[0]:
            take = min(chunk_rows - held, values.shape[0])
            pending.append(values[:take])
            held += take
            values = values[take:]
            if held == chunk_rows:
                yield np.concatenate(pending)
                pending, held = [], 0
    if pending:
        yield np.concatenate(pending)


def _shard_name(shard: int) -> str:
    return f"{shard:05d}"


def _key_name(key: str) -> str:
    return key[:16]
