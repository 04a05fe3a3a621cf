"""The tower stage: only the towers are read, and their tokens are the full model's, bit for bit.

References are transformers' own classes: the whole model loaded with `from_pretrained` and its
`get_video_features` / `get_audio_features`, fed by transformers' processors on plainly decoded
frames and audio (tests/reference.py).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoProcessor

import qprep
from qprep.errors import SettingsError
from qprep.models.checkpoint import open_checkpoint
from qprep.models.tiny import QWEN3_KINDS, QWEN3_OMNI_KINDS
from qprep.pipeline.towers import AudioInput, Budget, Towers, VideoInput
from qprep.schemas.settings import load_model_spec
from qprep.schemas.dtypes import to_storage, to_tensor
from reference import full_model, kinds_and_layouts, plain_audio_decode, reference_pixels

CLIPS = {
    "a.mp4": dict(width=160, height=120, fps=25, seconds=3, events=((0.5, 1.0),)),
    "b.mp4": dict(width=96, height=64, fps=30, seconds=2, bframes=2),
    "c.mp4": dict(width=200, height=100, fps=24, seconds=4, rotation=90),
}


def video_input(prepared) -> VideoInput:
    return VideoInput(prepared.patches, tuple(prepared.video_grid_thw[0].tolist()))


def audio_input(prepared) -> AudioInput:
    return AudioInput(prepared.mel_frames(), tuple(prepared.feature_attention_mask.sum(-1).tolist()))


OMNI = ("qwen2_5_omni", *QWEN3_OMNI_KINDS)


@pytest.mark.parametrize(("kind", "layout"), kinds_and_layouts(["qwen2_5_omni", "qwen2_5_vl", "qwen2_vl", *QWEN3_KINDS,
                                                                 "qwen3_omni_moe"])
                         + [("qwen3_omni_moe_thinker", "save_pretrained")])
def test_tokens_equal_the_full_model_on_the_processors_output(tiny_model, videos, kind, layout):
    """Merged tokens (and every deepstack level, where the tower has them) bit for bit."""
    model_dir = tiny_model(kind, layout)
    towers = Towers(open_checkpoint(model_dir), load_model_spec(model_dir), dtype="float32", device="cpu")
    reference = full_model(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    for name, spec in CLIPS.items():
        path = videos(name, **spec)
        prepared = qprep.preprocess_video(path, model_dir, fps=2)
        expected_pixels = reference_pixels(path, prepared.metadata.frame_indices, processor)
        with torch.inference_mode():
            output = reference.get_video_features(expected_pixels["pixel_values_videos"],
                                                  expected_pixels["video_grid_thw"])
        ours = towers.video_features([video_input(prepared)])[0]
        assert ours.tokens.shape == (prepared.video_grid_thw.prod() // 4, 64)
        assert torch.equal(ours.tokens, output.pooler_output[0]), name
        levels = getattr(output, "deepstack_features", None)
        assert (ours.deepstack is None) == (not levels)
        if levels:
            assert len(levels) == ours.deepstack.shape[0] == len(reference.config.vision_config.deepstack_visual_indexes)
            for level, (mine, theirs) in enumerate(zip(ours.deepstack, levels)):
                assert torch.equal(mine, theirs[0]), f"{name}: deepstack level {level}"
        if kind in OMNI:  # the audio features as the whole processor makes them for an audio prompt
            features = processor(text=[processor.audio_token], audio=[plain_audio_decode(path)], return_tensors="pt")
            assert torch.equal(prepared.input_features, features["input_features"]), name
            with torch.inference_mode():
                expected_audio = reference.get_audio_features(
                    features["input_features"], features["feature_attention_mask"]).last_hidden_state
            assert torch.equal(towers.encode_audio([audio_input(prepared)])[0], expected_audio), name


@pytest.mark.parametrize(("seconds", "audio_seconds"), [(40, None), pytest.param(2, 301, marks=pytest.mark.slow)])
def test_qwen3_omni_encodes_a_long_track_whole_neither_cut_nor_padded_away(tiny_model, videos, seconds, audio_seconds):
    """A 40 s clip, and a 301 s track (past the feature extractor's 300 s chunk, where Qwen2.5-Omni's
    processor would cut): one piece at the track's own length, as Qwen3-Omni's processor makes it,
    and as many audio tokens as the model's formula gives for the whole track."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    model_dir = tiny_model("qwen3_omni_moe", "released")
    path = videos(f"long-{seconds}-{audio_seconds}.mp4", width=64, height=48, fps=4, seconds=seconds,
                  audio_seconds=audio_seconds, audio_rate=16000, audio_channels=1)
    prepared = qprep.preprocess_video(path, model_dir, fps=1)
    waveform = plain_audio_decode(path)
    assert prepared.mel_length == len(waveform) // 160 and prepared.metadata.audio_windows == 1
    assert prepared.metadata.audio_seconds == len(waveform) / 16000 >= (audio_seconds or seconds)
    processor = AutoProcessor.from_pretrained(model_dir)
    features = processor(text=[processor.audio_token], audio=[waveform], return_tensors="pt")
    assert torch.equal(prepared.input_features, features["input_features"])
    towers = Towers(open_checkpoint(model_dir), load_model_spec(model_dir), dtype="float32", device="cpu")
    tokens = towers.encode_audio([audio_input(prepared)])[0]
    n_window = json.loads((model_dir / "config.json").read_text())["thinker_config"]["audio_config"]["n_window"]
    assert tokens.shape[0] == int(_get_feat_extract_output_lengths(torch.tensor(prepared.mel_length), n_window))
    assert tokens.shape[0] >= 13 * int(audio_seconds or seconds)  # about 13 a second, all of the track
    with torch.inference_mode():
        expected = full_model(model_dir).get_audio_features(features["input_features"],
                                                            features["feature_attention_mask"]).last_hidden_state
    assert torch.equal(tokens, expected)


