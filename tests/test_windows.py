"""Windows of a video as store entries, and `qprep extract --data`.

A dataset names its media: forty records over one video, two windows of that video (content
blocks' `video_start`/`video_end`), an image, a file that is not there. `extract --data` extracts
each named entry once, lists what it cannot find before any work, and a re-run does nothing. A
window is sampled and time-stamped as the run's settings with its `video_start`/`video_end`
(and so as qwen-vl-utils: tests/test_sampling.py); a changed file re-extracts every entry cut from
it; and training on a window's sample gives the full model's logits and loss on the processor's
inputs for that window's frames.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from click.testing import CliRunner

import qprep
from conftest import LOCAL_EXTRACT, make_image
from qprep import open_cache
from qprep.cli import main
from qprep.datasets import DataFile
from qprep.errors import SettingsError
from qprep.extraction.entries import dataset_entries, no_audio_tower
from qprep.extraction.run import ExtractOptions, extract
from qprep.schemas.settings import VideoSettings
from qprep.synth import VideoSpec, make_video
from test_sampling import reference_plan

WINDOWS = {"cooking/a#t=1,3.5": (1.0, 3.5), "cooking/a#t=2,": (2.0, None)}
IDS = {"cooking/a", *WINDOWS, "photos/cat"}
QUESTION = "what happens?"
ANSWER = "From 0.0 to 1.0, someone cooks."


def block(kind: str, path: str, **window) -> dict:
    return {"type": kind, kind: path, **{f"video_{edge}": at for edge, at in window.items()}}


def record(*blocks, question: str = QUESTION) -> dict:
    return {"messages": [{"role": "user", "content": [*blocks, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": ANSWER}]}


def make_dataset(root: Path) -> Path:
    """media under root/videos (the folder the store's tests look in), the data file beside them."""
    media = root / "videos"
    make_video(media / "cooking" / "a.mp4", VideoSpec(width=112, height=84, fps=25, seconds=6, audio=False))
    make_image(media / "photos" / "cat.jpg", 200, 150, seed=1, quality=90)
    records = [record(block("video", "cooking/a.mp4"), question=f"{QUESTION} ({i})") for i in range(40)]
    records += [record(block("video", "cooking/a.mp4", start=1.0, end=3.5)),  # record 40
                record(block("video", "cooking/a.mp4", start=2.0)),  # record 41: to the end
                record(block("image", "photos/cat.jpg")),  # record 42
                record(block("video", "cooking/gone.mp4")),  # record 43: not there
                record(block("audio", "cooking/a.mp3"))]  # record 44: not there (and no audio tower to hear it)
    (media / "data.json").write_text(json.dumps(records))
    return media / "data.json"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("windows"))


def cli_extract(data: Path, store: Path, model_dir: str, *extra: str):
    return CliRunner().invoke(main, ["extract", "--data", str(data), "--out", str(store), "--model", model_dir,
                                     "--fps", "2", "--dtype", "float32", "--shards", "4", "--executor", "local",
                                     "--quiet", "--json", *extra])


@pytest.fixture(scope="module")
def extracted(dataset, tiny_model):
    """(model dir, store, the first run's CLI result) of a float32 Qwen2.5-VL store."""
    model_dir = str(tiny_model("qwen2_5_vl"))
    store = dataset.parent.parent / "store.zarr"
    return model_dir, store, cli_extract(dataset, store, model_dir)


