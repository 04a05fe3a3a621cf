"""The writer: collects tower results per shard and commits each shard once all its videos are in.

A shard's rows are its kept rows (tokens carried over from the committed arrays) plus the freshly
extracted ones, sorted by id. Equal shard keys mean equal arrays, so a shard whose key did not move
(only mtimes changed, or a failed video failed again) gets a new manifest and keeps its arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qprep.extraction.plan import ShardPlan, shard_key
from qprep.extraction.rows import Encoded
from qprep.schemas.dtypes import storage_dtype
from qprep.schemas.manifest import ManifestRow
from qprep.store.layout import SPAN, Store


class ShardWriter:
    def __init__(self, store: Store, plans: dict[int, ShardPlan]):
        self.store = store
        self.plans = plans
        self.waiting = {shard: {video.id for video in plan.extract} for shard, plan in plans.items()}
        self.results: dict[int, list[tuple[ManifestRow, dict[str, np.ndarray]]]] = {shard: [] for shard in plans}
        self.bytes_written = 0
        self.shards_written = 0

    def commit_ready(self) -> None:
        """Commit every shard with nothing left to extract (the rewrite-only ones)."""
        for shard in [s for s, ids in self.waiting.items() if not ids]:
            self._commit(shard)

    def add(self, encoded: Encoded) -> ManifestRow:
        """Take one video's result (a kind of tokens the video has none of may be left out);
        commits its shard when it was the last one. Returns its row."""
        row = encoded.row
        row.fingerprint = self.store.fingerprint
        self.results[row.shard].append((row, {kind: encoded.tokens.get(kind, self._empty(kind))
                                              for kind in self.store.kinds()}))
        self.waiting[row.shard].discard(row.id)
        if not self.waiting[row.shard]:
            self._commit(row.shard)
        return row

    @property
    def pending_shards(self) -> list[int]:
        return sorted(self.waiting)

    def _commit(self, shard: int) -> None:
        plan = self.plans[shard]
        members = [(dataclasses.replace(row), None) for row in plan.keep] + self.results.pop(shard)
        del self.waiting[shard]
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

    def _tokens(self, row: ManifestRow, fresh: dict | None, kind: str, plan: ShardPlan) -> np.ndarray:
        if fresh is not None:
            return fresh[kind]
        start, length = row.span(SPAN[kind])
        if not row.ok or not length:
            return self._empty(kind)
        return self.store.array(plan.shard, plan.committed_key, kind)[start:start + length]

    def _empty(self, kind: str) -> np.ndarray:
        return np.zeros((0, *self.store.row_shape(kind)), storage_dtype(self.store.attrs["dtype"]))
