"""The token layout of a video (and its audio) in a prompt, against transformers' processors and the
model's own `get_rope_index`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor

from qprep.models.families import FAMILIES, PlaceholderIds, PromptLayout
from qprep.schemas.manifest import ManifestRow
from reference import full_model

OMNI, VL = FAMILIES["qwen2_5_omni"], FAMILIES["qwen2_5_vl"]


def block_of(family, ids, config, grid, second_per_grid, audio_tokens=0) -> list[int]:
    """qprep's block for a video of this grid, time per grid and audio length (a manifest row's facts)."""
    layout = PromptLayout(family=family, ids=ids, config=config, merge_size=2, pad_id=0, turn_end_id=0)
    return layout.video_block(ManifestRow(id="v", path="v.mp4", grid_thw=list(grid), second_per_grid=second_per_grid,
                                          audio_length=audio_tokens))


def omni_block(thinker, grid, ids, second_per_grid, audio_tokens) -> list[int]:
    """qprep's Omni block, with the numbers of the thinker's own config."""
    return block_of(OMNI, ids, thinker.config, grid, second_per_grid, audio_tokens)


def omni_ids(processor) -> PlaceholderIds:
    tok = processor.tokenizer
    get = tok.convert_tokens_to_ids
    return PlaceholderIds(vision_start=get("<|vision_bos|>"), vision_end=get("<|vision_eos|>"), video=get("<|VIDEO|>"),
                          audio=get("<|AUDIO|>"), audio_start=get("<|audio_bos|>"), audio_end=get("<|audio_eos|>"))


def processor_block(processor, grid_thw, second_per_grid, audio_tokens) -> list[int]:
    """What Qwen2_5OmniProcessor writes for a video with its audio (its float64 chunking)."""
    text = processor.replace_video_with_audio_token(
        {"video_grid_thw": [list(grid_thw)], "video_second_per_grid": [second_per_grid]}, 0,
        {"num_audio_tokens": [audio_tokens]}, 0, position_id_per_seconds=25, seconds_per_chunk=2)
    return processor.tokenizer.convert_tokens_to_ids(
        ["<|vision_bos|>"] + processor.tokenizer.tokenize(text) + ["<|vision_eos|>"])


def audio_tokens_for(mel_frames: int) -> int:
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def rope_positions(thinker, block, grid_thw, second_per_grid, mel_frames):
    ids = torch.tensor([[1, 2] + block + [3]])
    positions, _ = thinker.get_rope_index(
        ids, video_grid_thw=torch.tensor([grid_thw]), attention_mask=torch.ones_like(ids), use_audio_in_video=True,
        audio_seqlens=torch.tensor([mel_frames]), second_per_grids=torch.tensor([second_per_grid]))
    return ids[0], positions[:, 0]


@pytest.fixture(scope="module")
def omni(tiny_model):
    model_dir = tiny_model("qwen2_5_omni")
    thinker = full_model(model_dir)
    return AutoProcessor.from_pretrained(model_dir), thinker


@pytest.mark.parametrize("frames, seconds", [(16, 8.0), (8, 3.0), (50, 61.3), (100, 37.5), (100, 120.0)])
def test_omni_layout_equals_the_processor_where_its_arithmetic_agrees(omni, frames, seconds):
    processor, thinker = omni
    grid = (frames // 2, 4, 6)
    second_per_grid = 2 / (frames / seconds)
    audio = audio_tokens_for(int(seconds * 100))
    ours = omni_block(thinker, grid, omni_ids(processor), second_per_grid, audio)
    assert ours == processor_block(processor, grid, second_per_grid, audio)
    assert ours.count(omni_ids(processor).video) == grid[0] * 6 and ours.count(omni_ids(processor).audio) == audio


@pytest.mark.parametrize("frames, seconds", [(66, 39.0), (100, 180.0)])
def test_every_token_gets_a_position_of_its_own_kind_where_the_processor_errs(omni, frames, seconds):
    """The processor (float64) and get_rope_index (float32) cut chunks differently for these, and
    the processor's layout hands audio tokens video positions. 100 frames over 180 s is the seed
    recipe's own setting."""
    processor, thinker = omni
    ids = omni_ids(processor)
    grid, mel = (frames // 2, 4, 4), int(seconds * 100)
    second_per_grid = 2 / (frames / seconds)
    audio = audio_tokens_for(mel)
    theirs = processor_block(processor, grid, second_per_grid, audio)
    ours = omni_block(thinker, grid, ids, second_per_grid, audio)
    assert theirs != ours, "the known upstream disagreement should show here"

    def audio_positions_are_audio(block) -> bool:
        tokens, positions = rope_positions(thinker, block, grid, second_per_grid, mel)
        audio_at = positions[:, tokens == ids.audio]
        same_in_all_axes = bool((audio_at[0] == audio_at[1]).all() and (audio_at[1] == audio_at[2]).all())
        return same_in_all_axes and bool((audio_at[0].diff() == 1).all())

    assert audio_positions_are_audio(ours)
    assert not audio_positions_are_audio(theirs)


def test_vl_and_silent_blocks():
    ids = PlaceholderIds(vision_start=10, vision_end=11, video=12)
    assert block_of(VL, ids, None, (4, 6, 8), 1.0) == [10] + [12] * 48 + [11]
    assert block_of(OMNI, ids, None, (4, 6, 8), 1.0, audio_tokens=0) == [10] + [12] * 48 + [11]


def test_the_language_model_refuses_a_block_that_gives_audio_tokens_video_positions(omni, tiny_model):
    """The processor's block for 66 frames over 39 s, fed to qprep's language model, is caught."""
    import torch

    from qprep.models.checkpoint import open_checkpoint
    from qprep.train.model import Batch, LanguageModel

    processor, thinker = omni
    ids = omni_ids(processor)
    grid, mel, second_per_grid = (33, 4, 4), 3900, 2 / (66 / 39.0)
    audio = audio_tokens_for(mel)
    model = LanguageModel(open_checkpoint(tiny_model("qwen2_5_omni")))

    def batch(block):
        input_ids = torch.tensor([block])
        return Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids,
                     video_tokens=torch.zeros(0), video_grid_thw=torch.tensor([grid]),
                     second_per_grid=torch.tensor([second_per_grid], dtype=torch.float64),
                     audio_tokens=torch.zeros(audio, 1), mel_lengths=torch.tensor([mel]), audio_in_video=True)

    model.position_ids(batch(omni_block(thinker, grid, ids, second_per_grid, audio)))
    with pytest.raises(AssertionError, match="non-audio positions"):
        model.position_ids(batch(processor_block(processor, grid, second_per_grid, audio)))