def test_a_dataset_names_each_medium_once_and_every_entry_of_a_file_shares_its_shard(dataset):
    named = dataset_entries(DataFile(dataset))
    assert named.records == 45
    assert sorted(entry.id for entry in named.entries) == sorted(IDS)
    entries = {entry.id: entry for entry in named.with_shards(256)}
    for entry_id, (start, end) in WINDOWS.items():
        assert (entries[entry_id].window_start, entries[entry_id].window_end) == (start, end)
        assert entries[entry_id].path == "cooking/a.mp4"
    assert entries["cooking/a"].window_start is None and entries["photos/cat"].kind == "image"
    assert len({entries[entry_id].shard for entry_id in ("cooking/a", *WINDOWS)}) == 1
    lines = [missing.line() for missing in named.missing]
    assert lines[0].startswith("record 43: cooking/gone.mp4: not found (looked for ")
    assert str(dataset.parent / "cooking" / "gone.mp4") in lines[0]
    assert lines[1].startswith("record 44: cooking/a.mp3: not found (looked for ")
    refused = dataset_entries(DataFile(dataset), refused={"audio": no_audio_tower("./Qwen2.5-VL")})
    assert [missing.line() for missing in refused.missing][1] == (
        "record 44: cooking/a.mp3: an audio file, and model ./Qwen2.5-VL has no audio tower to encode it")
    from qprep.datasets import load  # the ids training looks up are the entries'
    assert {medium for r in load(DataFile(dataset, check_files=True)) for medium in r["media"]} == IDS


def test_extract_data_extracts_each_entry_once_and_lists_what_is_missing_first(extracted):
    model_dir, store, result = extracted
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["extracted"], summary["failed"], summary["records"]) == (len(IDS), 0, 45)
    assert "not extracted: record 43: cooking/gone.mp4: not found (looked for" in result.stderr
    assert no_audio_tower(model_dir) in result.stderr and "going on without them" in result.stderr
    cache = open_cache(store)
    assert set(cache.ids()) == IDS
    assert cache.row("cooking/a").window_start is None
    assert {(cache.row(i).window_start, cache.row(i).window_end) for i in WINDOWS} == set(WINDOWS.values())
    assert len({cache.row(i).shard for i in ("cooking/a", *WINDOWS)}) == 1
    assert cache["photos/cat"].kind == "image"


def test_a_windows_frames_and_times_are_those_of_video_start_and_video_end(extracted, dataset):
    model_dir, store, _ = extracted
    cache = open_cache(store)
    path = dataset.parent / "cooking" / "a.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total, fps = sum(1 for _ in container.decode(stream)), float(stream.average_rate)
    for entry_id, (start, end) in WINDOWS.items():
        row = cache.row(entry_id)
        prepared = qprep.preprocess_video(path, model_dir, audio=False, fps=2, video_start=start, video_end=end)
        meta = prepared.metadata
        assert row.frame_indices == list(meta.frame_indices) and row.frame_times == list(meta.frame_times)
        assert (row.sample_fps, row.second_per_grid) == (meta.sample_fps, meta.second_per_grid)
        assert row.grid_thw == prepared.video_grid_thw[0].tolist()
        indices, sample_fps = reference_plan(total, fps, {"fps": 2.0, "video_start": start, "video_end": end})
        assert row.frame_indices == indices and row.sample_fps == pytest.approx(sample_fps, rel=1e-12)
        # times are the file's: seconds from its first frame, not from the window's start
        assert row.frame_times == pytest.approx([i / fps for i in indices], abs=1e-9)
        assert row.frame_times[0] >= start and cache.row("cooking/a").frame_indices != indices