def test_a_videos_tokens_do_not_depend_on_its_batch_mates(tiny_model, videos):
    """Default budget: one video per tower call, so a batch gives each video the bits it gets alone,
    even where packing would not (identical 1 s tracks packed into one call move by an ulp)."""
    model_dir = tiny_model("qwen2_5_omni")
    towers = Towers(open_checkpoint(model_dir), load_model_spec(model_dir), dtype="float32", device="cpu")
    prepared = [qprep.preprocess_video(videos(name, **spec), model_dir, fps=2) for name, spec in CLIPS.items()]
    short = qprep.preprocess_video(videos("one-second.mp4", width=64, height=48, fps=10, seconds=1), model_dir, fps=2)
    prepared = prepared + prepared[::-1] + [short] * 6  # mixed sizes, both orders, identical short tracks
    one_by_one = [towers.encode_videos([video_input(p)])[0] for p in prepared]
    batched = towers.encode_videos([video_input(p) for p in prepared])
    assert all(torch.equal(a, b) for a, b in zip(batched, one_by_one))
    audio_one = [towers.encode_audio([audio_input(p)])[0] for p in prepared]
    audio_batched = towers.encode_audio([audio_input(p) for p in prepared])
    assert all(torch.equal(a, b) for a, b in zip(audio_batched, audio_one))

    # packing for throughput: each video still gets its own rows, equal up to kernel rounding
    towers.budget = Budget(video_patches=32768, audio_frames=8 * 30000)
    packed = towers.encode_videos([video_input(p) for p in prepared])
    packed_audio = towers.encode_audio([audio_input(p) for p in prepared])
    for ours, alone in zip(packed + packed_audio, one_by_one + audio_one):
        torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-6)


def test_only_the_files_holding_tower_weights_are_read(tiny_model, tmp_path):
    source = tiny_model("qwen2_5_omni")
    model_dir = shutil.copytree(source, tmp_path / "model")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    tower_files = {f for k, f in index.items() if k.startswith(("thinker.visual.", "thinker.audio_tower."))}
    other_files = set(index.values()) - tower_files
    assert other_files, "the tiny checkpoint must have files without tower weights"
    for name in other_files:  # the language model, talker and token2wav files become unreadable
        (model_dir / name).write_bytes(b"not safetensors")
    checkpoint = open_checkpoint(model_dir)
    towers = Towers(checkpoint, load_model_spec(model_dir), dtype="float32", device="cpu")
    original = Towers(open_checkpoint(source), load_model_spec(source), dtype="float32", device="cpu")
    for mine, theirs in zip(towers.state_dict().values(), original.state_dict().values()):
        assert torch.equal(mine, theirs)
    assert checkpoint.identity() == open_checkpoint(source).identity()


def test_identity_follows_the_tower_weights_not_the_location(tiny_model, tmp_path):
    source = tiny_model("qwen2_5_vl")
    moved = shutil.copytree(source, tmp_path / "moved")
    assert open_checkpoint(moved).identity() == open_checkpoint(source).identity()
    from qprep.models.tiny import make_tiny_model

    retrained = make_tiny_model("qwen2_5_vl", tmp_path / "retrained", seed=1)
    assert open_checkpoint(retrained).identity()["weights"] != open_checkpoint(source).identity()["weights"]


def test_bf16_tokens_survive_the_store_encoding_bit_for_bit(tiny_model, videos):
    model_dir = tiny_model("qwen2_5_vl")
    towers = Towers(open_checkpoint(model_dir), load_model_spec(model_dir), dtype="bfloat16", device="cpu")
    prepared = qprep.preprocess_video(videos("a.mp4", **CLIPS["a.mp4"]), model_dir, fps=2)
    tokens = towers.encode_videos([video_input(prepared)])[0]
    assert tokens.dtype == torch.bfloat16
    stored = to_storage(tokens)
    assert stored.dtype.name == "uint16"
    assert torch.equal(to_tensor(stored, torch.bfloat16), tokens)


def test_unknown_or_broken_models_are_refused_clearly(tmp_path):
    with pytest.raises(SettingsError, match="no config.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SettingsError, match="model_type 'llama' is not supported"):
        open_checkpoint(tmp_path)
    with pytest.raises(SettingsError, match="not a model directory"):
        open_checkpoint(tmp_path / "missing" / "dir")
