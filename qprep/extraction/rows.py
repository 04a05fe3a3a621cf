"""The rows that travel between the stages of an extraction, and their Ray form.

* `Prepared` (CPU stage → towers): the video, its manifest row so far (status, cause, time and
  geometry facts) and its model inputs, uint8 patches and compact float32 mel frames (never
  normalized floats: 4× smaller).
* `Encoded` (towers → writer): the manifest row and the tower outputs by kind (video, audio,
  deepstack), in the storage dtype.

Ray Data moves rows as columns of plain values, so each has `to_ray` / `from_ray`: the manifest
row and the video as JSON (exact for floats: Python writes the shortest repr that reads back the
same double), the arrays as they are. The in-process executor passes the objects themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from qprep.extraction.discover import VideoFile
from qprep.schemas.manifest import ManifestRow, new_row
from qprep.store.layout import KINDS


@dataclass
class Prepared:
    video: VideoFile
    row: ManifestRow
    patches: np.ndarray  # [patches, patch_dim] uint8
    grid: tuple[int, int, int]  # (t, h, w) in patches
    mel: np.ndarray  # [mel bins, frames] float32; no frames without audio
    mel_chunks: tuple[int, ...] = ()  # valid mel frames of each 300 s feature-extractor chunk; () without audio

    @classmethod
    def empty(cls, video: VideoFile, patch_dim: int = 0, mel_bins: int = 0) -> Prepared:
        """A video with no inputs yet (or none ever: a failed one)."""
        return cls(video, new_row(video), np.zeros((0, patch_dim), np.uint8), (0, 0, 0),
                   np.zeros((mel_bins, 0), np.float32))

    @property
    def ok(self) -> bool:
        return self.row.ok

    def to_ray(self) -> dict:
        return {"video": _video_json(self.video), "row": json.dumps(self.row.to_dict()), "patches": self.patches,
                "grid": np.asarray(self.grid, np.int64), "mel": self.mel, "mel_chunks": np.asarray(self.mel_chunks, np.int64)}

    @classmethod
    def from_ray(cls, values: dict) -> Prepared:
        return cls(VideoFile(**json.loads(values["video"])), ManifestRow.from_dict(json.loads(values["row"])),
                   np.asarray(values["patches"]), tuple(int(v) for v in values["grid"]), np.asarray(values["mel"]),
                   tuple(int(v) for v in values["mel_chunks"]))


@dataclass
class Encoded:
    row: ManifestRow
    tokens: dict[str, np.ndarray] = field(default_factory=dict)  # by kind; a kind the video has none of may be absent

    def to_ray(self) -> dict:
        return {"row": json.dumps(self.row.to_dict()), **self.tokens}

    @classmethod
    def from_ray(cls, values: dict) -> Encoded:
        return cls(ManifestRow.from_dict(json.loads(values["row"])),
                   {kind: np.asarray(values[kind]) for kind in KINDS if kind in values})


def video_item(video: VideoFile) -> dict:
    """A video as the CPU stage's input row."""
    return {"video": _video_json(video)}


def video_of(item: dict) -> VideoFile:
    return VideoFile(**json.loads(item["video"]))


def batch_rows(batch: dict[str, np.ndarray]) -> list[dict]:
    """A Ray Data batch (columns) as its rows."""
    names = list(batch)
    return [{name: batch[name][i] for name in names} for i in range(len(batch[names[0]]))]


def batch_columns(rows: list[dict]) -> dict[str, list]:
    """Rows as a Ray Data batch (columns)."""
    names = list(rows[0]) if rows else []
    return {name: [row[name] for row in rows] for name in names}


def _video_json(video: VideoFile) -> str:
    return json.dumps(video.__dict__)
