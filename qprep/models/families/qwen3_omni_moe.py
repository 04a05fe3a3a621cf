"""Qwen3-Omni (`qwen3_omni_moe`, and a bare thinker `qwen3_omni_moe_thinker`): a Qwen3-VL-style
vision tower with deepstack levels, an audio tower, and a MoE thinker; the talker and code2wav of the
full checkpoint are never read.

Block with the video's audio: `<|vision_start|><|audio_start|>`, then the video's and the audio's
placeholders merged one by one in time order, then `<|audio_end|><|vision_end|>`; without audio, the
plain block. Time is counted in position ids: the video tokens of temporal patch k sit at
`k · second_per_grid · position_id_per_seconds`, audio token j at j, and a video token goes first
when its time is `<=` the audio token's. No 2-second chunks (Qwen2.5-Omni's rule).

Two implementations of that rule exist upstream and they disagree. `Qwen3OmniMoeProcessor` compares
in float64 numpy, from its own `position_id_per_seconds` (a processor kwarg, default 13). The
thinker's `get_rope_index` compares in float32, after adding the block's start position to both
sides, from `config.position_id_per_seconds` (the config class defaults to 25; the releases hold 13).
Here the block follows the model: the same torch operations, the same start offset, the value read
from the one config object `get_rope_index` reads too. Wherever the two differ, the processor's
block gives some audio tokens video positions; `position_ids` refuses a batch where that happened.

Audio: the processor featurizes a track whole (padded to its own length, never cut), and the tower
attends within windows of `n_window_infer` mel frames, so a track of any length is encoded whole
(`audio_whole_track`). About 13 audio tokens per second (13 per 100 mel frames).
"""

from __future__ import annotations

from qprep.models.families import experts
from qprep.models.families.base import PlaceholderIds, plain_video_block
from qprep.models.families.qwen2_5_omni import QwenOmniFamily
from qprep.models.families.qwen3_vl import Deepstack

BOS_TOKENS = 2  # <|vision_start|><|audio_start|>: positions before the merged tokens


def audio_in_video_order(grid_thw, merge_size: int, second_per_grid: float, position_id_per_seconds,
                         audio_tokens: int, start: int) -> list[bool]:
    """For each placeholder of the merged block, in order: True for a video token, False for audio.

    `start`: the position of the block's first token (`<|vision_start|>`), an int or a scalar tensor
    of the model's position dtype (after an earlier block); the model adds it, plus the two opening
    tokens, to every time before it compares them."""
    import torch

    grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
    per_frame = (grid_h // merge_size) * (grid_w // merge_size)
    offset = torch.as_tensor(start) + BOS_TOKENS  # as get_rope_index's st_idx: int64, float after a block
    # get_rope_index: arange(grid_t) · float32(second_per_grid) · position_id_per_seconds, then
    # expanded over the frame's tokens, made float, and offset
    times = (torch.arange(grid_t) * torch.tensor(second_per_grid).float() * position_id_per_seconds).float()
    video = times.view(-1, 1).expand(-1, per_frame).flatten().float() + offset
    audio = torch.arange(audio_tokens) + offset
    order: list[bool] = []
    v = a = 0
    while v < len(video) and a < len(audio):
        if bool(video[v] <= audio[a]):
            order.append(True)
            v += 1
        else:
            order.append(False)
            a += 1
    return order + [True] * (len(video) - v) + [False] * (len(audio) - a)


class Qwen3OmniFamily(Deepstack, QwenOmniFamily):
    """Qwen2.5-Omni's positions and checks; its own placeholders, time-merged block and audio lengths."""

    def placeholder_ids(self, tokenizer) -> PlaceholderIds:
        get = tokenizer.convert_tokens_to_ids
        return PlaceholderIds(get("<|vision_start|>"), get("<|vision_end|>"), get("<|video_pad|>"), get("<|audio_pad|>"),
                              get("<|audio_start|>"), get("<|audio_end|>"), get("<|image_pad|>"))

    def media_token_ids(self, config) -> tuple[int, int | None]:
        return config.video_token_id, config.audio_token_id

    def image_token_id(self, config) -> int:
        return config.image_token_id

    def video_block(self, layout, row, start=0) -> list[int]:
        ids = layout.ids
        audio_tokens = row.audio_length or 0
        if not audio_tokens:
            return plain_video_block(row.grid_thw, ids, layout.merge_size)
        order = audio_in_video_order(row.grid_thw, layout.merge_size, row.second_per_grid,
                                     layout.config.position_id_per_seconds, audio_tokens, start)
        return ([ids.vision_start, ids.audio_start] + [ids.video if video else ids.audio for video in order]
                + [ids.audio_end, ids.vision_end])

    def audio_token_counts(self, audio_tower, mel_lengths):
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

        return _get_feat_extract_output_lengths(mel_lengths, audio_tower.n_window)



_CLASSES = dict(
    module="transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe",
    vision_class="Qwen3OmniMoeVisionEncoder",
    audio_class="Qwen3OmniMoeAudioEncoder",
    feature_class="Qwen3OmniMoeThinkerModel",
    text_class="Qwen3OmniMoeThinkerTextModel",
    # The experts are fused 3-D parameters (as Qwen3-VL-MoE's): attention by default, `experts` on request.
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    # the releases and save_pretrained store one tensor per expert
    weight_conversions=(experts.per_expert,),
    audio_whole_track=True,
)

QWEN3_OMNI_MOE = Qwen3OmniFamily(
    name="qwen3_omni_moe",
    full_model=("Qwen3OmniMoeForConditionalGeneration", "thinker"),
    thinker_key="thinker_config",
    vision_prefixes=("thinker.visual.", "thinker.model.visual."),
    audio_prefixes=("thinker.audio_tower.", "thinker.model.audio_tower."),
    text_prefixes=("thinker.model.language_model.", "thinker.model."),
    lm_head_prefixes=("thinker.lm_head.",),
    **_CLASSES,
)

QWEN3_OMNI_MOE_THINKER = Qwen3OmniFamily(
    name="qwen3_omni_moe_thinker",
    full_model=("Qwen3OmniMoeThinkerForConditionalGeneration", None),
    thinker_key=None,
    vision_prefixes=("visual.", "model.visual.", "thinker.visual."),
    audio_prefixes=("audio_tower.", "model.audio_tower.", "thinker.audio_tower."),
    text_prefixes=("model.language_model.", "model."),
    lm_head_prefixes=("lm_head.",),
    **_CLASSES,
)
