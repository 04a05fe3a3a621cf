"""The rows that travel: a manifest row survives Parquet, and the stages' rows survive Ray's form,
value for value (floats to the bit), so the two executors hand the writer the same rows."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from qprep.errors import WORKER_DIED
from qprep.extraction.discover import VideoFile
from qprep.extraction.rows import Encoded, Prepared, batch_columns, batch_rows, video_item, video_of
from qprep.schemas import manifest
from qprep.schemas.manifest import FAILED, ManifestRow, manifest_table, new_row, rows_of

VIDEO = VideoFile(id="talk/a", path="talk/a.mp4", size=1234, mtime_ns=1_700_000_000_123_456_789, shard=7)
AWKWARD = [0.1, 1 / 3, 2.0**-40, 29.97002997002997, math.nextafter(1.0, 2.0)]  # floats with long reprs


def a_row() -> ManifestRow:
    row = new_row(VIDEO, fingerprint="f" * 64)
    row.content_hash, row.codec, row.width, row.height, row.rotation = "c" * 64, "h264", 320, 240, 90
    row.fps, row.duration, row.frame_count, row.sample_fps = 30000 / 1001, 3.003, 90, 2.0
    row.frame_indices, row.frame_times, row.second_per_grid = [0, 15, 30, 45, 60], AWKWARD, 1.0
    row.grid_thw, row.resized_height, row.resized_width, row.mel_length = [3, 16, 22], 224, 308, 300
    row.audio_seconds, row.audio_windows, row.audio_note, row.device = 3.0, 1, "", "cpu"
    return row


def test_a_manifest_row_comes_back_from_parquet_as_it_went_in():
    rows = [a_row(), new_row(dataclasses.replace(VIDEO, id="b", path="b.mp4")).fail("broken: moov atom", WORKER_DIED)]
    rows[0].set_span("video", 10, 132)
    rows[0].set_span("audio", 0, 75)
    sink = io.BytesIO()
    pq.write_table(manifest_table(rows), sink)
    back = rows_of(pq.read_table(io.BytesIO(sink.getvalue())))
    assert back == rows
    assert back[0].span("video") == (10, 132) and back[0].has_audio and back[0].ok
    assert back[1].status == FAILED and back[1].span("audio") == (0, 0) and not back[1].has_audio


def test_the_schema_is_the_rows_fields_in_order():
    assert manifest.COLUMNS == tuple(field.name for field in dataclasses.fields(ManifestRow))
    assert manifest.MANIFEST_SCHEMA.field("id").nullable is False
    assert manifest.MANIFEST_SCHEMA.field("grid_thw").type.list_size == 3


def test_table_questions_answered_by_the_manifest_module():
    rows = [a_row(), new_row(dataclasses.replace(VIDEO, id="b", path="b.mp4", shard=2)).fail("x", WORKER_DIED)]
    rows[0].set_span("video", 0, 132)
    table = manifest_table(rows[::-1])
    assert manifest.ids(manifest.sorted_by_id(table)) == ["b", "talk/a"]
    assert manifest.ids(table, FAILED) == ["b"] and manifest.count(table, FAILED) == 1
    assert manifest.token_rows(table, "video") == 132 and manifest.token_rows(table, "audio") == 0
    assert manifest.shard_keys(table) == {2: "", 7: ""}
    assert [row.id for row in manifest.with_status(table, FAILED)] == ["b"]


def test_a_prepared_row_survives_rays_form_bit_for_bit():
    rng = np.random.default_rng(0)
    prepared = Prepared(VIDEO, a_row(), rng.integers(0, 256, (24, 1176), dtype=np.uint8), (3, 4, 2),
                        rng.standard_normal((128, 300)).astype(np.float32), (300,))
    back = Prepared.from_ray(prepared.to_ray())
    assert back.video == VIDEO and back.row == prepared.row and back.grid == (3, 4, 2) and back.mel_chunks == (300,)
    assert [x.hex() for x in back.row.frame_times] == [x.hex() for x in AWKWARD]
    assert np.array_equal(back.patches, prepared.patches) and back.mel.tobytes() == prepared.mel.tobytes()
    assert video_of(video_item(VIDEO)) == VIDEO


def test_an_encoded_row_survives_rays_form_and_a_batch_its_columns():
    tokens = {"video": np.arange(12, dtype=np.uint16).reshape(3, 4), "audio": np.zeros((0, 4), np.uint16)}
    encoded = [Encoded(a_row(), tokens), Encoded(new_row(VIDEO).fail("tower stage: boom", "tower_error"), tokens)]
    rows = batch_rows({name: np.asarray(values, dtype=object) if name == "row" else values
                       for name, values in batch_columns([e.to_ray() for e in encoded]).items()})
    back = [Encoded.from_ray(row) for row in rows]
    assert [e.row for e in back] == [e.row for e in encoded]
    assert all(np.array_equal(b.tokens["video"], tokens["video"]) and b.tokens["video"].dtype == np.uint16
               for b in back)
    assert set(back[0].tokens) == {"video", "audio"}


@pytest.mark.parametrize("cause", ["", "a cause\nwith lines"])
def test_a_failed_row_keeps_what_was_learned_before_it_failed(cause):
    row = a_row().fail(cause, "tower_error")
    assert (row.status, row.error, row.error_code) == (FAILED, cause, "tower_error")
    assert row.grid_thw == [3, 16, 22] and row.content_hash == "c" * 64


def test_a_window_entry_survives_parquet_and_rays_form():
    window = dataclasses.replace(VIDEO, id="talk/a#t=0.1,", window_start=0.1, file="/data/talk/a.mp4")
    rows = [new_row(window), new_row(dataclasses.replace(window, id="talk/a#t=0,2", window_start=0.0, window_end=2.0))]
    assert [(row.window, row.window_start, row.window_end) for row in rows] == [(True, 0.1, None), (True, 0.0, 2.0)]
    assert not new_row(VIDEO).window
    sink = io.BytesIO()
    pq.write_table(manifest_table(rows), sink)
    assert rows_of(pq.read_table(io.BytesIO(sink.getvalue()))) == rows
    assert video_of(video_item(window)) == window
