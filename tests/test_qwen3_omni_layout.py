"""Qwen3-Omni's audio-in-video block, against the thinker's own `get_rope_index` and the processor's
own layout (`Qwen3OmniMoeProcessor.replace_video_with_audio_token`), on a tiny checkpoint.

qprep's order follows the model: every audio token gets an audio position (the same on all three
axes, one apart). The processor decides the same order in float64 without the block's start
offset; the scan below lists every (frames, seconds) pair where that differs, and checks that
there the processor's block does give audio tokens video positions.
"""

from __future__ import annotations

import pytest
import torch

from qprep.models.families.qwen2_5_omni import check_audio_positions
from qprep.models.families.qwen3_omni_moe import audio_in_video_order
from qprep.schemas.manifest import ManifestRow

TEXT_BEFORE = 17  # tokens ahead of the block: the model offsets every time by the block's start
GRID_HW = (4, 6)  # patches: 2 × 3 merged tokens per temporal patch


@pytest.fixture(scope="module")
def omni(tiny_model):
    import transformers
    from transformers import AutoProcessor

    model_dir = tiny_model("qwen3_omni_moe")
    config = transformers.AutoConfig.from_pretrained(model_dir).thinker_config
    with torch.device("meta"):
        thinker = transformers.Qwen3OmniMoeThinkerForConditionalGeneration(config)
    return thinker, AutoProcessor.from_pretrained(model_dir)


def audio_tokens(mel_frames: int, config) -> int:
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    return int(_get_feat_extract_output_lengths(torch.tensor(mel_frames), config.audio_config.n_window))


def ids_of(order: list[bool], thinker) -> torch.Tensor:
    config = thinker.config
    block = [config.vision_start_token_id, config.audio_start_token_id]
    block += [config.video_token_id if video else config.audio_token_id for video in order]
    block += [config.audio_end_token_id, config.vision_end_token_id]
    return torch.tensor([[0] * TEXT_BEFORE + block + [0] * 5])


def positions(thinker, ids, frames: int, seconds: float, mel_frames: int) -> torch.Tensor:
    second_per_grid = 2 / (frames / seconds)
    out, _ = thinker.get_rope_index(ids, video_grid_thw=torch.tensor([[frames // 2, *GRID_HW]]),
                                    attention_mask=torch.ones_like(ids), use_audio_in_video=True,
                                    audio_seqlens=torch.tensor([mel_frames]),
                                    second_per_grids=torch.tensor([second_per_grid]))
    return out


def processors_order(processor, frames: int, seconds: float, audio: int, per_second) -> list[bool]:
    text = processor.replace_video_with_audio_token(
        {"video_grid_thw": torch.tensor([[frames // 2, *GRID_HW]]), "video_second_per_grid": [2 / (frames / seconds)]},
        0, {"num_audio_tokens": [audio]}, 0, position_id_per_seconds=per_second)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"][1:-1]  # inside the audio markers
    video = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    return [token == video for token in ids]


PAIRS = [(frames, seconds) for frames in (4, 8, 16, 20, 34, 50, 66, 100) for seconds in (1.5, 2, 3.7, 7, 13, 39, 60)]


def test_every_audio_token_gets_an_audio_position_in_qprep_layout(omni):
    thinker, _ = omni
    per_second = thinker.config.position_id_per_seconds
    for frames, seconds in PAIRS + [(100, 180)]:  # the seed recipe: 100 frames over 180 s
        mel = int(seconds * 100)
        audio = audio_tokens(mel, thinker.config)
        order = audio_in_video_order((frames // 2, *GRID_HW), 2, 2 / (frames / seconds), per_second, audio,
                                     start=TEXT_BEFORE)
        assert order.count(False) == audio and order.count(True) == frames // 2 * 6
        ids = ids_of(order, thinker)
        check_audio_positions(positions(thinker, ids, frames, seconds, mel), ids == thinker.config.audio_token_id)


def test_the_processors_layout_differs_only_where_it_breaks_the_models_positions(omni):
    thinker, processor = omni
    per_second = thinker.config.position_id_per_seconds
    differ = []
    for frames, seconds in PAIRS + [(100, 180)]:
        mel = int(seconds * 100)
        audio = audio_tokens(mel, thinker.config)
        ours = audio_in_video_order((frames // 2, *GRID_HW), 2, 2 / (frames / seconds), per_second, audio,
                                    start=TEXT_BEFORE)
        theirs = processors_order(processor, frames, seconds, audio, per_second)
        if theirs != ours:
            differ.append((frames, seconds))
            ids = ids_of(theirs, thinker)
            with pytest.raises(AssertionError, match="audio tokens got non-audio positions"):
                check_audio_positions(positions(thinker, ids, frames, seconds, mel), ids == thinker.config.audio_token_id)
    print(f"the processor's audio-in-video layout disagrees with the model's positions for {len(differ)} of "
          f"{len(PAIRS) + 1} (frames, seconds) pairs: {differ}")


def test_position_id_per_seconds_comes_from_the_checkpoint_not_a_class_default(omni):
    """The released config holds 13; the config classes default to 25 (the processor to 13)."""
    thinker, processor = omni
    assert thinker.config.position_id_per_seconds == 13
    assert type(thinker.config)().position_id_per_seconds == 25


def test_the_layout_and_the_positions_read_position_id_per_seconds_from_the_same_checkpoint_config(tiny_model,
                                                                                                   tmp_path):
    """One value from one place: a checkpoint whose config says 25 is laid out and positioned at 25
    (the block changes with it), and a layout made with another value than the model's is refused."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from qprep.models.checkpoint import open_checkpoint
    from qprep.train.model import Batch, LanguageModel

    source = tiny_model("qwen3_omni_moe", "released")
    changed = shutil.copytree(source, tmp_path / "at-25")
    config = json.loads((changed / "config.json").read_text())
    assert config["thinker_config"]["position_id_per_seconds"] == 13
    config["thinker_config"]["position_id_per_seconds"] = 25
    (changed / "config.json").write_text(json.dumps(config))

    frames, seconds = 20, 7  # second_per_grid 0.7: audio and video interleave differently at 13 and 25
    row = ManifestRow(id="v", path="v.mp4", grid_thw=[frames // 2, *GRID_HW], second_per_grid=2 / (frames / seconds),
                      audio_length=0)
    mel = seconds * 100
    blocks, models = {}, {}
    for name, model_dir in (("13", source), ("25", changed)):
        checkpoint = open_checkpoint(model_dir)
        layout = checkpoint.family.prompt_layout(checkpoint, AutoTokenizer.from_pretrained(model_dir))
        models[name] = LanguageModel(checkpoint)
        assert layout.config.position_id_per_seconds == models[name].config.position_id_per_seconds == int(name)
        row.audio_length = audio_tokens(mel, layout.config)
        blocks[name] = layout.video_block(row, start=TEXT_BEFORE)
    assert blocks["13"] != blocks["25"]

    def batch(block):
        ids = torch.tensor([[0] * TEXT_BEFORE + block + [0] * 5])
        return Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, video_tokens=torch.zeros(0),
                     video_grid_thw=torch.tensor([row.grid_thw]), second_per_grid=torch.tensor([row.second_per_grid]),
                     audio_tokens=torch.zeros(row.audio_length, 1), mel_lengths=torch.tensor([mel]),
                     audio_in_video=True)

    for name in ("13", "25"):
        models[name].position_ids(batch(blocks[name]))  # each block fits its own model's positions
    with pytest.raises(AssertionError, match="audio tokens got non-audio positions"):
        models["13"].position_ids(batch(blocks["25"]))
