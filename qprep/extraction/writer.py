"""The writer: collects tower results per shard and commits each shard once all its entries are in.

A shard's rows are its kept rows (tokens carried over from the committed arrays) plus the freshly
extracted ones, sorted by id. Equal shard keys mean equal arrays, so a shard whose key did not move
(only mtimes changed, or a failed entry failed again) gets a new manifest and keeps its arrays.

Memory. Entries arrive in the order the executor finishes them, and a shard commits only when its
last entry is in: one slow entry keeps its shard open while any number of others finish. So the
writer holds fresh tokens in memory up to `hold_bytes` in all; past that, it moves the tokens of
the open shard holding the most to a scratch file (`Store.scratch`: local, never read by readers)
until it is back within the bound. A commit reads each entry's tokens when it writes them (kept
entries' from the committed arrays, waiting ones from scratch), a chunk at a time
(`Store.commit_shard`). What the driver holds is thus bounded by `hold_bytes` plus one chunk and
one entry, however many entries a run or a shard has; the bytes committed are the same as if
nothing had waited in scratch. Scratch is not a commit: a killed run's is removed by the next one,
which extracts those entries again (their shards were never committed).
"""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path
from typing import Callable

import numpy as np

from qprep.errors import StoreError
from qprep.extraction.plan import ShardPlan, shard_key
from qprep.extraction.rows import Encoded
from qprep.schemas.dtypes import storage_dtype
from qprep.schemas.manifest import ManifestRow
from qprep.store.layout import SPAN, Store, Tokens

HOLD_BYTES = 256 << 20  # fresh tokens kept in memory while their shards wait for other entries


class ShardWriter:
    def __init__(self, store: Store, plans: dict[int, ShardPlan], scratch: Path, hold_bytes: int = HOLD_BYTES):
        self.store = store
        self.plans = plans
        self.waiting = {shard: {video.id for video in plan.extract} for shard, plan in plans.items()}
        self.results: dict[int, list[tuple[ManifestRow, dict[str, Tokens]]]] = {shard: [] for shard in plans}
        self.scratch = scratch
        self.hold_bytes = hold_bytes
        self.held_bytes = 0  # fresh tokens in memory now
        self.held_by_shard: dict[int, int] = {}
        self._committed_arrays: dict[str, object] = {}
        self.bytes_written = 0
        self.shards_written = 0

    def commit_ready(self) -> None:
        """Commit every shard with nothing left to extract (the rewrite-only ones)."""
        for shard in [s for s, ids in self.waiting.items() if not ids]:
            self._commit(shard)

    def add(self, encoded: Encoded) -> ManifestRow:
        """Take one entry's result (a kind of tokens the entry has none of may be left out);
        commits its shard when it was the last one. Returns its row."""
        row = encoded.row
        row.fingerprint = self.store.fingerprint
        tokens = {kind: encoded.tokens.get(kind, self._empty(kind)) for kind in self.store.kinds()}
        self.results[row.shard].append((row, tokens))
        self._held(row.shard, sum(values.nbytes for values in tokens.values()))
        self.waiting[row.shard].discard(row.id)
        if not self.waiting[row.shard]:
            self._commit(row.shard)
        while self.held_bytes > self.hold_bytes:
            self._to_scratch(max(self.held_by_shard, key=self.held_by_shard.__getitem__))
        return row

    @property
    def held_entries(self) -> int:
        """Fresh entries with tokens in memory now."""
        return sum(any(isinstance(values, np.ndarray) and values.size for values in tokens.values())
                   for members in self.results.values() for _, tokens in members)

    @property
    def pending_shards(self) -> list[int]:
        return sorted(self.waiting)

    def _held(self, shard: int, nbytes: int) -> None:
        self.held_bytes += nbytes
        self.held_by_shard[shard] = self.held_by_shard.get(shard, 0) + nbytes
        if not self.held_by_shard[shard]:
            del self.held_by_shard[shard]

    def _to_scratch(self, shard: int) -> None:
        """Move an open shard's fresh tokens from memory to its scratch files."""
        try:
            for _, tokens in self.results[shard]:
                for kind, values in tokens.items():
                    if isinstance(values, np.ndarray) and values.size:
                        tokens[kind] = _Scratched.write(self.scratch / f"{shard:05d}.{kind}", values)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise StoreError(f"{self.scratch}: no space left on device for the tokens waiting for shard {shard}'s "
                             "commit. The shards committed so far are intact; free some space and run the same "
                             "command again: it goes on from there.") from exc
        self._held(shard, -self.held_by_shard.get(shard, 0))

    def _commit(self, shard: int) -> None:
        plan = self.plans[shard]
        members = [(dataclasses.replace(row), None) for row in plan.keep] + self.results.pop(shard)
        del self.waiting[shard]
        self._held(shard, -self.held_by_shard.get(shard, 0))
        try:
            self._write(shard, plan, members)
        finally:
            self._committed_arrays.clear()
            for path in self.scratch.glob(f"{shard:05d}.*"):
                path.unlink()

    def _write(self, shard: int, plan: ShardPlan, members: list[tuple[ManifestRow, dict | None]]) -> None:
        if not members:
            self.store.remove_shard(shard)
            return
        members.sort(key=lambda member: member[0].id)
        rows = [row for row, _ in members]
        key = shard_key(self.store.fingerprint, rows)
        if key == plan.committed_key:  # same members, same bytes, same status: the arrays stand
            self.bytes_written += self.store.rewrite_manifest(shard, rows)
        else:
            tokens = {kind: [self._tokens(row, fresh, kind, plan) for row, fresh in members]
                      for kind in self.store.kinds()}
            self.bytes_written += self.store.commit_shard(shard, key, rows, tokens)
        self.shards_written += 1

    def _tokens(self, row: ManifestRow, fresh: dict | None, kind: str, plan: ShardPlan) -> Tokens:
        if fresh is not None:
            return fresh[kind]
        start, length = row.span(SPAN[kind])
        if not row.ok or not length:
            return self._empty(kind)
        return _Committed(lambda: self._committed_array(plan, kind), self.store.row_shape(kind), start, length)

    def _committed_array(self, plan: ShardPlan, kind: str):
        """The committed array of `kind` of the shard being written, opened once per commit."""
        if kind not in self._committed_arrays:
            self._committed_arrays[kind] = self.store.array(plan.shard, plan.committed_key, kind)
        return self._committed_arrays[kind]

    def _empty(self, kind: str) -> np.ndarray:
        return np.zeros((0, *self.store.row_shape(kind)), storage_dtype(self.store.attrs["dtype"]))


@dataclasses.dataclass(frozen=True)
class _Committed:
    """A kept entry's rows of one kind in its shard's committed array, read when the commit writes them."""

    array: Callable[[], object]  # opens the committed array
    row_shape: tuple[int, ...]
    start: int
    length: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.length, *self.row_shape)

    def read(self) -> np.ndarray:
        return self.array()[self.start:self.start + self.length]


@dataclasses.dataclass(frozen=True)
class _Scratched:
    """An entry's fresh tokens of one kind waiting in a scratch file (raw rows, appended)."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def write(cls, path: Path, values: np.ndarray) -> _Scratched:
        with open(path, "ab") as sink:
            offset = sink.tell()
            np.ascontiguousarray(values).tofile(sink)
        return cls(path, offset, values.shape, values.dtype)

    def read(self) -> np.ndarray:
        count = int(np.prod(self.shape))
        return np.fromfile(self.path, self.dtype, count=count, offset=self.offset).reshape(self.shape)
