"""The manifest: one Parquet row per entry (a video, a window of one, an image, an audio file), the
contract between the extractor and any reader.

Everything a trainer needs besides the tokens lives here: where the video's tokens are (shard, key,
row offsets and lengths), its time facts (sampled frame times, `second_per_grid`, fps) and its
geometry (`grid_thw`), plus what re-runs compare (size, mtime, content hash, fingerprint).

This module is the only one that names the columns: `ManifestRow` is a row, its fields are the
columns (in their Parquet order), and the table-wide questions readers ask (ids, counts, token
totals, shard keys) are answered by the functions at the bottom, so no reader spells a column.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from qprep.schemas.metadata import VideoMetadata

OK = "ok"
FAILED = "failed"
SPANS = ("video", "audio")  # the row ranges a row points at; deepstack levels share the video's


def _column(arrow_type: pa.DataType, *, nullable: bool = True, default=None):
    return dataclasses.field(default=default, metadata={"arrow": arrow_type, "nullable": nullable})


@dataclass(kw_only=True)
class ManifestRow:
    # identity and change detection
    id: str = _column(pa.string(), nullable=False)  # relative path without its extension (+ "#t=s,e": a window)
    path: str = _column(pa.string(), nullable=False)  # the file's, relative to the media folder, '/'-separated
    kind: str = _column(pa.string(), nullable=False, default="video")  # "video", "image", "audio" (MEDIA_KINDS)
    # the window of the file the entry holds, seconds (qwen-vl-utils' video_start / video_end); a null
    # start: the whole file (every row written before windows existed); a null end: to the file's end
    window_start: float | None = _column(pa.float64())
    window_end: float | None = _column(pa.float64())
    size: int = _column(pa.int64(), nullable=False, default=0)
    mtime_ns: int = _column(pa.int64(), nullable=False, default=0)
    content_hash: str | None = _column(pa.string())  # sha256 of the file's bytes
    shard: int = _column(pa.int32(), nullable=False, default=0)
    shard_key: str = _column(pa.string(), nullable=False, default="")  # hash(fingerprint, members' paths, hashes)
    fingerprint: str = _column(pa.string(), nullable=False, default="")
    status: str = _column(pa.string(), nullable=False, default=OK)  # OK or FAILED
    error: str | None = _column(pa.string())  # the cause, for failed rows
    error_code: str | None = _column(pa.string())  # qprep.errors code, for failed rows
    # the video
    codec: str | None = _column(pa.string())
    width: int | None = _column(pa.int32())  # as displayed (after rotation)
    height: int | None = _column(pa.int32())
    rotation: int | None = _column(pa.int32())
    fps: float | None = _column(pa.float64())  # the stream's average frame rate
    duration: float | None = _column(pa.float64())
    frame_count: int | None = _column(pa.int64())
    # what was sampled and how it maps to time
    frame_indices: list[int] | None = _column(pa.list_(pa.int64()))
    frame_times: list[float] | None = _column(pa.list_(pa.float64()))  # seconds, from the frames' timestamps
    sample_fps: float | None = _column(pa.float64())
    second_per_grid: float | None = _column(pa.float64())
    grid_thw: list[int] | None = _column(pa.list_(pa.int64(), 3))
    resized_height: int | None = _column(pa.int32())
    resized_width: int | None = _column(pa.int32())
    # where the tokens are: rows [offset, offset + length) of the shard's arrays
    video_offset: int | None = _column(pa.int64())
    video_length: int | None = _column(pa.int64())  # = t·h·w / merge²
    audio_offset: int | None = _column(pa.int64())
    audio_length: int | None = _column(pa.int64())  # 0 without audio
    mel_length: int | None = _column(pa.int64())  # valid mel frames (get_rope_index's audio length)
    audio_seconds: float | None = _column(pa.float64())
    audio_windows: int | None = _column(pa.int32())
    audio_note: str | None = _column(pa.string())  # why there is no audio, when there is none
    device: str | None = _column(pa.string())  # where the towers ran
    # their torch threads on a CPU (null on a GPU, and in rows written before it was recorded): the
    # count can move an ulp (`qprep.schemas.towers.TowerThreads`), so `qprep verify` recomputes at it
    tower_threads: int | None = _column(pa.int32())

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def window(self) -> bool:
        """Whether the entry is a window of its file rather than the whole file."""
        return self.window_start is not None

    @property
    def has_audio(self) -> bool:
        return bool(self.audio_length)

    def span(self, span: str) -> tuple[int, int]:
        """(offset, length) of the row's range in the shard's arrays of `span` ("video" or "audio")."""
        return getattr(self, f"{span}_offset") or 0, getattr(self, f"{span}_length") or 0

    def set_span(self, span: str, offset: int, length: int) -> None:
        setattr(self, f"{span}_offset", offset)
        setattr(self, f"{span}_length", length)

    def fail(self, cause: str, code: str) -> ManifestRow:
        """This row as failed with `cause` (`code`: a qprep.errors code)."""
        self.status, self.error, self.error_code = FAILED, cause, code
        return self

    def describe_image(self, image) -> ManifestRow:
        """Record what the CPU stage learned about an image (`qprep.pipeline.image.PreparedImage`)."""
        self.width, self.height = image.width, image.height
        self.resized_width, self.resized_height = image.resized_width, image.resized_height
        self.grid_thw, self.frame_count = [int(v) for v in image.grid_thw], 1
        return self

    def describe_audio(self, seconds: float, windows: int, mel_length: int) -> ManifestRow:
        """Record what the CPU stage learned about an audio file: its length, the feature extractor's
        windows it took and their valid mel frames."""
        self.audio_seconds = self.duration = seconds
        self.audio_windows, self.mel_length = windows, mel_length
        return self

    def describe(self, metadata: VideoMetadata, grid_thw: list[int], mel_length: int) -> ManifestRow:
        """Record what the CPU stage learned about the video."""
        for name in ("codec", "width", "height", "rotation", "duration", "frame_count", "sample_fps",
                     "second_per_grid", "resized_height", "resized_width", "audio_seconds", "audio_windows",
                     "audio_note"):
            setattr(self, name, getattr(metadata, name))
        self.fps = metadata.native_fps
        self.frame_indices, self.frame_times = list(metadata.frame_indices), list(metadata.frame_times)
        self.grid_thw, self.mel_length = [int(v) for v in grid_thw], int(mel_length)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ManifestRow:
        return cls(**values)


class VideoFileLike(Protocol):
    id: str
    path: str
    kind: str
    size: int
    mtime_ns: int
    shard: int
    window_start: float | None
    window_end: float | None


def new_row(video: VideoFileLike, fingerprint: str = "") -> ManifestRow:
    """The row of a media entry (a file, or a window of one) before anything was learned about it."""
    return ManifestRow(id=video.id, path=video.path, kind=video.kind, window_start=video.window_start,
                       window_end=video.window_end, size=video.size, mtime_ns=video.mtime_ns, shard=video.shard,
                       fingerprint=fingerprint)


MANIFEST_SCHEMA = pa.schema([pa.field(f.name, f.metadata["arrow"], nullable=f.metadata["nullable"])
                             for f in dataclasses.fields(ManifestRow)])
COLUMNS = tuple(MANIFEST_SCHEMA.names)


# ---- tables ----------------------------------------------------------------------------------------

def manifest_table(rows: list[ManifestRow]) -> pa.Table:
    """Rows as a table in the manifest schema."""
    return pa.Table.from_pylist([row.to_dict() for row in rows], schema=MANIFEST_SCHEMA)


def conformed(table: pa.Table) -> pa.Table:
    """A table as a shard's file holds it, in the current schema: a column added since that file was
    written takes the value that means what the file meant (`kind`: every such row is a video;
    `window_start`/`window_end`: null, every such row is a whole file)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ManifestRow)}
    columns = [table.column(field.name) if field.name in table.column_names
               else pa.array([defaults[field.name]] * table.num_rows, field.type) for field in MANIFEST_SCHEMA]
    return pa.Table.from_arrays(columns, names=COLUMNS).cast(MANIFEST_SCHEMA)


