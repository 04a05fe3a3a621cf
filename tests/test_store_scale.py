"""A store at scale: the writer's memory is bounded however many entries a shard or a run has, a
new store's shard count follows its planned entries, and a changed entry rewrites one shard.

Runs in process (no Ray) on a few hundred tiny images through the tiny Qwen2.5-VL checkpoint.
"""

from __future__ import annotations

import pytest

from conftest import LOCAL_EXTRACT, make_image
from qprep.extraction import writer as writer_module
from qprep.extraction.run import ExtractOptions, extract
from qprep.schemas.settings import VideoSettings
from qprep.store import layout
from qprep.store.layout import Store, shard_count_for
from test_extract import shard_files, snapshot

SETTINGS = VideoSettings(kinds=("video", "image"))
IMAGES = 240


def make_images(folder, count, start=0):
    for index in range(start, start + count):
        # 28 to 84 pixels a side: 1 to 9 merged tokens, so entries differ in size
        make_image(folder / f"{index // 50:02d}" / f"img{index:04d}.png", 28 + 28 * (index % 3),
                   28 + 28 * (index % 3), seed=index)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("scale-images"), IMAGES)


def watched_run(folder, store, model_dir, monkeypatch, **options) -> tuple[list[tuple[int, int]], int]:
    """Extract into `store`, recording the writer's (entries, bytes) of fresh tokens in memory after
    each entry it takes, and how many times it moved a shard's tokens to scratch."""
    held, moved = [], [0]
    add, to_scratch = writer_module.ShardWriter.add, writer_module.ShardWriter._to_scratch

    def watched_add(self, encoded):
        row = add(self, encoded)
        held.append((self.held_entries, self.held_bytes))
        return row

    def counted(self, shard):
        moved[0] += 1
        return to_scratch(self, shard)

    monkeypatch.setattr(writer_module.ShardWriter, "add", watched_add)
    monkeypatch.setattr(writer_module.ShardWriter, "_to_scratch", counted)
    summary = extract(folder, store, model_dir, SETTINGS, dtype="float32", shards=2,
                      options=ExtractOptions(**LOCAL_EXTRACT, **options))
    assert (summary.extracted, summary.failed) == (IMAGES, 0)
    return held, moved[0]


def test_the_writer_holds_at_most_its_bound_of_tokens_and_commits_the_same_bytes(images, tiny_model, tmp_path,
                                                                                  monkeypatch):
    model_dir = tiny_model("qwen2_5_vl")
    unbounded, moved = watched_run(images, tmp_path / "unbounded.zarr", model_dir, monkeypatch)
    # Two shards of ~120 images each: without a bound the writer holds a whole shard until it commits.
    assert moved == 0 and max(entries for entries, _ in unbounded) > 60
    hidden = Store.open(tmp_path / "unbounded.zarr").hidden_size
    smallest = hidden * 4  # one merged token in float32
    bound = 4 * smallest
    bounded, moved = watched_run(images, tmp_path / "bounded.zarr", model_dir, monkeypatch, hold_bytes=bound)
    assert moved > 0
    assert max(held_bytes for _, held_bytes in bounded) <= bound
    assert max(entries for entries, _ in bounded) <= 4  # the bound in entries: each holds a token at least
    assert snapshot(tmp_path / "bounded.zarr") == snapshot(tmp_path / "unbounded.zarr")
    assert not (tmp_path / "bounded.zarr" / ".qprep" / layout.SCRATCH).exists()


def test_a_new_stores_shard_count_follows_its_planned_entries_and_a_changed_image_rewrites_one_shard(
        tiny_model, tmp_path, monkeypatch):
    assert shard_count_for(0) == shard_count_for(256 * 256) == 256  # the count qprep's stores have always had
    assert shard_count_for(256 * 256 + 1) == 257 and shard_count_for(3_000_000) == 11_719
    monkeypatch.setattr(layout, "ENTRIES_PER_SHARD", 8)
    monkeypatch.setattr(layout, "MIN_SHARDS", 2)
    model_dir = tiny_model("qwen2_5_vl")
    folder, store = make_images(tmp_path / "media", 40), tmp_path / "store.zarr"
    options = ExtractOptions(**LOCAL_EXTRACT)
    extract(folder, store, model_dir, SETTINGS, dtype="float32", options=options)
    assert Store.open(store).shard_count == 5
    make_images(folder, 10, start=40)  # a later run plans 50: the store keeps the count it records
    again = extract(folder, store, model_dir, SETTINGS, dtype="float32", options=options)
    assert (again.up_to_date, again.extracted) == (40, 10) and Store.open(store).shard_count == 5

    before = snapshot(store)
    changed = make_image(folder / "00" / "img0007.png", 56, 28, seed=999)
    shard = next(row["shard"] for row in _rows(store) if row["path"] == str(changed.relative_to(folder)))
    third = extract(folder, store, model_dir, SETTINGS, dtype="float32", options=options)
    assert (third.extracted, third.shards_written) == (1, 1)
    after = snapshot(store)
    changed_files = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert changed_files and changed_files <= set(shard_files(before, shard)) | set(shard_files(after, shard))
    assert third.bytes_written <= sum((store / name).stat().st_size for name in shard_files(after, shard))


def test_a_killed_runs_scratch_is_emptied_by_the_next_and_removed_after_it(tmp_path):
    store = Store.create(tmp_path / "store.zarr", config={}, fingerprint="f", model="m", hidden_size=4,
                         dtype="float32", shard_count=1, has_audio=False)
    left = tmp_path / "store.zarr" / ".qprep" / layout.SCRATCH / "00000.video"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"\0" * 64)  # what a run killed before its shard committed leaves
    with store.scratch() as scratch:
        assert scratch == left.parent and not any(scratch.iterdir())
    assert not left.parent.exists()


def _rows(store) -> list[dict]:
    return Store.open(store).manifest().to_pylist()
