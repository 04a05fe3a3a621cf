"""The manifest: one Parquet row per video, the contract between the extractor and any reader.

Everything a trainer needs besides the tokens lives here: where the video's tokens are (shard, key,
row offsets and lengths), its time facts (sampled frame times, `second_per_grid`, fps) and its
geometry (`grid_thw`), plus what re-runs compare (size, mtime, content hash, fingerprint).
"""

from __future__ import annotations

import pyarrow as pa

OK = "ok"
FAILED = "failed"

MANIFEST_SCHEMA = pa.schema([
    # identity and change detection
    pa.field("id", pa.string(), nullable=False),  # relative path without its extension
    pa.field("path", pa.string(), nullable=False),  # relative to the videos directory, '/'-separated
    pa.field("size", pa.int64(), nullable=False),
    pa.field("mtime_ns", pa.int64(), nullable=False),
    pa.field("content_hash", pa.string()),  # sha256 of the file's bytes
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("shard_key", pa.string(), nullable=False),  # hash(fingerprint, members' paths and hashes)
    pa.field("fingerprint", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" or "failed"
    pa.field("error", pa.string()),  # the cause, for failed rows
    pa.field("error_code", pa.string()),  # qprep.errors code, for failed rows
    # the video
    pa.field("codec", pa.string()),
    pa.field("width", pa.int32()),  # as displayed (after rotation)
    pa.field("height", pa.int32()),
    pa.field("rotation", pa.int32()),
    pa.field("fps", pa.float64()),  # the stream's average frame rate
    pa.field("duration", pa.float64()),
    pa.field("frame_count", pa.int64()),
    # what was sampled and how it maps to time
    pa.field("frame_indices", pa.list_(pa.int64())),
    pa.field("frame_times", pa.list_(pa.float64())),  # seconds, from the frames' timestamps
    pa.field("sample_fps", pa.float64()),
    pa.field("second_per_grid", pa.float64()),
    pa.field("grid_thw", pa.list_(pa.int64(), 3)),
    pa.field("resized_height", pa.int32()),
    pa.field("resized_width", pa.int32()),
    # where the tokens are: rows [offset, offset + length) of the shard's arrays
    pa.field("video_offset", pa.int64()),
    pa.field("video_length", pa.int64()),  # = t·h·w / merge²
    pa.field("audio_offset", pa.int64()),
    pa.field("audio_length", pa.int64()),  # 0 without audio
    pa.field("mel_length", pa.int64()),  # valid mel frames (get_rope_index's audio length)
    pa.field("audio_seconds", pa.float64()),
    pa.field("audio_windows", pa.int32()),
    pa.field("audio_note", pa.string()),  # why there is no audio, when there is none
    pa.field("device", pa.string()),  # where the towers ran
])

COLUMNS = tuple(MANIFEST_SCHEMA.names)


def manifest_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts keyed by column; missing keys are null) as a table in the manifest schema."""
    return pa.Table.from_pylist([{name: row.get(name) for name in COLUMNS} for row in rows], schema=MANIFEST_SCHEMA)
