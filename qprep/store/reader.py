"""The public reader: `qprep.open_cache(path)`.

It needs nothing but the store: no model, no towers, no video. Tokens come back as torch tensors in
the store's logical dtype (bf16 rebuilt from its stored bits without a copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from qprep.schemas import manifest
from qprep.schemas.dtypes import to_tensor, torch_dtype
from qprep.schemas.manifest import OK, ManifestRow
from qprep.store.layout import SPAN, Store


@dataclass(frozen=True)
class CachedMedium:
    """One medium's cached tower outputs and the facts that place them in time: a video (with its
    audio), or an image (grid (1, h, w), no time)."""

    id: str
    # the merged visual tokens [t·h·w/merge², hidden], an image's too; in a store at the merger-input
    # level, the merger's input [t·h·w/merge², merge², vision width], in the order the merger takes it
    video_tokens: torch.Tensor
    audio_tokens: torch.Tensor | None  # [audio tokens, hidden], None without audio
    grid_thw: tuple[int, int, int]
    second_per_grid: float
    frame_times: tuple[float, ...]
    mel_length: int
    row: ManifestRow
    # [levels, t·h·w/merge², hidden] (merger-input level: [levels, t·h·w/merge², merge², vision width]),
    # towers with deepstack levels
    deepstack: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return self.row.kind



class Cache:
    """A read-only view of a store: the manifest as a pyarrow Table and tokens by video id."""

    def __init__(self, path: str | Path):
        self.store = Store.open(path)
        self.manifest: pa.Table = manifest.sorted_by_id(self.store.manifest())
        self._rows = {video_id: i for i, video_id in enumerate(manifest.ids(self.manifest))}
        self._arrays: dict[tuple[int, str, str], Any] = {}
        self._dtype = torch_dtype(self.store.attrs["dtype"])

    @property
    def config(self) -> dict:
        """The extraction config the store was built with (settings, preprocessor, model, dtype)."""
        return self.store.attrs["config"]

    @property
    def model(self) -> str:
        return self.store.attrs["model"]

    @property
    def hidden_size(self) -> int:
        return self.store.hidden_size

    @property
    def level(self) -> str:
        """"merged" (the merger's output) or "merger-input" (`qprep.schemas.towers`)."""
        return self.store.level

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def content_key(self) -> str:
        """Names what this view holds; any re-extract that changed a video's tokens or status changes it."""
        return _content_key(self.store.fingerprint, self.manifest)

    def changed_on_disk(self) -> bool:
        """Whether the store's committed content is no longer what this view was opened on."""
        return _content_key(self.store.fingerprint, self.store.manifest()) != self.content_key

    def ids(self, status: str | None = OK) -> list[str]:
        """Video ids, sorted; by default only those extracted successfully."""
        return list(self._rows) if status is None else manifest.ids(self.manifest, status)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._rows

    def row(self, video_id: str) -> ManifestRow:
        try:
            index = self._rows[video_id]
        except KeyError:
            raise KeyError(f"{self.store.root}: no video with id {video_id!r}") from None
        return manifest.rows_of(self.manifest.slice(index, 1))[0]

    def __getitem__(self, video_id: str) -> CachedMedium:
        row = self._ok_row(video_id)
        return CachedMedium(
            id=video_id,
            video_tokens=self._tokens(row, "video"),
            audio_tokens=self._tokens(row, "audio") if row.has_audio else None,
            grid_thw=tuple(row.grid_thw),
            second_per_grid=row.second_per_grid,
            frame_times=tuple(row.frame_times or ()),
            mel_length=row.mel_length,
            row=row,
            deepstack=self.deepstack(video_id) if self.store.deepstack_levels else None,
        )

    @property
    def deepstack_levels(self) -> int:
        return self.store.deepstack_levels

    def video_tokens(self, video_id: str) -> torch.Tensor:
        return self._tokens(self._ok_row(video_id), "video")

    def audio_tokens(self, video_id: str) -> torch.Tensor | None:
        row = self._ok_row(video_id)
        return self._tokens(row, "audio") if row.has_audio else None

    def deepstack(self, video_id: str) -> torch.Tensor:
        """[levels, tokens, hidden]: level i is what the language model adds after its layer i."""
        if not self.store.deepstack_levels:
            raise KeyError(f"{self.store.root}: this store holds no deepstack features (its model has none)")
        return self._tokens(self._ok_row(video_id), "deepstack").transpose(0, 1)

    def _ok_row(self, video_id: str) -> ManifestRow:
        row = self.row(video_id)
        if not row.ok:
            raise KeyError(f"{self.store.root}: video {video_id!r} failed extraction: {row.error}")
        return row

    def _tokens(self, row: ManifestRow, kind: str) -> torch.Tensor:
        handle = (row.shard, row.shard_key, kind)
        array = self._arrays.get(handle)
        if array is None:
            array = self._arrays[handle] = self.store.array(*handle)
        start, length = row.span(SPAN[kind])
        values = np.ascontiguousarray(array[start:start + length])
        return to_tensor(values, self._dtype)


def _content_key(fingerprint: str, table: pa.Table) -> str:
    import hashlib

    # a shard's key hashes its members' paths, content hashes and statuses, so the keys name it all
    shards = sorted(manifest.shard_keys(table).items())
    return hashlib.sha256(repr((fingerprint, shards)).encode()).hexdigest()[:16]


def open_cache(path: str | Path) -> Cache:
    """Open a store written by `qprep extract` for reading."""
    return Cache(path)
