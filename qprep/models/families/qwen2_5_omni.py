"""Qwen2.5-Omni (`qwen2_5_omni`, and a bare thinker `qwen2_5_omni_thinker`): vision and audio towers.

Block with the video's audio: `<|vision_bos|><|audio_bos|> V0 A0 V1 A1 … <|audio_eos|><|vision_eos|>`,
where Vk / Ak are the video and audio tokens whose time positions fall in the k-th chunk of
`position_id_per_seconds × seconds_per_chunk` (25 × 2 = 50) position ids; without audio, the plain
block with `<|vision_bos|>`, `<|VIDEO|>`, `<|vision_eos|>`.

The chunks are cut with the model's own arithmetic (`get_rope_index`: float32 time positions,
truncated), not the processor's (float64). The two disagree for some frame counts and durations
(66 frames over 39 s is one); with the processor's layout the model then gives audio tokens video
positions, silently. Laid out here, every token gets the position of its own kind (tested against
`get_rope_index`), and `position_ids` refuses a batch where one did not. Both read
`position_id_per_seconds` and `seconds_per_chunk` from the same config object.
"""

from __future__ import annotations

import numpy as np

from qprep.models.families.base import Family, PlaceholderIds, as_cpu, plain_video_block


class QwenOmniFamily(Family):
    def placeholder_ids(self, tokenizer) -> PlaceholderIds:
        get = tokenizer.convert_tokens_to_ids
        return PlaceholderIds(get("<|vision_bos|>"), get("<|vision_eos|>"), get("<|VIDEO|>"), get("<|AUDIO|>"),
                              get("<|audio_bos|>"), get("<|audio_eos|>"), get("<|IMAGE|>"))

    def media_token_ids(self, config) -> tuple[int, int | None]:
        return config.video_token_index, config.audio_token_index

    def image_token_id(self, config) -> int:
        return config.image_token_index

    def video_block(self, layout, row, start=0) -> list[int]:
        ids, config, merge_size = layout.ids, layout.config, layout.merge_size
        audio_tokens = row.audio_length or 0
        if not audio_tokens:
            return plain_video_block(row.grid_thw, ids, merge_size)
        second_per_grid = row.second_per_grid
        grid_t, grid_h, grid_w = (int(v) for v in row.grid_thw)
        per_second = config.position_id_per_seconds
        per_chunk = int(per_second * config.seconds_per_chunk)
        video_times = np.repeat(video_time_positions(grid_t, second_per_grid, per_second),
                                (grid_h // merge_size) * (grid_w // merge_size))
        video_chunks = chunk_bounds(video_times, per_chunk)
        audio_chunks = chunk_bounds(np.arange(audio_tokens), per_chunk)
        block = [ids.vision_start, ids.audio_start]
        for j in range(max(len(video_chunks), len(audio_chunks))):
            if j < len(video_chunks):
                block += [ids.video] * (video_chunks[j][1] - video_chunks[j][0])
            if j < len(audio_chunks):
                block += [ids.audio] * (audio_chunks[j][1] - audio_chunks[j][0])
        return block + [ids.audio_end, ids.vision_end]

    def audio_token_counts(self, audio_tower, mel_lengths):
        return audio_tower._get_feat_extract_output_lengths(mel_lengths)[1]

    def position_ids(self, rope_model, batch, config):
        """The thinker's `get_rope_index` with the audio in the video (Qwen3-Omni's gives float
        positions: its audio-in-video times are not whole numbers), checked as `check_audio_positions` says."""
        ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
        use_audio = batch.audio_in_video
        positions, _ = rope_model.get_rope_index(
            ids, image_grid_thw=as_cpu(batch.image_grid_thw), video_grid_thw=as_cpu(batch.video_grid_thw),
            attention_mask=mask, use_audio_in_video=use_audio,
            audio_seqlens=as_cpu(batch.mel_lengths) if use_audio else None,
            second_per_grids=as_cpu(batch.second_per_grid))
        if use_audio:
            check_audio_positions(positions, ids == self.media_token_ids(config)[1], ids == config.audio_start_token_id)
        return positions


def video_time_positions(grid_t: int, second_per_grid: float, position_id_per_seconds: int) -> np.ndarray:
    """Temporal position of each frame group, as `get_rope_index` computes it: float32, truncated."""
    product = np.arange(grid_t, dtype=np.float32) * np.float32(second_per_grid) * np.float32(position_id_per_seconds)
    return product.astype(np.int64)


def chunk_bounds(values: np.ndarray, tokens_per_chunk: int) -> list[tuple[int, int]]:
    """[start, end) slices of a non-decreasing sequence, a new slice each time a value reaches the next
    multiple of `tokens_per_chunk` (one boundary per crossing, as the model's `get_chunked_index`)."""
    bounds, start, chunk = [], 0, 1
    for index, value in enumerate(values.tolist()):
        if value >= chunk * tokens_per_chunk:
            bounds.append((start, index))
            start, chunk = index, chunk + 1
    bounds.append((start, len(values)))
    return bounds


def check_audio_positions(positions, is_audio, opens_audio=None) -> None:
    """Every audio token must get an audio position: the same in all three axes, one apart in time
    order within its block (`opens_audio`: where each block's audio starts; None: one block). Upstream's float64
    chunking breaks this silently for some frame counts and durations (66 frames over 39 s); a layout
    that did so here would train on wrong positions."""
    import torch

    for row in range(positions.shape[1]):
        audio = positions[:, row, is_audio[row]]
        if opens_audio is None:
            within = torch.ones(max(0, audio.shape[-1] - 1), dtype=torch.bool)
        else:
            within = opens_audio[row].cumsum(0)[is_audio[row]].diff() == 0  # pairs in one block
        if not (bool((audio[0] == audio[1]).all() and (audio[1] == audio[2]).all())
                and bool((audio[0].diff()[within] == 1).all())):
            raise AssertionError(f"batch row {row}: audio tokens got non-audio positions; the video block "
                                 "does not follow the model's audio-in-video chunking")


_OMNI_CLASSES = dict(
    module="transformers.models.qwen2_5_omni.modeling_qwen2_5_omni",
    vision_class="Qwen2_5OmniVisionEncoder",
    audio_class="Qwen2_5OmniAudioEncoder",
    feature_class="Qwen2_5OmniThinkerModel",
    text_class="Qwen2_5OmniThinkerTextModel",
    window_attention=True,
)

QWEN2_5_OMNI = QwenOmniFamily(
    name="qwen2_5_omni",
    full_model=("Qwen2_5OmniForConditionalGeneration", "thinker"),
    thinker_key="thinker_config",
    vision_prefixes=("thinker.visual.",),
    audio_prefixes=("thinker.audio_tower.",),
    text_prefixes=("thinker.model.",),
    lm_head_prefixes=("thinker.lm_head.",),
    **_OMNI_CLASSES,
)

QWEN2_5_OMNI_THINKER = QwenOmniFamily(
    name="qwen2_5_omni_thinker",
    full_model=("Qwen2_5OmniThinkerForConditionalGeneration", None),
    thinker_key=None,
    vision_prefixes=("visual.", "model.visual.", "thinker.visual."),
    audio_prefixes=("audio_tower.", "model.audio_tower.", "thinker.audio_tower."),
    text_prefixes=("model.language_model.", "model."),
    lm_head_prefixes=("lm_head.",),
    **_OMNI_CLASSES,
)