def test_an_unchanged_dataset_re_runs_without_torch_or_ray(extracted, dataset):
    model_dir, store, _ = extracted
    again = cli_extract(dataset, store, model_dir)
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert (summary["extracted"], summary["up_to_date"], summary["executor"], summary["shards_written"]) == \
        (0, len(IDS), None, 0)
    probe = (
        "import sys, json; from qprep.extraction.run import extract, ExtractOptions;"
        "from qprep.datasets import DataFile; from qprep.schemas.settings import VideoSettings;"
        f"s = extract(DataFile({str(dataset)!r}), {str(store)!r}, {model_dir!r}, VideoSettings(fps=2),"
        " options=ExtractOptions(progress=False));"
        "print(json.dumps([s.extracted, s.up_to_date, s.ray_started,"
        " sorted(m for m in ('torch', 'ray', 'transformers', 'av') if m in sys.modules)]))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [0, len(IDS), False, []]


def test_strict_stops_before_any_work_and_images_need_a_store_that_takes_them(extracted, dataset, tmp_path):
    model_dir, _, _ = extracted
    result = cli_extract(dataset, tmp_path / "strict.zarr", model_dir, "--strict")
    assert result.exit_code == 3, result.output
    assert "record 43: cooking/gone.mp4: not found" in result.output
    assert not (tmp_path / "strict.zarr" / "manifest").exists()

    videos_only = tmp_path / "videos-only.zarr"
    (tmp_path / "empty").mkdir()  # a --videos store: videos alone
    extract(tmp_path / "empty", videos_only, model_dir, VideoSettings(fps=2), dtype="float32",
            options=ExtractOptions(**LOCAL_EXTRACT))
    result = cli_extract(dataset, videos_only, model_dir)
    assert result.exit_code == 3 and "the dataset names images" in result.output, result.output


def test_a_changed_file_re_extracts_every_entry_cut_from_it_and_a_window_no_longer_named_goes(
        extracted, dataset, tmp_path):
    model_dir, store, _ = extracted
    shutil.copytree(dataset.parent, tmp_path / "videos")
    shutil.copytree(store, tmp_path / "store.zarr")
    data, copy = tmp_path / "videos" / "data.json", tmp_path / "store.zarr"
    before = open_cache(copy)
    make_video(tmp_path / "videos" / "cooking" / "a.mp4",
               VideoSpec(width=112, height=84, fps=25, seconds=5, audio=False, events=((0.5, 1.0),)))
    result = cli_extract(data, copy, model_dir)
    summary = json.loads(result.stdout)
    assert (summary["extracted"], summary["up_to_date"], summary["removed"]) == (3, 1, 0), summary
    after = open_cache(copy)
    for entry_id in ("cooking/a", *WINDOWS):
        assert after.row(entry_id).content_hash != before.row(entry_id).content_hash
        assert after.row(entry_id).size == (tmp_path / "videos" / "cooking" / "a.mp4").stat().st_size
    assert torch.equal(after.video_tokens("photos/cat"), before.video_tokens("photos/cat"))

    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[:41] + records[42:]))  # the open-ended window no longer named
    summary = json.loads(cli_extract(data, copy, model_dir).stdout)
    assert (summary["extracted"], summary["removed"]) == (0, 1)
    assert set(open_cache(copy).ids()) == IDS - {"cooking/a#t=2,"}

    # a --media run of the same folder (one fingerprint) keeps the window a dataset named
    other = make_video(tmp_path / "videos" / "other.mp4", VideoSpec(width=64, height=64, fps=25, seconds=2,
                                                                     audio=False))
    summary = extract(tmp_path / "videos", copy, model_dir, VideoSettings(fps=2, kinds=("video", "image")),
                      dtype="float32", options=ExtractOptions(**LOCAL_EXTRACT))
    assert (summary.extracted, summary.removed, summary.up_to_date) == (1, 0, 3)
    assert "cooking/a#t=1,3.5" in open_cache(copy)
    # a --data run keeps a file no record names while it is unchanged, and never extracts it
    kept = json.loads(cli_extract(data, copy, model_dir).stdout)
    assert (kept["up_to_date"], kept["removed"], kept["extracted"]) == (4, 0, 0), kept
    make_video(other, VideoSpec(width=64, height=64, fps=25, seconds=3, audio=False))
    summary = json.loads(cli_extract(data, copy, model_dir).stdout)
    assert (summary["extracted"], summary["removed"]) == (0, 1) and "other" not in open_cache(copy)
    # a file gone from the folder takes every entry cut from it along
    (tmp_path / "videos" / "cooking" / "a.mp4").unlink()
    summary = extract(tmp_path / "videos", copy, model_dir, VideoSettings(fps=2, kinds=("video", "image")),
                      dtype="float32", options=ExtractOptions(**LOCAL_EXTRACT))
    assert (summary.extracted, summary.removed) == (1, 2) and set(open_cache(copy).ids()) == {"other", "photos/cat"}


