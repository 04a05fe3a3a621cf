"""The token layout of a cached video inside a prompt: which placeholder ids go where.

Qwen2.5-VL: `<|vision_start|>` + `<|video_pad|>` × (t·h·w/merge²) + `<|vision_end|>`.

Qwen2.5-Omni with the video's audio: `<|vision_bos|><|audio_bos|> V0 A0 V1 A1 … <|audio_eos|><|vision_eos|>`,
where Vk / Ak are the video and audio tokens whose time positions fall in the k-th chunk of
`position_id_per_seconds × seconds_per_chunk` (25 × 2 = 50) position ids.

The chunks are cut with the model's own arithmetic (`get_rope_index`: float32 time positions,
truncated), not the processor's (float64). The two disagree for some frame counts and durations
(66 frames over 39 s is one); with the processor's layout the model then gives audio tokens video
positions, silently. Laid out here, every token gets the position of its own kind (tested against
`get_rope_index`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlaceholderIds:
    """The tokenizer's ids of the placeholders (they are also in the model config)."""

    vision_start: int  # <|vision_start|> (VL) / <|vision_bos|> (Omni)
    vision_end: int
    video: int  # <|video_pad|> (VL) / <|VIDEO|> (Omni)
    audio: int | None = None  # <|AUDIO|> (Omni)
    audio_start: int | None = None  # <|audio_bos|>
    audio_end: int | None = None  # <|audio_eos|>


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


def video_block(grid_thw: tuple[int, int, int], ids: PlaceholderIds, *, merge_size: int = 2,
                second_per_grid: float = 0.0, audio_tokens: int = 0, position_id_per_seconds: int = 25,
                seconds_per_chunk: int = 2) -> list[int]:
    """The ids that stand for one video (and its audio, when `audio_tokens` > 0) in a prompt."""
    grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
    per_group = (grid_h // merge_size) * (grid_w // merge_size)
    if not audio_tokens:
        return [ids.vision_start] + [ids.video] * (grid_t * per_group) + [ids.vision_end]
    per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    video_times = np.repeat(video_time_positions(grid_t, second_per_grid, position_id_per_seconds), per_group)
    video_chunks = chunk_bounds(video_times, per_chunk)
    audio_chunks = chunk_bounds(np.arange(audio_tokens), per_chunk)
    block = [ids.vision_start, ids.audio_start]
    for j in range(max(len(video_chunks), len(audio_chunks))):
        if j < len(video_chunks):
            block += [ids.video] * (video_chunks[j][1] - video_chunks[j][0])
        if j < len(audio_chunks):
            block += [ids.audio] * (audio_chunks[j][1] - audio_chunks[j][0])
    return block + [ids.audio_end, ids.vision_end]
