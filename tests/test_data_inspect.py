"""`qprep data FILE`: a dataset's records by kind, its media found and missing, the records left out
and why, its windows; and each sample's token length predicted from the media's probes, equal to
the length training's own dataset build gives the same sample once `extract --data` filled a store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import LOCAL_EXTRACT, make_image
from qprep.cli import main
from qprep.datasets import DataFile, load
from qprep.synth import VideoSpec, make_video

QUESTION, CAPTIONS = "What happens?", "From 0.0 to 1.0, someone cooks."


def blocks_record(*media, question=QUESTION, answer=CAPTIONS) -> dict:
    return {"messages": [{"role": "user", "content": [*media, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Content blocks over a video, a window of another, an image, a text-only record and a missing
    file; a LLaMA-Factory file beside it with a tag/media mismatch."""
    media = tmp_path_factory.mktemp("inspect") / "media"
    make_video(media / "a.mp4", VideoSpec(width=112, height=84, fps=25, seconds=3, audio=False))
    make_video(media / "long" / "b.mp4", VideoSpec(width=150, height=100, fps=30, seconds=5, audio=False))
    make_image(media / "cat.jpg", 200, 150, seed=1, quality=90)
    records = [blocks_record({"type": "video", "video": "a.mp4"}),
               blocks_record({"type": "video", "video": "long/b.mp4", "video_start": 1.0, "video_end": 3.5},
                             question="When does someone cook?", answer="From 0.5 to 1.0."),
               blocks_record({"type": "image", "image": "cat.jpg"}),
               {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}]},
               blocks_record({"type": "video", "video": "gone.mp4"})]
    (media / "data.json").write_text(json.dumps(records))
    (media / "lf.json").write_text(json.dumps([
        {"messages": [{"role": "user", "content": "<video><video>Compare."}, {"role": "assistant", "content": "A."}],
         "videos": ["a.mp4"]},
        {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A cat."}],
         "images": ["cat.jpg"]}]))
    return media / "data.json"


def test_the_report_counts_kinds_media_windows_and_what_is_left_out(dataset):
    result = CliRunner().invoke(main, ["data", str(dataset), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["format"], report["records"], report["media"]) == ("blocks", 5, 3)
    assert report["kinds"] == {"video": 2, "image": 1, "audio": 0, "text-only": 1, "grounding": 1, "mixed": 0}
    assert report["windows"] == ["long/b#t=1,3.5"]
    assert report["missing"] == [{"record": "record 4", "path": "gone.mp4", "why": "not found",
                                  "looked": ["gone.mp4", str(dataset.parent / "gone.mp4")]}]
    assert "tokens" not in report  # no model, no lengths

    mismatch = dataset.parent / "lf.json"
    text = CliRunner().invoke(main, ["data", str(mismatch), "--format", "llamafactory"]).output
    assert f"{mismatch}: llamafactory, 2 records, 1 read (1 image)" in text
    assert f"left out 1: {mismatch}: 2 <video> tags for 1 video (record 0)" in text


def test_predicted_token_lengths_equal_the_lengths_training_builds_from_the_extracted_store(dataset, tiny_model):
    """A video, a window, an image and a text-only sample: each length predicted from the probes is
    the length `build_dataset` gives the same record over the store `extract --data` filled."""
    from qprep import open_cache
    from qprep.datasets.inspect import inspect_data
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.models.checkpoint import open_checkpoint
    from qprep.schemas.settings import VideoSettings
    from qprep.train.data import build_dataset

    model_dir = str(tiny_model("qwen2_5_vl"))
    settings = VideoSettings(fps=2, max_pixels=64 * 28 * 28)
    report = inspect_data(DataFile(dataset), model=model_dir, settings=settings, max_length=80)
    predicted = report.lengths.samples
    assert list(predicted) == ["#0", "#1", "#2", "#3"]
    assert report.lengths.unknown == {"a medium not found, or not extractable as named (listed above)": ["#4"]}
    assert report.lengths.over == [name for name, length in predicted.items() if length > 80] != []

    store = dataset.parent.parent / "store.zarr"
    extract(DataFile(dataset), store, model_dir, settings, dtype="float32", shards=2,
            options=ExtractOptions(**LOCAL_EXTRACT))
    checkpoint = open_checkpoint(model_dir)
    tokenizer = checkpoint.tokenizer()
    built = build_dataset(load(DataFile(dataset)), open_cache(store), tokenizer,
                          checkpoint.family.prompt_layout(checkpoint, tokenizer))
    assert {sample.id: len(sample.input_ids) for sample in built.samples} == predicted

    text = CliRunner().invoke(main, ["data", str(dataset), "--model", model_dir, "--fps", "2", "--max-pixels",
                                     str(64 * 28 * 28), "--max-length", "80"]).output
    values = sorted(predicted.values())
    assert f"tokens ({model_dir}): 4 samples, min {values[0]}, median " in text and f"max {values[-1]}" in text
    assert f"{len(report.lengths.over)} over --max-length 80" in text


def test_an_image_that_cannot_be_read_is_listed_with_its_file_and_cause_not_a_traceback(tmp_path, tiny_model):
    """Its header read as `extract` reads the image: a file that is not an image, and a decompression
    bomb (a PNG whose header claims 20000x20000), each named with the cause; the good image is counted."""
    from qprep.datasets.inspect import inspect_data

    make_image(tmp_path / "cat.jpg", 200, 150, seed=1, quality=90)
    (tmp_path / "noise.jpg").write_bytes(b"not a picture at all")
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))
    records = [blocks_record({"type": "image", "image": name}) for name in ("cat.jpg", "noise.jpg", "bomb.png")]
    # several media: the first one without a length decides (a missing file, listed apart, then the noise)
    records.append(blocks_record({"type": "image", "image": "gone.jpg"}, {"type": "image", "image": "noise.jpg"}))
    (tmp_path / "data.json").write_text(json.dumps(records))

    report = inspect_data(DataFile(tmp_path / "data.json"), model=str(tiny_model("qwen2_5_vl")))
    assert list(report.lengths.samples) == ["#0"]
    causes = {names[0]: reason for reason, names in report.lengths.unknown.items()}  # sample → why no length
    assert set(causes) == {"#1", "#2", "#3"} and all(len(names) == 1 for names in report.lengths.unknown.values())
    assert causes["#3"] == "a medium not found, or not extractable as named (listed above)"
    assert causes["#1"].startswith(f"cannot be probed: {tmp_path / 'noise.jpg'}: cannot read it as an image")
    assert causes["#2"].startswith(f"cannot be probed: {tmp_path / 'bomb.png'}: cannot read it as an image")
    assert "decompression bomb" in causes["#2"]


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and header chunk, claiming `width` x `height`, and no pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")