def window_store(kind, extracted, dataset, tiny_model):
    """(model dir, cache) of `kind` extracted with --data from the dataset (its media in videos/ beside
    the store, where `processor_batch` finds them)."""
    if kind == "qwen2_5_vl":
        return extracted[0], open_cache(extracted[1])
    model_dir, store = str(tiny_model(kind)), dataset.parent.parent / f"{kind}.zarr"
    if not store.exists():
        extract(DataFile(dataset), store, model_dir, VideoSettings(fps=2), dtype="float32", shards=4,
                options=ExtractOptions(**LOCAL_EXTRACT))
    return model_dir, open_cache(store)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_training_on_windows_gives_the_full_models_logits_and_loss(kind, extracted, dataset, tiny_model):
    """Two windows of one file and an image in one padded batch, read as `qprep train --data` reads
    the dataset, against the full model on the processor's batch of the windows' frames (plainly
    decoded) with the metadata a reader of the window hands it; and the window's time where the
    family puts it (README "Windows")."""
    from qprep.models.checkpoint import open_checkpoint
    from qprep.models.families.qwen3_vl import patch_times, time_stamp
    from qprep.train.data import build_dataset, collate, load_records
    from qprep.train.model import LanguageModel
    from reference import full_model
    from test_train_media import processor_batch

    model_dir, cache = window_store(kind, extracted, dataset, tiny_model)
    records = load_records(DataFile(dataset))
    checkpoint = open_checkpoint(model_dir)
    layout = checkpoint.family.prompt_layout(checkpoint, checkpoint.tokenizer())
    samples = {s.id: s for s in build_dataset(records, cache, checkpoint.tokenizer(), layout).samples}
    names = ["#40", "#41", "#42"]  # the two windows, the image
    assert [samples[name].media for name in names] == [("cooking/a#t=1,3.5",), ("cooking/a#t=2,",), ("photos/cat",)]
    batch = collate([samples[name] for name in names], cache, layout)
    contents = {name: [{"type": kind_of}, {"type": "text", "text": QUESTION}]
                for name, kind_of in zip(names, ("video", "video", "image"))}
    inputs, model_kwargs, labels = processor_batch(model_dir, cache, kind, names, records=records, contents=contents)
    assert torch.equal(batch.input_ids, inputs["input_ids"]) and torch.equal(batch.labels, labels)
    language_model = LanguageModel(checkpoint, dtype="float32").eval()
    with torch.no_grad():
        expected = full_model(model_dir)(**inputs, labels=labels, **model_kwargs)
        loss, logits = language_model(batch)
    assert torch.equal(logits, expected.logits) and torch.equal(loss, expected.loss)

    window = cache.row("cooking/a#t=1,3.5")
    if kind in ("qwen3_vl", "qwen3_5"):  # `<t seconds>`: the file's time (1.0 s and later), as the processor writes it
        first = patch_times(window.frame_times, 2)[0]
        assert first >= 1.0 and time_stamp(first) in checkpoint.tokenizer().decode(batch.input_ids[0])
    else:  # M-RoPE's temporal ids: from the window's first frame, as for a whole file
        temporal, opened = video_temporal_ids(language_model, batch, layout.ids.vision_start, layout.ids.video)
        assert torch.equal(temporal, opened + window_time_steps(model_dir, kind, window))


