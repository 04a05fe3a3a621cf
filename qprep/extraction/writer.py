"""The writer: collects tower results per shard and commits each shard once all its videos are in.

A shard's rows are its kept rows (tokens carried over from the committed arrays) plus the freshly
extracted ones, sorted by id. Equal shard keys mean equal arrays, so a shard whose key did not move
(only mtimes changed, or a failed video failed again) gets a new manifest and keeps its arrays.
"""

from __future__ import annotations

import json

import numpy as np

from qprep.extraction.discover import VideoFile
from qprep.extraction.plan import ShardPlan, shard_key
from qprep.schemas.manifest import FAILED, OK
from qprep.store.layout import SPAN, Store


class ShardWriter:
    def __init__(self, store: Store, plans: dict[int, ShardPlan]):
        self.store = store
        self.plans = plans
        self.waiting = {shard: {video.id for video in plan.extract} for shard, plan in plans.items()}
        self.results: dict[int, list[tuple[dict, dict[str, np.ndarray]]]] = {shard: [] for shard in plans}
        self.bytes_written = 0
        self.shards_written = 0

    def commit_ready(self) -> None:
        """Commit every shard with nothing left to extract (the rewrite-only ones)."""
        for shard in [s for s, ids in self.waiting.items() if not ids]:
            self._commit(shard)

    def add(self, task: dict, meta: dict, tokens: dict[str, np.ndarray]) -> dict:
        """Take one video's result (`tokens` by kind: video, audio, deepstack; a kind the video has
        none of may be left out); commits its shard when it was the last one. Returns its row."""
        row = manifest_row(VideoFile(**task), meta, self.store.fingerprint)
        shard = row["shard"]
        self.results[shard].append((row, {kind: tokens.get(kind, self._empty(kind)) for kind in self.store.kinds()}))
        self.waiting[shard].discard(row["id"])
        if not self.waiting[shard]:
            self._commit(shard)
        return row

    def add_failed(self, video: VideoFile, cause: str, code: str) -> dict:
        """Record a video no result came back for as failed; returns its row."""
        return self.add(dict(video.__dict__), {"status": FAILED, "error": cause, "error_code": code}, {})

    def unfinished(self) -> set[str]:
        """Ids of the videos whose result has not arrived yet."""
        return set().union(*self.waiting.values())

    @property
    def pending_shards(self) -> list[int]:
        return sorted(self.waiting)

    def _commit(self, shard: int) -> None:
        plan = self.plans[shard]
        members = [(dict(row), None) for row in plan.keep] + self.results.pop(shard)
        del self.waiting[shard]
        if not members:
            self.store.remove_shard(shard)
            return
        members.sort(key=lambda member: member[0]["id"])
        rows = [row for row, _ in members]
        key = shard_key(self.store.fingerprint, rows)
        if key == plan.committed_key:  # same members, same bytes, same status: the arrays stand
            self.bytes_written += self.store.rewrite_manifest(shard, rows)
        else:
            tokens = {kind: [self._tokens(row, fresh, kind, plan) for row, fresh in members]
                      for kind in self.store.kinds()}
            self.bytes_written += self.store.commit_shard(shard, key, rows, tokens)
        self.shards_written += 1

    def _tokens(self, row: dict, fresh: dict | None, kind: str, plan: ShardPlan) -> np.ndarray:
        if fresh is not None:
            return fresh[kind]
        length = row.get(f"{SPAN[kind]}_length") or 0
        if row["status"] != OK or not length:
            return self._empty(kind)
        start = row[f"{SPAN[kind]}_offset"]
        return self.store.array(plan.shard, plan.committed_key, kind)[start:start + length]

    def _empty(self, kind: str) -> np.ndarray:
        return np.zeros((0, *self.store.row_shape(kind)), self.store.attrs["storage_dtype"])


def manifest_row(video: VideoFile, meta: dict, fingerprint: str) -> dict:
    """A manifest row from a video file and what the stages learned about it."""
    row = {"id": video.id, "path": video.path, "size": video.size, "mtime_ns": video.mtime_ns, "shard": video.shard,
           "fingerprint": fingerprint, "shard_key": ""}
    fields = ("content_hash", "status", "error", "error_code", "codec", "width", "height", "rotation", "duration",
              "frame_count", "frame_indices", "frame_times", "sample_fps", "second_per_grid", "grid_thw",
              "resized_height", "resized_width", "mel_length", "audio_seconds", "audio_windows", "audio_note",
              "device")
    row.update({name: meta.get(name) for name in fields})
    row["fps"] = meta.get("native_fps")
    return row


def decode_result(result: dict) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """(task, meta, tokens by kind) of a tower-stage row."""
    tokens = {kind: np.asarray(result[kind]) for kind in SPAN if kind in result}
    return json.loads(result["task"]), json.loads(result["meta"]), tokens
