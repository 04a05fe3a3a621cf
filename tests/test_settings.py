"""Model specs come from the model's own processor configs; presets load and validate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2VLVideoProcessor, WhisperFeatureExtractor

import qprep
from qprep.errors import SettingsError
from qprep.models.tiny import LAYOUTS
from qprep.schemas.jobs import load_job
from qprep.schemas.settings import ModelSpec, load_model_spec
from reference import reference_pixels


def test_spec_from_a_saved_omni_processor_directory(tmp_path):
    Qwen2VLVideoProcessor(min_pixels=3136, max_pixels=12845056).save_pretrained(tmp_path)
    WhisperFeatureExtractor(feature_size=128, chunk_length=300).save_pretrained(tmp_path)
    spec = load_model_spec(tmp_path)
    assert (spec.min_pixels, spec.max_pixels, spec.factor, spec.patch_dim) == (3136, 12845056, 28, 1176)
    assert (spec.audio.feature_size, spec.audio.chunk_length, spec.audio.window_samples) == (128, 300, 4_800_000)


def test_vision_only_directory_keeps_omni_audio_defaults_not_whispers(tmp_path):
    Qwen2VLVideoProcessor(min_pixels=3136, max_pixels=1003520).save_pretrained(tmp_path)
    spec = load_model_spec(tmp_path)
    assert spec.max_pixels == 1003520
    assert spec.audio.chunk_length == 300 and spec.audio.feature_size == 128


def test_spec_from_a_hub_style_preprocessor_config_file(tmp_path):
    config = tmp_path / "preprocessor_config.json"
    config.write_text('{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, '
                      '"merge_size": 2, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, '
                      '"chunk_length": 300, "n_fft": 400, "hop_length": 160, "sampling_rate": 16000}')
    spec = load_model_spec(config)
    assert spec == ModelSpec(min_pixels=3136, max_pixels=12845056)


def test_missing_model_directory_is_a_settings_error(tmp_path):
    with pytest.raises(SettingsError, match="preprocessor config"):
        load_model_spec(tmp_path / "no-such-model")


def test_presets_load_and_flags_override():
    job = load_job("seed-omni-100f")
    assert job.video_settings().num_frames == 100 and job.video_settings().size == (224, 224)
    assert job.video_settings(fps=1.0).num_frames is None
    with pytest.raises(SettingsError, match="unknown job"):
        load_job("no-such-job")


def test_preset_file_with_a_typo_is_rejected(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[video]\nnum_frame = 10\n')
    with pytest.raises(SettingsError, match="num_frame"):
        load_job(path)


def test_training_settings_come_from_defaults_then_the_preset_then_flags(tmp_path):
    recipe = load_job("seed-omni-100f").train_settings()
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lr, recipe.grad_accum, recipe.epochs) == \
        (16, 16, 0.05, 1e-4, 2, 2)
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[train]\nepochs = 5\nlr = 3e-4\nlora_r = 8\nlora_targets = ["q_proj"]\n')
    mine = load_job(path)
    assert mine.train_settings().epochs == 5 and mine.train_settings().lora.targets == ("q_proj",)
    overridden = mine.train_settings(epochs=1, lora_r=None, lora_alpha=32)
    assert (overridden.epochs, overridden.lr, overridden.lora.r, overridden.lora.alpha) == (1, 3e-4, 8, 32)


def test_a_train_table_with_a_typo_is_rejected(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[train]\nlora_rank = 8\n')
    with pytest.raises(SettingsError, match=r"mine.toml.*lora_rank.*known: .*lora_r"):
        load_job(path)


def test_a_users_file_builds_on_a_preset_and_flags_override_both(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\npreset = "seed-omni-100f"\n[video]\nfps = 1.0\n[train]\nlr = 5e-4\n')
    job = load_job(path)
    assert job.model == "Qwen/Qwen2.5-Omni-3B" and "seed-omni-100f" in job.source
    video = job.video_settings()
    assert (video.fps, video.num_frames, video.size) == (1.0, None, (224, 224))  # the file's rule, the preset's size
    train = job.train_settings(epochs=7)
    assert (train.lr, train.epochs, train.lora.dropout) == (5e-4, 7, 0.05)  # file, flag, preset


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["qwen2_5_omni", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5"])
def test_frames_are_sized_as_the_checkpoints_own_processor_sizes_them(tiny_model, videos, kind, layout):
    """A 1280×720 clip at fps 2, against `AutoProcessor` called as a user calls it (no size given). The
    released Omni checkpoint's preprocessor_config.json holds the image bounds (3136–12845056, which
    `Qwen2VLVideoProcessor.from_pretrained` would take: 5×52×92); the Omni processor resizes video
    within its own 128·28²–768·28²: 5×40×72. Released Qwen2.5-VL and Qwen2-VL: the image bounds do
    apply, 5×52×92.
    Released Qwen3-VL / Qwen3.5: 4096–25165824 pixels for the whole clip (10 frames of 704×1280
    fit; 720/32 = 22.5 rounds to 22): 5×44×80."""
    model_dir = tiny_model(kind, layout)
    path = videos("720p-5s.mp4", width=1280, height=720, fps=10, seconds=5)
    prepared = qprep.preprocess_video(path, model_dir, fps=2, audio=False)
    expected = reference_pixels(path, prepared.metadata.frame_indices, AutoProcessor.from_pretrained(model_dir))
    assert torch.equal(prepared.video_grid_thw, expected["video_grid_thw"])
    assert torch.equal(prepared.pixel_values_videos, expected["pixel_values_videos"])
    if kind == "qwen2_5_omni":
        assert prepared.video_grid_thw.tolist() == [[5, 40, 72]]
    elif layout == "released" and kind in ("qwen2_5_vl", "qwen2_vl"):
        assert prepared.video_grid_thw.tolist() == [[5, 52, 92]]
    elif layout == "released":
        assert prepared.video_grid_thw.tolist() == [[5, 44, 80]]


def test_qwen_vl_utils_caps_each_frame_where_the_released_qwen2_vl_processor_does_not(tiny_model, videos):
    """The same 1280×720 clip through qwen-vl-utils' `fetch_video` (its frames handed over decoded):
    at most 768·28² pixels a frame, 560×1008, where the released Qwen2-VL processor keeps 728×1288
    (5×52×92, above). qprep given qwen-vl-utils' per-frame bounds makes its size."""
    from PIL import Image
    from qwen_vl_utils.vision_process import VIDEO_MAX_TOKEN_NUM, VIDEO_MIN_TOKEN_NUM, fetch_video

    from reference import plain_decode

    path = videos("720p-5s.mp4", width=1280, height=720, fps=10, seconds=5)
    bounds = dict(min_pixels=VIDEO_MIN_TOKEN_NUM * 28 * 28, max_pixels=VIDEO_MAX_TOKEN_NUM * 28 * 28)
    prepared = qprep.preprocess_video(path, tiny_model("qwen2_vl", "released"), fps=2, audio=False, **bounds)
    frames, _ = plain_decode(path)
    theirs = fetch_video({"video": [Image.fromarray(frames[i]) for i in prepared.metadata.frame_indices],
                          "sample_fps": 2.0})
    assert tuple(theirs.shape[2:]) == (560, 1008)
    assert prepared.video_grid_thw.tolist() == [[5, 560 // 14, 1008 // 14]]


@pytest.mark.parametrize("cap", [False, True])
def test_clip_bounds_size_frames_as_the_qwen3_video_processor_does(cap):
    """The bounds cover all frames together, so the size depends on the frame count; with
    `cap_pixels_per_frame` each frame also gets at most `max_video_tokens` merged tokens."""
    from transformers import Qwen3VLVideoProcessor

    from qprep.pipeline.patchify import target_size
    from qprep.schemas.settings import ModelSpec, VideoSettings

    processor = Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 2_000_000}, max_video_tokens=64)
    spec = ModelSpec.from_processors(processor, per_clip=True)
    spec = ModelSpec(**{**vars(spec), "cap_pixels_per_frame": cap})
    sizes = set()
    for frames, (height, width) in [(2, (720, 1280)), (8, (720, 1280)), (40, (720, 1280)), (16, (64, 48)),
                                    (100, (1080, 1920)), (6, (500, 333))]:
        ours = target_size("clip.mp4", height, width, frames, VideoSettings(), spec)
        out = processor(videos=[np.zeros((frames, height, width, 3), np.uint8)], do_sample_frames=False,
                        cap_pixels_per_frame=cap, return_tensors="pt")
        grid = out["video_grid_thw"][0].tolist()
        assert (ours[0] // 16, ours[1] // 16) == tuple(grid[1:]), (frames, height, width)
        sizes.add(ours)
    assert len(sizes) >= 5  # the cases really differ


def test_the_qwen2_vl_preset_leaves_the_frame_size_to_the_checkpoints_processor():
    """No pixel bounds of its own (the released processor's apply, see the test above), fps 2, no audio."""
    from pathlib import Path

    job = load_job(Path(__file__).resolve().parents[1] / "jobs" / "qwen2-vl-default.toml")
    video = job.video_settings()
    assert job.model == "Qwen/Qwen2-VL-7B-Instruct"
    assert (video.fps, video.num_frames, video.size, video.min_pixels, video.max_pixels, video.audio) == (
        2.0, None, None, None, None, False)


# What a checkpoint may lack of its tokenizer: all of it, its settings, or its vocabulary (in both forms).
TOKENIZER_GAPS = {
    "all": (("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"),
            ": tokenizer_config.json; tokenizer.json (or vocab.json and merges.txt). "),
    "settings": (("tokenizer_config.json",), ": tokenizer_config.json. "),
    "vocabulary": (("tokenizer.json", "vocab.json", "merges.txt"),
                   ": tokenizer.json (or vocab.json and merges.txt). "),
}


def without_tokenizer_files(tiny_model, kind, layout, names, folder):
    import shutil

    copy = shutil.copytree(tiny_model(kind, layout), folder / f"{kind}-{layout}")
    for name in names:
        (copy / name).unlink(missing_ok=True)
    return str(copy)


@pytest.mark.parametrize("gap", sorted(TOKENIZER_GAPS))
@pytest.mark.parametrize("kind, layout", [("qwen2_5_omni", "released"), ("qwen2_5_vl", "save_pretrained")])
def test_a_checkpoint_without_its_tokenizer_files_is_refused_naming_them(tiny_model, videos, tmp_path, kind,
                                                                          layout, gap):
    """transformers builds a one-token tokenizer instead, and the Omni processor then fails on
    "Qwen2Tokenizer has no attribute image_token"; qprep names the directory and the missing files."""
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.schemas.settings import VideoSettings
    from qprep.train.loop import train

    names, listed = TOKENIZER_GAPS[gap]
    model = without_tokenizer_files(tiny_model, kind, layout, names, tmp_path)
    video = videos("tokenizer-check.mp4", width=64, height=48, fps=8, seconds=1)
    expected = f"tokenizer files missing from the directory {model}{listed}"
    calls = {
        "prepare": lambda: qprep.preprocess_video(video, model),
        "extract": lambda: extract(video.parent, tmp_path / "store.zarr", model, VideoSettings(),
                                   options=ExtractOptions(progress=False, executor="local")),
        # before the cache is opened (there is none) and before two ranks would each fail
        "train": lambda: train(tmp_path / "no-store.zarr", tmp_path / "no-data.json", model, tmp_path / "run",
                               progress=False, echo=lambda _: None),
        "train on 2 ranks": lambda: train(tmp_path / "no-store.zarr", tmp_path / "no-data.json", model,
                                          tmp_path / "run", ranks=2, device="cpu", progress=False),
    }
    for name, call in calls.items():
        with pytest.raises(SettingsError) as caught:
            call()
        message = str(caught.value)
        assert expected in message, (name, message)
        assert "placeholder tokens" in message, (name, message)
    assert not (tmp_path / "store.zarr").exists() and not (tmp_path / "run").exists()  # refused before any work


def test_infer_and_verify_refuse_a_model_without_its_tokenizer_files(vl_train_store, tiny_model, tmp_path):
    from qprep.audit.verify import verify
    from qprep.train.infer import infer

    _, cache = vl_train_store
    model = without_tokenizer_files(tiny_model, "qwen2_5_vl", "save_pretrained", TOKENIZER_GAPS["all"][0], tmp_path)
    for call in (lambda: infer(cache.store.root, model, tmp_path / "answers.jsonl", progress=False),
                 lambda: verify(cache.store.root, model=model, progress=False)):
        with pytest.raises(SettingsError, match=f"tokenizer files missing from the directory {model}: "
                                                f"tokenizer_config.json; tokenizer.json"):
            call()
    assert not (tmp_path / "answers.jsonl").exists()


def test_the_cli_names_the_missing_tokenizer_files(tiny_model, videos, tmp_path):
    from click.testing import CliRunner

    from qprep.cli import main

    model = without_tokenizer_files(tiny_model, "qwen2_5_omni", "released", TOKENIZER_GAPS["all"][0], tmp_path)
    video = videos("tokenizer-check.mp4", width=64, height=48, fps=8, seconds=1)
    result = CliRunner().invoke(main, ["prepare", str(video), "--model", model])
    assert result.exit_code == 3, result.output
    assert (f"tokenizer files missing from the directory {model}: tokenizer_config.json; "
            "tokenizer.json (or vocab.json and merges.txt)") in result.output
    assert "image_token" not in result.output