def video_temporal_ids(language_model, batch, opening: int, video: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first row's video tokens' temporal position ids (float32), and the id after its `opening` token."""
    positions = language_model.position_ids(batch)[0, 0].float()
    ids = batch.input_ids[0]
    return positions[ids == video].unique(), positions[ids == opening][0] + 1


def window_time_steps(model_dir, kind, row) -> torch.Tensor:
    """The temporal ids of a video's temporal patches from its first sampled frame, as each family's
    `get_rope_index` makes them: Qwen2-VL counts the patches; Qwen2.5-VL scales them by
    `second_per_grid · tokens_per_second`, the Omni families by `second_per_grid ·
    position_id_per_seconds` (truncated to whole ids but in Qwen3-Omni). None knows where in the file
    the window starts."""
    from transformers import AutoConfig

    patches = torch.arange(row.grid_thw[0])
    if kind == "qwen2_vl":
        return patches.float()
    config = AutoConfig.from_pretrained(model_dir)
    if kind == "qwen2_5_vl":
        scaled = patches * torch.tensor(row.second_per_grid).float() * config.vision_config.tokens_per_second
    else:
        scaled = patches * torch.tensor(row.second_per_grid).float() * config.thinker_config.position_id_per_seconds
    return scaled.float() if kind == "qwen3_omni_moe" else scaled.long().float()


def test_qprep_train_data_reads_the_windows_from_the_store_extract_data_filled(extracted, dataset, tmp_path):
    model_dir, store, _ = extracted
    records = json.loads(dataset.read_text())
    data = dataset.parent / "windows-and-image.json"
    data.write_text(json.dumps(records[40:44]))  # the two windows, the image, the missing video
    result = CliRunner().invoke(main, [
        "train", "--cache", str(store), "--data", str(data), "--media-dir", str(dataset.parent), "--model", model_dir,
        "--out", str(tmp_path / "run"), "--epochs", "1", "--grad-accum", "1", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "3 samples" in result.output and "missing file: cooking/gone.mp4" in result.output
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_medium_asking_other_sampling_than_the_run_is_listed_and_qprep_records_name_entries_by_id(
        dataset, tmp_path):
    folder = dataset.parent
    asks = folder / "asks.json"
    asks.write_text(json.dumps([record({**block("video", "cooking/a.mp4"), "fps": 2}),
                                record({**block("video", "cooking/a.mp4", start=1.0), "nframes": 8})]))
    named = dataset_entries(DataFile(asks), VideoSettings(fps=2))
    assert [entry.id for entry in named.entries] == ["cooking/a"]  # fps 2 is the run's own
    assert [missing.line() for missing in named.missing] == [
        "record 1: cooking/a.mp4: asks nframes=8, which this run does not extract with (the store holds one set "
        "of settings: pass them as flags, e.g. --fps, --num-frames, --max-pixels, or drop them from the record)"]

    shutil.copytree(folder, tmp_path / "clash")
    shutil.copy(folder / "cooking" / "a.mp4", tmp_path / "clash" / "cooking" / "a.mkv")
    clash = tmp_path / "clash" / "clash.json"
    clash.write_text(json.dumps([record(block("video", "cooking/a.mp4")), record(block("video", "cooking/a.mkv"))]))
    with pytest.raises(SettingsError, match=r"record 0 and record 1 name two files under one id 'cooking/a'"):
        dataset_entries(DataFile(clash))

    plain = folder / "plain.json"  # qprep's own records: cache ids, found under the media folder
    plain.write_text(json.dumps([
        {"id": "x", "media": ["cooking/a#t=1,3.5", "photos/cat"], "conversations": [
            {"from": "human", "value": "<video><image> what?"}, {"from": "gpt", "value": "this"}]},
        {"id": "cooking/a", "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "a"}]},
        {"id": "y", "media": ["nowhere"], "conversations": [{"from": "human", "value": "<video>"},
                                                             {"from": "gpt", "value": "?"}]}]))
    named = dataset_entries(DataFile(plain))
    entries = {entry.id: entry for entry in named.entries}
    assert set(entries) == {"cooking/a#t=1,3.5", "photos/cat", "cooking/a"}
    assert (entries["cooking/a#t=1,3.5"].path, entries["cooking/a#t=1,3.5"].window_start) == ("cooking/a.mp4", 1.0)
    assert entries["photos/cat"].kind == "image"
    assert [m.line() for m in named.missing] == [
        f"record 2 (y): nowhere: not found (looked for {folder / 'nowhere'}.{{video or image extension}})"]


def test_a_manifest_written_before_windows_reads_as_whole_files_with_the_same_shard_keys():
    import hashlib

    import pyarrow as pa

    from qprep.extraction.plan import shard_key
    from qprep.schemas.manifest import conformed, rows_of

    old = pa.table({"id": ["a", "b"], "path": ["a.mp4", "b.mkv"], "size": [3, 4], "mtime_ns": [1, 2],
                    "shard": [0, 0], "shard_key": ["k", "k"], "fingerprint": ["f", "f"], "status": ["ok", "ok"],
                    "content_hash": ["h1", "h2"]})
    rows = rows_of(conformed(old))
    assert [(row.window, row.window_start, row.window_end) for row in rows] == [(False, None, None)] * 2
    digest = hashlib.sha256(b"f")  # the key such a store committed: its shards are not rewritten
    for path, content in (("a.mp4", "h1"), ("b.mkv", "h2")):
        digest.update(f"\0{path}\0{content}\0ok".encode())
    assert shard_key("f", rows) == digest.hexdigest()
    windowed = rows + [dataclasses.replace(rows[0], id="a#t=1,2", window_start=1.0, window_end=2.0)]
    assert shard_key("f", windowed) != shard_key("f", rows)
    assert shard_key("f", windowed) != shard_key("f", rows + [dataclasses.replace(windowed[2], id="a#t=1,3")])


def test_status_and_verify_judge_a_window_by_its_file(extracted, dataset):
    from qprep.audit.verify import verify
    from qprep.store.status import format_status, store_status

    model_dir, store, _ = extracted
    report = store_status(store)
    assert report["videos_dir"] == str(dataset.parent.resolve())
    assert (report["videos"]["ok"], report["videos"]["pending"], report["videos"]["gone"]) == (len(IDS), 0, 0)
    assert (report["kinds"], report["windows"]) == ({"image": 1, "video": 3}, 2)
    assert "1 image, 3 videos (2 of the videos are windows of a file)" in format_status(report)
    checked = verify(store, ids=sorted(WINDOWS), progress=False)
    assert [result.id for result in checked.results] == sorted(WINDOWS)
    for result in checked.results:
        assert result.ok, [(c.name, c.detail) for c in result.failed()]
        assert {"frame_indices", "frame_times", "video_tokens"} <= {c.name for c in result.checks}


@pytest.mark.parametrize("kind", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_training_on_a_window_with_its_sound_gives_the_full_models_logits_and_loss(kind, tiny_model, tmp_path):
    """Qwen2.5-Omni and Qwen3-Omni: the window's frames and its sound cut to the window (qwen-omni-utils'
    `int(16000 · seconds)` sample bounds), through the processor with `use_audio_in_video` and the
    window's sampled rate (the processors take one `fps` per call, not the metadata's: 2.0 when none
    is given for Qwen2.5-Omni, 1.0 for Qwen3-Omni); TM-RoPE's temporal ids of the frames and of the
    sound both count from the window's start."""
    from qprep.models.checkpoint import open_checkpoint
    from qprep.train.data import build_dataset, collate, load_records
    from qprep.train.model import LanguageModel
    from reference import full_model
    from test_train_media import processor_batch

    media = tmp_path / "videos"
    make_video(media / "talk.mp4", VideoSpec(width=112, height=84, fps=25, seconds=4, events=((1.0, 1.5),)))
    data = media / "data.json"
    data.write_text(json.dumps([record(block("video", "talk.mp4", start=0.7, end=2.9))]))
    model_dir = str(tiny_model(kind))
    # Qwen3-Omni's audio tower rounds some track lengths (this window's 220 mel frames; not 200 or
    # 300) one ulp apart at other torch thread counts (`TowerThreads`): the tower runs at the
    # reference's count, so both sides do the same arithmetic
    extract(DataFile(data), tmp_path / "store.zarr", model_dir, VideoSettings(fps=2), dtype="float32", shards=2,
            options=ExtractOptions(**LOCAL_EXTRACT, tower_threads=torch.get_num_threads()))
    cache = open_cache(tmp_path / "store.zarr")
    row = cache.row("talk#t=0.7,2.9")
    assert row.audio_length and row.audio_seconds == pytest.approx(2.2)
    records = load_records(DataFile(data))
    checkpoint = open_checkpoint(model_dir)
    layout = checkpoint.family.prompt_layout(checkpoint, checkpoint.tokenizer())
    samples = build_dataset(records, cache, checkpoint.tokenizer(), layout).samples
    batch = collate(samples, cache, layout)
    inputs, model_kwargs, labels = processor_batch(model_dir, cache, kind, ["#0"], records=records,
                                                   contents={"#0": [{"type": "video"}, {"type": "text", "text": QUESTION}]})
    assert model_kwargs == {"use_audio_in_video": True}
    assert inputs["video_second_per_grid"].tolist() == [pytest.approx(row.second_per_grid)] != [1.0]  # 4 frames, 2.2 s
    assert torch.equal(batch.input_ids, inputs["input_ids"]) and torch.equal(batch.labels, labels)
    with torch.no_grad():
        expected = full_model(model_dir)(**inputs, labels=labels, **model_kwargs)
        language_model = LanguageModel(checkpoint, dtype="float32").eval()
        loss, logits = language_model(batch)
    assert torch.equal(logits, expected.logits) and torch.equal(loss, expected.loss)
    # the window's frames from its start, and its sound's first token at the first frame's id
    temporal, opened = video_temporal_ids(language_model, batch, layout.ids.audio_start, layout.ids.video)
    assert torch.equal(temporal, opened + window_time_steps(model_dir, kind, row))
    positions, ids = language_model.position_ids(batch)[0, 0].float(), batch.input_ids[0]
    assert positions[ids == layout.ids.audio].min() == opened


