"""The store on disk: a Zarr v3 group of token arrays plus a Parquet manifest per shard.

```
store.zarr/
  zarr.json                          group attributes under "qprep": schema version, extraction
                                     config and fingerprint, model, hidden size, dtypes, shard count
  shards/<shard>/<key>/video         zarr array [rows, hidden] (bf16 stored as its uint16 bits)
  shards/<shard>/<key>/audio         zarr array [rows, hidden] (Omni only)
  manifest/<shard>.parquet           one row per video (qprep.schemas.manifest), the commit point
  .qprep/                            lock file and hash caches (not part of the data)
```

A shard's arrays are written first under a directory named by the shard's key; the shard becomes
visible when its manifest file is atomically replaced (fsync'd, then `os.replace`). Readers only
follow manifests, so a killed writer leaves at most unreferenced arrays, which the next writer
removes. This module is the only one that knows these paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qprep.errors import StoreError
from qprep.schemas.manifest import MANIFEST_SCHEMA, manifest_table

SCHEMA_VERSION = 1
KINDS = ("video", "audio")
# Logical dtype → what the Zarr array holds. Zarr and NumPy have no bfloat16: keep its bits.
STORAGE_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}
CHUNK_BYTES = 4 << 20
LAST_RUN = "last-run.json"  # in .qprep/: the videos directory and summary of the latest run  # rows per chunk are chosen so a chunk holds about this much


class Store:
    def __init__(self, root: Path, attrs: dict[str, Any]):
        self.root = Path(root)
        self.attrs = attrs

    # ---- creating and opening -------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, *, config: dict, fingerprint: str, model: str, hidden_size: int,
               dtype: str, shard_count: int, has_audio: bool) -> "Store":
        import zarr

        root = Path(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            # zarr's mode "w" would empty the directory: never point it at someone's files
            raise StoreError(f"{root} exists and is neither empty nor a qprep store; refusing to write there")
        attrs = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": fingerprint,
            "config": config,
            "model": model,
            "hidden_size": hidden_size,
            "dtype": dtype,
            "storage_dtype": STORAGE_DTYPES[dtype],
            "shard_count": shard_count,
            "has_audio": has_audio,
        }
        root.mkdir(parents=True, exist_ok=True)
        zarr.open_group(str(root), mode="w", zarr_format=3, attributes={"qprep": attrs})
        (root / "manifest").mkdir(exist_ok=True)
        (root / "shards").mkdir(exist_ok=True)
        return cls(root, attrs)

    @classmethod
    def open(cls, root: str | Path) -> "Store":
        root = Path(root)
        meta = root / "zarr.json"
        if not meta.is_file():
            raise StoreError(f"{root}: not a qprep store (no zarr.json)")
        try:
            attrs = json.loads(meta.read_text())["attributes"]["qprep"]
        except (KeyError, json.JSONDecodeError) as exc:
            raise StoreError(f"{root}: a Zarr group, but not a qprep store ({exc})") from exc
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{root}: store schema version {attrs.get('schema_version')}, this qprep reads "
                             f"version {SCHEMA_VERSION}; re-extract with --rebuild")
        return cls(root, attrs)

    @staticmethod
    def exists(root: str | Path) -> bool:
        return (Path(root) / "zarr.json").is_file()

    @staticmethod
    def remove(root: str | Path) -> None:
        """Delete a store (for --rebuild); refuses a directory that is not a qprep store, and a store
        another process is writing (it holds the lock)."""
        root = Path(root)
        with Store.open(root).lock():
            shutil.rmtree(root)

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def shard_count(self) -> int:
        return int(self.attrs["shard_count"])

    @property
    def hidden_size(self) -> int:
        return int(self.attrs["hidden_size"])

    # ---- the manifest ---------------------------------------------------------------------------

    def shard_files(self) -> dict[int, Path]:
        """Committed shards and their manifest files."""
        out = {}
        for path in (self.root / "manifest").glob("*.parquet"):
            if path.stem.isdigit():
                out[int(path.stem)] = path
        return dict(sorted(out.items()))

    def manifest(self) -> pa.Table:
        """All committed rows, in shard order."""
        # ParquetFile, not read_table: the latter imports pyarrow.dataset and pandas (0.3 s)
        tables = [pq.ParquetFile(path).read().cast(MANIFEST_SCHEMA) for path in self.shard_files().values()]
        return pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()

    # ---- writing a shard ------------------------------------------------------------------------

    def commit_shard(self, shard: int, key: str, rows: list[dict], tokens: dict[str, list[np.ndarray]]) -> int:
        """Write a shard's arrays, then make it visible in one atomic step. Returns bytes written.

        `rows` are the manifest rows in their final order; `tokens[kind][i]` is row i's tokens in
        the storage dtype (empty for failed rows). Offsets and lengths are filled in here.
        """
        data_dir = self._data_dir(shard, key)
        if data_dir.exists():  # left by a run that died before committing this very key
            shutil.rmtree(data_dir)
        written = 0
        for kind in self._kinds():
            parts = tokens[kind]
            offset = 0
            for row, part in zip(rows, parts):
                row[f"{kind}_offset"], row[f"{kind}_length"] = offset, int(part.shape[0])
                offset += int(part.shape[0])
            written += self._write_array(data_dir, kind, parts, offset)
        for row in rows:
            row["shard_key"] = key
        written += self._replace_manifest(shard, manifest_table(rows))
        self._drop_other_keys(shard, keep=key)
        return written

    def rewrite_manifest(self, shard: int, rows: list[dict]) -> int:
        """Replace a shard's manifest over its existing arrays (rows keep their offsets)."""
        return self._replace_manifest(shard, manifest_table(rows))

    def remove_shard(self, shard: int) -> None:
        """Retire a shard whose videos are all gone."""
        path = self._manifest_path(shard)
        if path.exists():
            path.unlink()
            _fsync_dir(path.parent)
        shutil.rmtree(self.root / "shards" / _shard_name(shard), ignore_errors=True)

    def collect_garbage(self, manifest: pa.Table) -> None:
        """Remove what a killed writer left: unreferenced arrays and unfinished manifest files.
        `manifest` is the committed manifest (`self.manifest()`)."""
        for path in (self.root / "manifest").glob(".*.tmp*"):
            path.unlink(missing_ok=True)
        committed = dict(zip(manifest.column("shard").to_pylist(), manifest.column("shard_key").to_pylist()))
        for shard_dir in (self.root / "shards").iterdir():
            if not shard_dir.is_dir() or not shard_dir.name.isdigit():
                continue
            keep = committed.get(int(shard_dir.name))
            for key_dir in shard_dir.iterdir():
                if key_dir.is_dir() and key_dir.name != _key_name(keep or ""):
                    shutil.rmtree(key_dir, ignore_errors=True)
            if keep is None:
                shutil.rmtree(shard_dir, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time: a second `qprep extract` on the same store is refused, not mixed in."""
        path = self.private_dir() / "lock"
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StoreError(f"{self.root}: another qprep extract is writing this store") from exc
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def private_dir(self) -> Path:
        path = self.root / ".qprep"
        path.mkdir(exist_ok=True)
        return path

    def read_json(self, name: str) -> dict:
        try:
            return json.loads((self.private_dir() / name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_json(self, name: str, value: dict) -> None:
        path = self.private_dir() / name
        tmp = path.with_name(f".{name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)

    # ---- reading tokens -------------------------------------------------------------------------

    def array(self, shard: int, key: str, kind: str):
        import zarr

        return zarr.open_array(str(self._data_dir(shard, key) / kind), mode="r", zarr_format=3)

    def array_path(self, shard: int, key: str, kind: str) -> Path:
        return self._data_dir(shard, key) / kind

    # ---- internals ------------------------------------------------------------------------------

    def _kinds(self) -> tuple[str, ...]:
        return KINDS if self.attrs.get("has_audio") else KINDS[:1]

    def _data_dir(self, shard: int, key: str) -> Path:
        return self.root / "shards" / _shard_name(shard) / _key_name(key)

    def _manifest_path(self, shard: int) -> Path:
        return self.root / "manifest" / f"{_shard_name(shard)}.parquet"

    def _write_array(self, data_dir: Path, kind: str, parts: list[np.ndarray], rows: int) -> int:
        import zarr

        storage = self.attrs["storage_dtype"]
        hidden = self.hidden_size
        # Edge chunks are stored whole: never make a chunk longer than the array.
        chunk_rows = max(1, min(rows, CHUNK_BYTES // (hidden * np.dtype(storage).itemsize)))
        array = zarr.create_array(
            store=str(data_dir / kind), shape=(rows, hidden), dtype=storage, chunks=(chunk_rows, hidden),
            compressors=None, fill_value=0, zarr_format=3, attributes={"logical_dtype": self.attrs["dtype"]},
        )
        if rows:
            array[:] = np.concatenate([p for p in parts if p.shape[0]]).astype(storage, copy=False)
        return _fsync_tree(data_dir / kind)

    def _replace_manifest(self, shard: int, table: pa.Table) -> int:
        path = self._manifest_path(shard)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return path.stat().st_size

    def _drop_other_keys(self, shard: int, keep: str) -> None:
        for key_dir in (self.root / "shards" / _shard_name(shard)).iterdir():
            if key_dir.name != _key_name(keep):
                shutil.rmtree(key_dir, ignore_errors=True)


def _shard_name(shard: int) -> str:
    return f"{shard:05d}"


def _key_name(key: str) -> str:
    return key[:16]


def _fsync_tree(path: Path) -> int:
    """fsync every file under `path` (and the directories) so a committed shard survives power loss."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
                total += os.fstat(handle.fileno()).st_size
        _fsync_dir(Path(directory))
    return total


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
