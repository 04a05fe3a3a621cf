"""Where a store's files live: a local directory, or any fsspec URL (`s3://bucket/prefix/store.zarr`).

`files_at(where)` gives one of two classes with the same methods. Both name files by their path
relative to the store's root ("manifest/00000.parquet"); which paths exist and what a commit is
belongs to qprep.store.layout.

* `LocalFiles`: a directory. A file is replaced by writing a temporary file, fsync and
  `os.replace`; the writer's lock is flock(2), which the kernel drops when its holder dies.
* `RemoteFiles`: an object store through fsspec (s3fs for s3://, installed by `qprep[s3]` and
  imported only for such URLs). There is no rename, and none is needed: a PUT replaces an object
  atomically, so readers see the old object or the new one. The writer's lock is an object created
  with a conditional write (`If-None-Match: *`), which only one writer can win.

Credentials and the endpoint come the standard way (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, profiles...), as botocore reads them.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from qprep.errors import StoreError

# A writer's own listings must never hide another process's commit (a re-extract under a training run).
_OPTIONS = {"use_listings_cache": False}


def is_url(where: str | Path) -> bool:
    return isinstance(where, str) and "://" in where and not where.startswith("file://")


def files_at(where: str | Path) -> "LocalFiles | RemoteFiles":
    """The files of the store at `where`: a local path, a file:// URL, or any other fsspec URL."""
    if is_url(where):
        return RemoteFiles(where)
    if isinstance(where, str) and where.startswith("file://"):
        where = where[len("file://"):]
    return LocalFiles(Path(where))