def test_the_entries_of_published_formats_are_the_ids_training_reads(dataset, tmp_path):
    """LongVALE's `meta.split` windows and a Charades-style dict (several sentences per video) name
    their videos by id: one entry per video or window, under the ids `qprep train --data` looks up."""
    from qprep.datasets import load

    media = tmp_path / "media"
    media.mkdir()
    for name in ("lv1.mp4", "AO8RW.mkv"):
        shutil.copy(dataset.parent / "cooking" / "a.mp4", media / name)
    turns = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "From <s0> to <e0>, x."}]
    files = {
        "longvale.json": [{"id": "lv1", "conversations": turns,
                           "meta": {"duration": 4.0, "split": [1.5, 5.5], "token": {"<s0>": 0, "<e0>": 2}}},
                          {"id": "lv1", "conversations": turns, "meta": {"duration": 6.0, "token": {"<s0>": 0,
                                                                                                   "<e0>": 2}}}],
        "charades.json": {"AO8RW": {"duration": 6.0, "timestamps": [[0.0, 1.0], [2.0, 4.0]],
                                    "sentences": ["a person sits.", "a person stands."]},
                          "gone": {"duration": 3.0, "timestamps": [[0.0, 1.0]], "sentences": ["nothing."]}},
    }
    expected = {"longvale.json": {"lv1#t=1.5,5.5": "lv1.mp4", "lv1": "lv1.mp4"}, "charades.json": {"AO8RW": "AO8RW.mkv"}}
    for name, content in files.items():
        (media / name).write_text(json.dumps(content))
        source = DataFile(media / name, media_dir=media, check_files=True)
        named = dataset_entries(source)
        assert {entry.id: entry.path for entry in named.entries} == expected[name]
        assert {medium for r in load(source) for medium in r["media"]} == set(expected[name])
    assert [m.line().split(": not found")[0] for m in named.missing] == ["record 1 (gone#0): gone"]