def test_qwen2_vl_temporal_ids_count_patches_whatever_their_time(tiny_model):
    """Qwen2-VL's `get_rope_index` has no time scale: 50 frames over 180 s (3.6 s a temporal patch)
    and over 10 s (0.2 s) get the same positions, temporal id start + k for patch k. Qwen2.5-VL's,
    on the same grid, spreads the slow clip's patches apart."""
    from qprep.models.checkpoint import open_checkpoint
    from qprep.models.tiny import token_ids
    from qprep.train.model import Batch, LanguageModel

    grid = (25, 4, 6)

    def positions(kind, second_per_grid):
        model = LanguageModel(open_checkpoint(tiny_model(kind)))
        get = token_ids(kind)
        ids = PlaceholderIds(get["<|vision_start|>"], get["<|vision_end|>"], get["<|video_pad|>"])
        block = block_of(model.family, ids, model.config, grid, second_per_grid)
        input_ids = torch.tensor([[get["user"]] + block + [get["<|im_end|>"]]])
        batch = Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids,
                      video_tokens=torch.zeros(0), video_grid_thw=torch.tensor([grid]),
                      second_per_grid=torch.tensor([second_per_grid], dtype=torch.float64))
        return model.position_ids(batch)[:, 0], input_ids[0] == ids.video

    slow, video = positions("qwen2_vl", 3.6)
    fast, _ = positions("qwen2_vl", 0.2)
    assert torch.equal(slow, fast)
    start = 2  # after the text token and <|vision_start|>
    assert slow[0][video].tolist() == [start + k for k in range(grid[0]) for _ in range(grid[1] * grid[2] // 4)]
    vl_slow, _ = positions("qwen2_5_vl", 3.6)
    vl_fast, _ = positions("qwen2_5_vl", 0.2)
    assert not torch.equal(vl_slow[0][video], vl_fast[0][video])