class LocalFiles:
    """A store in a local (or shared, POSIX) directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(self.root)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def is_empty(self) -> bool:
        """True when nothing is there yet (absent, or an empty directory)."""
        return not self.root.exists() or (self.root.is_dir() and not any(self.root.iterdir()))

    def makedirs(self, *rels: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for rel in rels:
            (self.root / rel).mkdir(exist_ok=True)

    def files(self, rel: str) -> list[str]:
        directory = self.root / rel
        return sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []

    def dirs(self, rel: str) -> list[str]:
        directory = self.root / rel
        return sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """Each file's bytes; one removed since it was listed is left out."""
        out = {}
        for rel in rels:
            with contextlib.suppress(FileNotFoundError):
                out[rel] = self.read(rel)
        return out

    def replace(self, rel: str, write: Callable[[io.BufferedIOBase], None], *, durable: bool) -> int:
        """Replace a file in one step with what `write` writes; `durable`: fsync'd before and after
        the rename, so it survives power loss. Returns its size."""
        path = self.root / rel
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as sink:
            write(sink)
            sink.flush()
            if durable:
                os.fsync(sink.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
        return path.stat().st_size

    def remove_unfinished(self, rel: str) -> None:
        """Remove the temporary files a killed `replace` left in directory `rel`."""
        directory = self.root / rel
        for path in directory.glob(".*.tmp*") if directory.is_dir() else ():
            path.unlink(missing_ok=True)

    def remove(self, rel: str) -> None:
        path = self.root / rel
        if path.exists():
            path.unlink()
            _fsync_dir(path.parent)

    def remove_tree(self, rel: str) -> None:
        """Delete a directory and everything under it, as far as possible (leftovers are garbage
        the next writer collects)."""
        shutil.rmtree(self.root / rel, ignore_errors=True)

    def remove_all(self, *, last: str) -> None:
        """Delete the whole store (`last`, the lock, matters only to object stores)."""
        shutil.rmtree(self.root)

    def persist(self, rel: str) -> int:
        """fsync every file under `rel` (and the directories) so it survives power loss; its bytes."""
        total = 0
        for directory, _, files in os.walk(self.root / rel):
            for name in files:
                with open(os.path.join(directory, name), "rb") as handle:
                    os.fsync(handle.fileno())
                    total += os.fstat(handle.fileno()).st_size
            _fsync_dir(Path(directory))
        return total

    def size(self) -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(self.root) for f in files)

    def zarr_store(self, rel: str, *, read_only: bool):
        from zarr.storage import LocalStore

        return LocalStore(self.root / rel, read_only=read_only)

    @contextlib.contextmanager
    def lock(self, rel: str, *, busy: str) -> Iterator[None]:
        """Hold an exclusive lock; raise StoreError(busy) when another process holds it."""
        path = self.root / rel
        path.parent.mkdir(exist_ok=True)
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StoreError(busy) from exc
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class RemoteFiles:
    """A store behind an fsspec URL; `root` and `location` are the URL."""

    def __init__(self, url: str):
        try:
            from fsspec.core import url_to_fs

            self.fs, self._root = url_to_fs(url, **_OPTIONS)
        except ImportError as exc:  # fsspec names the package; qprep's extra installs it
            raise StoreError(f"{url}: {exc} (for s3:// URLs: pip install 'qprep[s3]')") from None
        self.location = self.root = url.rstrip("/")

    def exists(self, rel: str) -> bool:
        return self.fs.isfile(self._path(rel))

    def is_empty(self) -> bool:
        return not self._entries("")

    def makedirs(self, *rels: str) -> None:
        pass  # an object store has no directories: a key's prefixes exist while it does

    def files(self, rel: str) -> list[str]:
        return sorted(name for name, kind in self._entries(rel) if kind != "directory")

    def dirs(self, rel: str) -> list[str]:
        return sorted(name for name, kind in self._entries(rel) if kind == "directory")

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        if not rels:
            return {}
        # fetched concurrently: a store of 256 shards has 256 small manifest objects
        found = self.fs.cat([self._path(rel) for rel in rels], on_error="omit")
        return {rel: found[self._path(rel)] for rel in rels if self._path(rel) in found}

    def replace(self, rel: str, write: Callable[[io.BufferedIOBase], None], *, durable: bool) -> int:
        """One PUT: the object is replaced atomically, and durable once the PUT returns."""
        sink = io.BytesIO()
        write(sink)
        self.fs.pipe_file(self._path(rel), sink.getvalue())
        return sink.tell()

    def remove_unfinished(self, rel: str) -> None:
        pass  # a PUT that did not finish left nothing visible

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(rel))

    def remove_tree(self, rel: str) -> None:
        self._remove_under(rel, last=None)

    def remove_all(self, *, last: str) -> None:
        """Delete every object of the store, `last` (the lock) after all the others: while it is
        there no other writer starts on the half-deleted store."""
        self._remove_under("", last=last)

    def persist(self, rel: str) -> int:
        return self._du(rel)  # every PUT is durable when it returns: only count the bytes

    def size(self) -> int:
        return self._du("")

    def zarr_store(self, rel: str, *, read_only: bool):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(f"{self.location}/{rel}", storage_options=_OPTIONS, read_only=read_only)

    @contextlib.contextmanager
    def lock(self, rel: str, *, busy: str) -> Iterator[None]:
        """Hold the lock object `rel`: created only if absent, removed on exit. A holder that died
        without removing it (kill -9, a lost machine) keeps it: the error names the object to delete.
        It never expires by age: a paused holder that woke up would write beside its successor."""
        path = self._path(rel)
        mine = json.dumps(_holder()).encode()
        try:
            self.fs.pipe_file(path, mine, mode="create")  # If-None-Match: *
        except FileExistsError:
            raise StoreError(f"{busy}\n{self._held_by(rel)}") from None
        try:
            yield
        finally:
            self._release(rel, mine)

    def _held_by(self, rel: str) -> str:
        url = f"{self.location}/{rel}"
        try:
            holder = json.loads(self.read(rel))
            who = ", ".join(f"{k} {holder[k]}" for k in ("host", "pid", "user", "since") if k in holder)
        except (FileNotFoundError, ValueError):
            who = "(its content cannot be read)"
        remove = f"`aws s3 rm {url}`" if url.startswith("s3://") else "any client of the store"
        return (f"The lock object {url} was written by: {who}.\n"
                f"If that process is gone (killed before it could remove the lock), delete the object "
                f"with {remove} and run again.")

    def _release(self, rel: str, mine: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.read(rel) == mine:  # removed by hand and taken by another writer: not ours to delete
                self.remove(rel)

    def _remove_under(self, rel: str, last: str | None) -> None:
        try:
            paths = self.fs.find(self._path(rel))
        except FileNotFoundError:
            return
        rest = [path for path in paths if path != (last and self._path(last))]
        if rest:
            self.fs.rm(rest)
        if last and self._path(last) in paths:
            self.remove(last)

    def _entries(self, rel: str) -> list[tuple[str, str]]:
        try:
            listed = self.fs.ls(self._path(rel), detail=True)
        except FileNotFoundError:
            return []
        return [(entry["name"].rstrip("/").rsplit("/", 1)[-1], entry["type"]) for entry in listed]

    def _du(self, rel: str) -> int:
        try:
            return int(self.fs.du(self._path(rel)))
        except FileNotFoundError:
            return 0

    def _path(self, rel: str) -> str:
        return f"{self._root}/{rel}" if rel else self._root


def _holder() -> dict:
    """Who holds a lock object: what a person needs to tell whether that process is still running."""
    import getpass
    import secrets
    import socket
    import time

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        user = "?"
    return {"host": socket.gethostname(), "pid": os.getpid(), "user": user,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "id": secrets.token_hex(8)}  # tells this holder's lock from a later one of the same process


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
