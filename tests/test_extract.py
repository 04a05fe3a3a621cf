"""`qprep extract` end to end: fidelity of the cached tokens, re-runs, crashes, bad videos.

The tests whose subject is not Ray run the in-process executor (`LOCAL`), which writes the same
bytes as Ray (tests/test_executors.py); re-runs and kills run on the session's Ray.

Tower references are transformers' full models (`from_pretrained`) on transformers' processors'
output for the same frames (tests/reference.py); the store is read back through `open_cache` and
the manifest through pyarrow alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoProcessor, WhisperFeatureExtractor

from qprep import open_cache
from qprep.cli import main
from qprep.errors import StoreError
from qprep.extraction.run import ExtractOptions, extract
from qprep.schemas.settings import VideoSettings
from qprep.synth import VideoSpec, make_video
from reference import full_model, plain_audio_decode, reference_pixels

QUIET = ExtractOptions(progress=False)
LOCAL = ExtractOptions(progress=False, executor="local")
FOLDER = {
    "talk/a.mp4": dict(width=160, height=120, fps=25, seconds=3, events=((0.5, 1.0),)),
    "talk/b.mp4": dict(width=96, height=64, fps=30, seconds=2, bframes=2),
    "c.mp4": dict(width=200, height=100, fps=24, seconds=3, rotation=90),
    "d.mkv": dict(width=128, height=96, fps=25, seconds=2, codec="libvpx-vp9"),
    "silent.mp4": dict(width=112, height=112, fps=30, seconds=2, audio=False),
}


def make_folder(root: Path, clips: dict = FOLDER) -> Path:
    for name, spec in clips.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        make_video(root / name, VideoSpec(**spec))
    return root


def reference_run(root: Path, clips: dict, model_dir: str, *, shards: int, options) -> tuple[Path, Path]:
    """(videos, store): `clips` made under root/videos and extracted without interruption into
    root/reference.zarr, the store that interrupted runs are compared with."""
    videos = make_folder(root / "videos", clips)
    reference = root / "reference.zarr"
    extract(videos, reference, model_dir, VideoSettings(fps=2), shards=shards, options=options)
    return videos, reference


def snapshot(store: Path) -> dict[str, str]:
    """sha256 of every data and manifest file of a store, by relative path."""
    out = {}
    for sub in ("shards", "manifest"):
        for path in sorted((store / sub).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(store))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def shard_files(snap: dict[str, str], shard: int) -> dict[str, str]:
    name = f"{shard:05d}"
    return {k: v for k, v in snap.items() if k.startswith((f"shards/{name}/", f"manifest/{name}."))}


def other_files(snap: dict[str, str], shard: int) -> dict[str, str]:
    mine = shard_files(snap, shard)
    return {k: v for k, v in snap.items() if k not in mine}


def test_cached_tokens_equal_the_full_model_on_the_processors_output(tiny_model, tmp_path):
    model_dir = tiny_model("qwen2_5_omni")
    folder = make_folder(tmp_path / "videos")
    (folder / "broken.mp4").write_bytes(os.urandom(4096))
    summary = extract(folder, tmp_path / "store.zarr", str(model_dir), VideoSettings(fps=2), dtype="float32",
                      shards=3, options=LOCAL)
    assert (summary.extracted, summary.failed, summary.videos) == (5, 1, 6)

    cache = open_cache(tmp_path / "store.zarr")
    assert cache.ids() == ["c", "d", "silent", "talk/a", "talk/b"]
    broken = cache.row("broken")
    assert broken.status == "failed" and broken.error_code == "unreadable" and "FFmpeg" in broken.error

    thinker = full_model(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    extractor = WhisperFeatureExtractor.from_pretrained(model_dir)
    for video_id in cache.ids():
        cached = cache[video_id]
        path = folder / cached.row.path
        pixels = reference_pixels(path, cached.row.frame_indices, processor)
        assert list(pixels["video_grid_thw"][0]) == list(cached.grid_thw)
        with torch.inference_mode():
            expected = thinker.get_video_features(pixels["pixel_values_videos"], pixels["video_grid_thw"])
        assert cached.video_tokens.dtype == torch.float32
        assert torch.equal(cached.video_tokens, expected.pooler_output[0]), video_id
        if video_id == "silent":
            assert cached.audio_tokens is None and cached.row.audio_note == "no audio stream"
            continue
        features = extractor([plain_audio_decode(path)], sampling_rate=16000, return_attention_mask=True,
                             padding="max_length", return_tensors="pt")
        with torch.inference_mode():
            expected_audio = thinker.get_audio_features(features["input_features"], features["attention_mask"])
        assert torch.equal(cached.audio_tokens, expected_audio.last_hidden_state), video_id
        assert cached.mel_length == int(features["attention_mask"].sum())

    # The manifest is plain Parquet and the tokens plain Zarr: readable without qprep.
    import zarr

    table = pq.read_table(tmp_path / "store.zarr" / "manifest")
    row = table.filter(pc.equal(table.column("id"), "talk/a")).to_pylist()[0]
    array = zarr.open_array(str(tmp_path / "store.zarr" / "shards" / f"{row['shard']:05d}" / row["shard_key"][:16]
                                / "video"), mode="r")
    assert torch.equal(torch.from_numpy(array[row["video_offset"]:row["video_offset"] + row["video_length"]]),
                       cache.video_tokens("talk/a"))


@pytest.mark.slow
def test_reruns_touch_only_what_changed(ray_cluster, tiny_model, tmp_path):
    model_dir = str(tiny_model("qwen2_5_omni"))
    folder = make_folder(tmp_path / "videos")
    store = tmp_path / "store.zarr"

    def run():
        return extract(folder, store, model_dir, VideoSettings(fps=2), shards=4, options=QUIET)

    first = run()
    assert first.extracted == 5 and first.ray_started
    before = snapshot(store)

    # unchanged: nothing decoded, Ray not even started, not a byte rewritten
    noop = run()
    assert (noop.extracted, noop.up_to_date, noop.ray_started, noop.shards_written) == (0, 5, False, 0)
    assert snapshot(store) == before

    # touched: re-hashed, not re-extracted; only the manifest learns the new mtime
    os.utime(folder / "c.mp4")
    touched = run()
    assert (touched.extracted, touched.touched, touched.ray_started) == (0, 1, False)
    shard_c = open_cache(store).row("c").shard
    after = snapshot(store)
    assert {k for k in before if before[k] != after.get(k)} == {f"manifest/{shard_c:05d}.parquet"}
    assert open_cache(store).row("c").mtime_ns == (folder / "c.mp4").stat().st_mtime_ns
    before = after

    # one video changed: exactly its shard re-written, every other file byte-identical
    make_video(folder / "talk/b.mp4", VideoSpec(width=96, height=64, fps=30, seconds=3, bframes=2))
    changed = run()
    assert (changed.extracted, changed.shards_written) == (1, 1)
    shard_b = open_cache(store).row("talk/b").shard
    after = snapshot(store)
    assert other_files(after, shard_b) == other_files(before, shard_b)
    assert shard_files(after, shard_b) != shard_files(before, shard_b)
    before = after

    # one added: one shard
    make_video(folder / "new/e.mp4", VideoSpec(width=64, height=64, fps=25, seconds=2))
    added = run()
    assert (added.extracted, added.shards_written) == (1, 1)
    shard_e = open_cache(store).row("new/e").shard
    after = snapshot(store)
    assert other_files(after, shard_e) == other_files(before, shard_e)
    before = after

    # one deleted: its row gone, no tower work, the others untouched
    (folder / "d.mkv").unlink()
    shard_d = open_cache(store).row("d").shard
    removed = run()
    assert (removed.removed, removed.extracted, removed.ray_started) == (1, 0, False)
    cache = open_cache(store)
    assert "d" not in cache and len(cache) == 5
    assert other_files(snapshot(store), shard_d) == other_files(before, shard_d)


def test_a_store_refuses_other_settings_unless_rebuilt(tiny_model, tmp_path):
    model_dir = str(tiny_model("qwen2_5_vl"))
    folder = make_folder(tmp_path / "videos", {"x.mp4": FOLDER["talk/b.mp4"]})
    store = tmp_path / "store.zarr"
    extract(folder, store, model_dir, VideoSettings(num_frames=4), dtype="bfloat16", shards=2, options=LOCAL)
    with pytest.raises(StoreError, match=r"settings\.num_frames: 4 → 6"):
        extract(folder, store, model_dir, VideoSettings(num_frames=6), options=LOCAL)
    with pytest.raises(StoreError, match="dtype"):
        extract(folder, store, model_dir, VideoSettings(num_frames=4), dtype="float32", options=LOCAL)
    with pytest.raises(StoreError, match="model.family"):
        extract(folder, store, str(tiny_model("qwen2_5_omni")), VideoSettings(num_frames=4), options=LOCAL)
    rebuilt = extract(folder, store, model_dir, VideoSettings(num_frames=6), rebuild=True, options=LOCAL)
    assert rebuilt.extracted == 1
    cache = open_cache(store)
    assert cache.row("x").grid_thw[0] == 3 and cache.dtype == torch.float32  # auto: the checkpoint's dtype


def test_vl_store_holds_bf16_tokens_equal_to_the_bf16_model(tiny_model, tmp_path):
    model_dir = tiny_model("qwen2_5_vl")
    folder = make_folder(tmp_path / "videos", {k: FOLDER[k] for k in ("talk/a.mp4", "c.mp4")})
    extract(folder, tmp_path / "store.zarr", str(model_dir), VideoSettings(fps=2), dtype="bfloat16", shards=2,
            options=LOCAL)
    cache = open_cache(tmp_path / "store.zarr")
    model = full_model(model_dir, torch.bfloat16).model
    processor = AutoProcessor.from_pretrained(model_dir)
    for video_id in cache.ids():
        cached = cache[video_id]
        assert cached.audio_tokens is None and cached.row.audio_note == "audio disabled"
        pixels = reference_pixels(folder / cached.row.path, cached.row.frame_indices, processor)
        with torch.inference_mode():
            expected = model.get_video_features(pixels["pixel_values_videos"], pixels["video_grid_thw"])
        assert cached.video_tokens.dtype == torch.bfloat16
        assert torch.equal(cached.video_tokens, expected.pooler_output[0]), video_id


CRASH_FOLDER = {f"clip{i:02d}.mp4": dict(width=128, height=96, fps=25, seconds=2, gop_seconds=1) for i in range(10)}


@pytest.mark.slow
def test_a_killed_run_leaves_no_half_shard_and_the_next_run_finishes(ray_cluster, tiny_model, tmp_path):
    model_dir = str(tiny_model("qwen2_5_omni"))
    folder = make_folder(tmp_path / "videos", CRASH_FOLDER)
    settings = VideoSettings(fps=4)
    reference = tmp_path / "uninterrupted.zarr"
    extract(folder, reference, model_dir, settings, shards=10, options=QUIET)

    store = tmp_path / "killed.zarr"
    command = [sys.executable, "-m", "qprep.cli", "extract", "--videos", str(folder), "--out", str(store),
               "--model", model_dir, "--fps", "4", "--shards", "10", "--batch-size", "1", "--quiet"]
    env = dict(os.environ, RAY_ADDRESS="")  # its own Ray, killed with it
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    committed = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        committed = list((store / "manifest").glob("*.parquet")) if (store / "manifest").is_dir() else []
        if committed:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the driver, its Ray and its workers: a crash, mid-run
    process.wait()
    assert committed, "the run never committed a shard"
    survivors = open_cache(store)
    assert 0 < len(survivors) < len(CRASH_FOLDER), "the kill must land mid-run"
    for video_id in survivors.ids():  # what is visible is complete
        assert survivors.video_tokens(video_id).shape[0] == survivors.row(video_id).video_length

    resumed = extract(folder, store, model_dir, settings, options=QUIET)
    assert resumed.extracted == len(CRASH_FOLDER) - len(survivors)
    assert snapshot(store) == snapshot(reference)


def test_cli_extract_and_status(tiny_model, tmp_path):
    folder = make_folder(tmp_path / "videos", {"x.mp4": FOLDER["talk/b.mp4"]})
    (folder / "empty.mp4").write_bytes(b"")
    store = tmp_path / "store.zarr"
    runner = CliRunner()
    args = ["extract", "--videos", str(folder), "--out", str(store), "--model", str(tiny_model("qwen2_5_omni")),
            "--num-frames", "4", "--executor", "local", "--quiet"]
    result = runner.invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["extracted"], summary["failed"]) == (1, 1)

    result = runner.invoke(main, ["status", str(store), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["videos"] == {"ok": 1, "failed": 1, "pending": 1, "gone": 0}  # the failed one is retried
    assert report["failures"][0]["code"] == "empty_file"
    assert report["tokens"]["video"] == open_cache(store).row("x").video_length

    result = runner.invoke(main, ["status", str(store)])
    assert "1 ok, 1 failed" in result.output and "empty.mp4" in result.output

    result = runner.invoke(main, args[:-5] + ["--num-frames", "8", "--quiet"])
    assert result.exit_code == 3 and "refusing to mix" in result.output

    result = runner.invoke(main, ["extract", "--videos", str(folder), "--out", str(tmp_path / "s2")])
    assert result.exit_code == 2 and "--model is required" in result.output


def test_an_existing_folder_that_is_not_a_store_is_never_overwritten(tiny_model, tmp_path):
    folder = make_folder(tmp_path / "videos", {"x.mp4": FOLDER["talk/b.mp4"]})
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("months of work")
    with pytest.raises(StoreError, match="neither empty nor a qprep store"):
        extract(folder, precious, str(tiny_model("qwen2_5_vl")), VideoSettings(num_frames=4), options=QUIET)
    with pytest.raises(StoreError, match="neither empty nor a qprep store"):
        extract(folder, precious, str(tiny_model("qwen2_5_vl")), VideoSettings(num_frames=4), rebuild=True,
                options=QUIET)
    assert (precious / "chapter1.tex").read_text() == "months of work"


def test_an_up_to_date_store_is_checked_without_torch_ray_or_transformers(tiny_model, tmp_path):
    """The no-op path must stay light: a researcher re-runs this on 10,000 videos."""
    model_dir = str(tiny_model("qwen2_5_vl"))
    folder = make_folder(tmp_path / "videos", {"x.mp4": FOLDER["talk/b.mp4"]})
    store = tmp_path / "store.zarr"
    extract(folder, store, model_dir, VideoSettings(num_frames=4), shards=2, options=LOCAL)
    probe = (
        "import sys, json; from qprep.extraction.run import extract; from qprep.schemas.settings import VideoSettings;"
        f"s = extract({str(folder)!r}, {str(store)!r}, {model_dir!r}, VideoSettings(num_frames=4));"
        "print(json.dumps([s.extracted, s.up_to_date, s.ray_started,"
        " sorted(m for m in ('torch', 'ray', 'transformers', 'av', 's3fs') if m in sys.modules)]))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [0, 1, False, []]


def test_rebuild_refuses_a_store_another_process_is_writing(tiny_model, tmp_path):
    """--rebuild deletes the store, so it must take the writer's lock first."""
    from qprep.store.layout import Store

    store = Store.create(tmp_path / "busy.zarr", config={}, fingerprint="f", model="m", hidden_size=4,
                         dtype="float32", shard_count=1, has_audio=False)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from qprep.store.layout import Store\n"
        f"with Store.open({str(store.root)!r}).lock():\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match="another qprep extract is writing"):
            Store.remove(store.root)
        assert (store.root / "zarr.json").is_file()
    finally:
        writer.kill()
        writer.wait()
    Store.remove(store.root)  # the holder died: the kernel released its lock
    assert not store.root.exists()
