"""`qprep verify`: passes on a fresh store, fails naming the video whose cached tokens were corrupted."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from qprep import open_cache
from qprep.audit import reference
from qprep.cli import EXIT_MISMATCH, EXIT_SETTINGS, main
from qprep.extraction.run import ExtractOptions, extract
from qprep.models.tiny import QWEN3_KINDS
from qprep.schemas.settings import VideoSettings
from qprep.synth import VideoSpec, make_video


def copy_store(cache, tmp_path):
    root = tmp_path / "store.zarr"
    shutil.copytree(cache.store.root, root)
    return root


def token_array(store, video_id: str, kind: str = "video"):
    """The writable Zarr array holding a video's tokens, and the video's rows in it (deepstack rows
    are the video rows' twins)."""
    row = open_cache(store).row(video_id)
    array = zarr.open_array(str(store / "shards" / f"{row.shard:05d}" / row.shard_key[:16] / kind), mode="r+")
    offset, length = row.span("video" if kind == "deepstack" else kind)
    return array, slice(offset, offset + length)


def run_verify(*args):
    return CliRunner().invoke(main, ["verify", *map(str, args), "--quiet"])


def test_verify_passes_on_a_fresh_store_and_names_the_video_whose_tokens_were_corrupted(omni_store, tmp_path,
                                                                                       monkeypatch):
    _, cache = omni_store
    store = copy_store(cache, tmp_path)
    # frames go through the processor two at a time: the rows must still equal the cache's exactly
    monkeypatch.setattr(reference, "FRAMES_PER_CALL", 2)

    result = run_verify(store, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["tolerance"] == 0 and report["dtype"] == "float32"
    assert [r["id"] for r in report["results"]] == ["a", "b"]  # the broken video has nothing to verify
    for entry in report["results"]:
        checks = {c["name"]: c for c in entry["checks"]}
        assert {"file", "frame_count", "frame_indices", "frame_times", "second_per_grid", "grid_thw",
                "video_tokens", "mel_length", "audio_tokens"} <= set(checks)
        assert checks["video_tokens"]["detail"] == checks["audio_tokens"]["detail"] == "bit-exact"

    array, rows = token_array(store, "b")
    values = array[rows]
    values[3] += 0.5
    array[rows] = values
    result = run_verify(store)
    assert result.exit_code == EXIT_MISMATCH, result.output
    assert "ok    a:" in result.output
    assert "FAIL  b: video_tokens: max |Δ| 0.5" in result.output and "first row 3" in result.output
    assert "1 of 2 media differ from the reference: b (video_tokens)" in result.output

    result = run_verify(store, "--ids", "a")  # the others are not looked at
    assert result.exit_code == 0, result.output


def test_verify_refuses_another_model_and_unknown_ids(omni_store, tiny_model, tmp_path):
    _, cache = omni_store
    store = copy_store(cache, tmp_path)
    result = run_verify(store, "--model", tiny_model("qwen2_5_vl"))
    assert result.exit_code == EXIT_SETTINGS and "is not the model" in result.output
    result = run_verify(store, "--ids", "a,nope")
    assert result.exit_code == EXIT_SETTINGS and "no video nope" in result.output
    result = run_verify(store, "--ids", "broken")
    assert result.exit_code == EXIT_SETTINGS and "failed extraction" in result.output


@pytest.fixture(scope="module")
def vl_store(tiny_model, tmp_path_factory):
    """A bf16 VL store with a fixed size, a fixed frame count and a window; one video rotated."""
    root = tmp_path_factory.mktemp("vl-verify")
    make_video(root / "videos" / "plain.mp4", VideoSpec(width=128, height=96, fps=25, seconds=2, bframes=2))
    make_video(root / "videos" / "turned.mp4", VideoSpec(width=112, height=84, fps=30, seconds=2, rotation=90))
    settings = VideoSettings(num_frames=4, size=(84, 112), video_start=0.2, video_end=1.7)
    extract(root / "videos", root / "store.zarr", str(tiny_model("qwen2_5_vl")), settings, dtype="bfloat16",
            shards=2, options=ExtractOptions(progress=False, executor="local"))
    return open_cache(root / "store.zarr")


def test_verify_a_bf16_vl_store_and_its_tolerance(vl_store, tmp_path):
    store = copy_store(vl_store, tmp_path)
    result = run_verify(store, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dtype"] == "bfloat16" and report["tolerance"] == 2**-6
    for entry in report["results"]:
        checks = {c["name"]: c for c in entry["checks"]}
        assert checks["video_tokens"]["detail"] == "bit-exact"  # the same kernels on the same device
        assert checks["audio"]["ok"] and "audio_tokens" not in checks

    # one value one bf16 step off: within the default tolerance, not within 0
    array, rows = token_array(store, "turned")
    bits = array[rows]
    bits[0, 0] = np.uint16(bits[0, 0] + 1)
    array[rows] = bits
    assert run_verify(store).exit_code == 0
    result = run_verify(store, "--tolerance", "0")
    assert result.exit_code == EXIT_MISMATCH and "FAIL  turned: video_tokens" in result.output


@pytest.mark.parametrize("kind", ["qwen2_5_omni", "qwen2_5_vl", "qwen2_vl", *QWEN3_KINDS, "qwen3_omni_moe"])
def test_a_store_extracted_from_a_checkpoint_in_its_released_layout_verifies_bit_for_bit(tiny_model, tmp_path, kind):
    """The hub's file set (Qwen2, Qwen2.5: one combined preprocessor_config.json, chat_template.json; the
    releases' config keys and weight names), extracted into a store, then recomputed by transformers'
    AutoProcessor and from_pretrained alone (merged tokens, deepstack levels, audio tokens)."""
    model_dir = tiny_model(kind, "released")
    for name, audio in (("talk", True), ("quiet", False)):
        make_video(tmp_path / "videos" / f"{name}.mp4", VideoSpec(width=96, height=72, fps=25, seconds=2, audio=audio))
    store = tmp_path / "store.zarr"
    extract(tmp_path / "videos", store, str(model_dir), VideoSettings(fps=2), dtype="float32", shards=1,
            options=ExtractOptions(progress=False, executor="local"))
    result = run_verify(store, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and [r["id"] for r in report["results"]] == ["quiet", "talk"]
    for entry in report["results"]:
        checks = {c["name"]: c for c in entry["checks"]}
        assert checks["video_tokens"]["detail"] == "bit-exact"
        assert ("deepstack" in checks) == kind.startswith(("qwen3_vl", "qwen3_omni"))
        if "deepstack" in checks:
            assert checks["deepstack"]["detail"] == "bit-exact"
        if kind in ("qwen2_5_omni", "qwen3_omni_moe") and entry["id"] == "talk":
            assert checks["audio_tokens"]["detail"] == "bit-exact"


def test_verify_names_the_qwen3_omni_video_whose_audio_row_changed(qwen3_omni_store, tmp_path):
    _, cache = qwen3_omni_store
    store = copy_store(cache, tmp_path)
    array, rows = token_array(store, "b", "audio")
    values = array[rows]
    values[-1, 3] += 0.25  # the track's last token: a cut or padded-away track would show here first
    array[rows] = values
    result = run_verify(store, "--json")
    assert result.exit_code == EXIT_MISMATCH, result.output
    by_id = {entry["id"]: {c["name"]: c for c in entry["checks"]} for entry in json.loads(result.stdout)["results"]}
    assert not by_id["b"]["audio_tokens"]["ok"] and by_id["b"]["video_tokens"]["ok"]
    assert by_id["a"]["audio_tokens"]["ok"] and "audio_tokens" not in by_id["c"]
    assert "FAIL  b: audio_tokens" in run_verify(store).output


def test_a_qwen3_vl_store_holds_every_deepstack_level_and_verifies_them(qwen3_vl_store, tmp_path):
    _, cache = qwen3_vl_store
    assert cache.deepstack_levels == 2 and cache.ids() == ["a", "b"]
    video = cache["a"]
    assert video.deepstack.shape == (2, *video.video_tokens.shape)
    store = copy_store(cache, tmp_path)
    result = run_verify(store, "--json")
    assert result.exit_code == 0, result.output
    for entry in json.loads(result.stdout)["results"]:
        checks = {c["name"]: c for c in entry["checks"]}
        assert checks["video_tokens"]["detail"] == checks["deepstack"]["detail"] == "bit-exact"

    array, span = token_array(store, "b", "deepstack")
    assert array.shape[1:] == (2, cache.hidden_size)
    values = array[span]
    values[2, 1] += 0.25  # level 1 of token 2 only: the merged tokens are untouched
    array[span] = values
    result = run_verify(store)
    assert result.exit_code == EXIT_MISMATCH, result.output
    assert "ok    a:" in result.output and "FAIL  b: deepstack: max |Δ| 0.25" in result.output
    assert "first row 2" in result.output and "b (deepstack)" in result.output


def test_status_prints_what_the_deepstack_levels_cost(qwen3_vl_store):
    """Two levels beside the merged tokens: the deepstack array is twice the video array, row for row."""
    from qprep.store.status import format_status, store_status

    _, cache = qwen3_vl_store
    report = store_status(cache.store.root)
    tokens = sum(cache.row(video_id).video_length for video_id in cache.ids())
    assert report["token_bytes"] == {"video": tokens * 64 * 4, "deepstack": tokens * 2 * 64 * 4}
    line = next(line for line in format_status(report).splitlines() if line.startswith("arrays"))
    assert "2 deepstack levels: 2× the merged tokens" in line


def test_schema_versions_name_what_a_store_holds_and_an_unknown_one_is_refused(omni_store, qwen3_vl_store, tmp_path):
    """Version 2 only where a deepstack array exists (a reader of version 1 would miss it); a version
    this qprep does not read is refused with what to do."""
    from qprep.errors import StoreError
    from qprep.store.layout import Store

    assert omni_store[1].store.attrs["schema_version"] == 1
    assert qwen3_vl_store[1].store.attrs["schema_version"] == 2
    store = copy_store(qwen3_vl_store[1], tmp_path)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["qprep"]["schema_version"] = 6
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError,
                       match="schema version 6, this qprep reads versions 1, 2, 3, 4, 5; re-extract with --rebuild"):
        Store.open(store)


def test_cpu_tower_calls_run_at_the_threads_their_rows_record_and_verify_recomputes_at_them(tiny_model, tmp_path,
                                                                                            monkeypatch):
    """On a CPU the thread count can move an ulp (an elementwise loop's scalar tail falls where a call
    splits over threads), so each row records it and `verify` recomputes each medium at its count,
    whatever torch's own default: here 4 usable cores give images 4 threads and videos 2."""
    import torch

    from conftest import LOCAL_EXTRACT, make_image
    from qprep.audit.verify import format_report, verify
    from qprep.extraction import executors
    from qprep.pipeline.towers import Towers

    make_video(tmp_path / "media" / "a.mp4", VideoSpec(width=112, height=84, fps=25, seconds=1))
    make_image(tmp_path / "media" / "cat.jpg", 200, 150, seed=1, quality=90)
    monkeypatch.setattr(executors, "usable_cores", lambda: 4)
    tower_calls = spy_threads(monkeypatch, Towers, "video_features", "image_features")
    extract(tmp_path / "media", tmp_path / "store.zarr", str(tiny_model("qwen3_vl", "released")),
            VideoSettings(fps=2, kinds=("video", "image")), dtype="float32", shards=1,
            options=ExtractOptions(**LOCAL_EXTRACT))
    cache = open_cache(tmp_path / "store.zarr")
    assert {medium: cache.row(medium).tower_threads for medium in ("a", "cat")} == {"a": 2, "cat": 4}
    assert sorted(tower_calls) == [("image_features", 4), ("video_features", 2)]

    recomputed = spy_threads(monkeypatch, reference.Reference, "compute", "compute_image")
    kept = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's default is not what the media ran at
    try:
        report = verify(tmp_path / "store.zarr", sample=None, device="cpu", progress=False)
        assert torch.get_num_threads() == 1  # given back after each medium
    finally:
        torch.set_num_threads(kept)
    assert report.ok, format_report(report)
    assert sorted(recomputed) == [("compute", 2), ("compute_image", 4)]
    assert report.threads == [2, 4] and "at the 2/4 torch threads of their extraction" in format_report(report)

    # a row written before the count was recorded, its tokens an ulp off: the report says why that may be
    forget_tower_threads(tmp_path / "store.zarr", "cat")
    array, rows = token_array(tmp_path / "store.zarr", "cat")
    tokens = array[rows]
    tokens[0, 0] = np.nextafter(tokens[0, 0], np.float32(np.inf))
    array[rows] = tokens
    report = verify(tmp_path / "store.zarr", sample=None, device="cpu", progress=False)
    assert [result.id for result in report.failures()] == ["cat"] and report.threads_unknown == ["cat"]
    assert "note: cat: extracted on a CPU before stores recorded the towers' torch threads" in \
        format_report(report)


def forget_tower_threads(store, medium: str) -> None:
    """The manifest as a store written before rows recorded their towers' threads holds `medium`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in (store / "manifest").glob("*.parquet"):
        table = pq.read_table(path)
        kept = [None if row_id == medium else threads for row_id, threads in
                zip(table.column("id").to_pylist(), table.column("tower_threads").to_pylist())]
        index = table.column_names.index("tower_threads")
        pq.write_table(table.set_column(index, "tower_threads", pa.array(kept, pa.int32())), path)


def spy_threads(monkeypatch, owner, *methods) -> list[tuple[str, int]]:
    """Each call of `owner`'s `methods`, with the torch threads it ran at."""
    import torch

    calls = []
    for name in methods:
        def spied(self, *args, __name=name, __method=getattr(owner, name), **kwargs):
            calls.append((__name, torch.get_num_threads()))
            return __method(self, *args, **kwargs)
        monkeypatch.setattr(owner, name, spied)
    return calls