def count_by_kind(table: pa.Table, status: str = OK) -> dict[str, int]:
    """Rows with `status`, by kind."""
    kinds = table.filter(pc.equal(table.column("status"), status)).column("kind").to_pylist()
    return {kind: kinds.count(kind) for kind in sorted(set(kinds))}


def count_windows(table: pa.Table, status: str = OK) -> int:
    """Rows with `status` that hold a window of their file rather than the whole file."""
    return int(pc.sum(pc.and_(pc.equal(table.column("status"), status),
                              pc.is_valid(table.column("window_start")))).as_py() or 0)


def rows_of(table: pa.Table) -> list[ManifestRow]:
    return [ManifestRow(**values) for values in table.to_pylist()]


def sorted_by_id(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, [("id", "ascending")]))


def ids(table: pa.Table, status: str | None = None) -> list[str]:
    """The table's ids in its order, all of them or those with `status`."""
    if status is not None:
        table = table.filter(pc.equal(table.column("status"), status))
    return table.column("id").to_pylist()


def with_status(table: pa.Table, status: str) -> list[ManifestRow]:
    return rows_of(table.filter(pc.equal(table.column("status"), status)))


def count(table: pa.Table, status: str) -> int:
    return int(pc.sum(pc.equal(table.column("status"), status)).as_py() or 0)


def token_rows(table: pa.Table, span: str) -> int:
    """Rows of the `span` arrays the table's rows point at, over all its rows."""
    return int(pc.sum(table.column(f"{span}_length")).as_py() or 0)


def shard_keys(table: pa.Table) -> dict[int, str]:
    """Each shard's committed key."""
    return dict(zip(table.column("shard").to_pylist(), table.column("shard_key").to_pylist()))
