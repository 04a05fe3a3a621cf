"""Qwen2.5-VL (`qwen2_5_vl`): a vision tower, no audio.

Block: `<|vision_start|>` + `<|video_pad|>` × (t·h·w / merge²) + `<|vision_end|>`. Time reaches the
model through the temporal positions (`second_per_grid_ts` × `tokens_per_second`) of `get_rope_index`,
which also needs `mm_token_type_ids` (video tokens are type 2, as the processor marks them).
"""

from __future__ import annotations

from qprep.models.families.base import Family, PlaceholderIds, as_cpu, plain_video_block, token_types

IMAGE_TOKEN_TYPE, VIDEO_TOKEN_TYPE = 1, 2  # what the processor's mm_token_type_ids holds at an image / video token


class QwenVLFamily(Family):
    def placeholder_ids(self, tokenizer) -> PlaceholderIds:
        get = tokenizer.convert_tokens_to_ids
        return PlaceholderIds(get("<|vision_start|>"), get("<|vision_end|>"), get("<|video_pad|>"),
                              image=get("<|image_pad|>"))

    def media_token_ids(self, config) -> tuple[int, int | None]:
        return config.video_token_id, None

    def video_block(self, layout, row, start=0) -> list[int]:
        return plain_video_block(row.grid_thw, layout.ids, layout.merge_size)

    # whether `get_rope_index` takes the time per temporal patch (`second_per_grid_ts`): Qwen2.5-VL's
    # does; Qwen2-VL's and Qwen3-VL's count patches (Qwen3-VL puts time in the text)
    positions_take_time = True

    def position_ids(self, rope_model, batch, config):
        ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
        types = token_types(ids, config, VIDEO_TOKEN_TYPE, IMAGE_TOKEN_TYPE)
        time = {"second_per_grid_ts": as_cpu(batch.second_per_grid)} if self.positions_take_time else {}
        positions, _ = rope_model.get_rope_index(ids, types, image_grid_thw=as_cpu(batch.image_grid_thw),
                                                 video_grid_thw=as_cpu(batch.video_grid_thw), attention_mask=mask,
                                                 **time)
        return positions


QWEN2_5_VL = QwenVLFamily(
    name="qwen2_5_vl",
    module="transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    vision_class="Qwen2_5_VisionTransformerPretrainedModel",
    audio_class=None,
    feature_class="Qwen2_5_VLModel",
    text_class="Qwen2_5_VLTextModel",
    full_model=("Qwen2_5_VLForConditionalGeneration", None),
    thinker_key=None,
    # The hub checkpoints use `visual.*`; checkpoints saved by other tools may nest it.
    vision_prefixes=("visual.", "model.visual."),
    audio_prefixes=(),
    text_prefixes=("model.language_model.", "model."),
    lm_head_prefixes=("lm_head.",),
    window_attention=True,
)
