"""Qwen3-Omni (`qwen3_omni_moe`): the token layout of a video with the audio inside it.

Not a registered family yet: its towers and training path are still to come. What is here is the
part every later piece depends on, the audio-in-video block, in the model's arithmetic.

Block: `<|vision_start|><|audio_start|>`, then the video's and the audio's placeholders merged one by
one in time order, then `<|audio_end|><|vision_end|>`. Time is counted in position ids:
the video tokens of temporal patch k sit at `k · second_per_grid · position_id_per_seconds`, audio
token j at j, and a video token goes first when its time is `<=` the audio token's.

Two implementations of that rule exist upstream and they disagree. `Qwen3OmniMoeProcessor` compares
in float64 numpy, from its own `position_id_per_seconds` (a processor kwarg, default 13). The
thinker's `get_rope_index` compares in float32, after adding the block's start position to both
sides, from `config.position_id_per_seconds` (the config class defaults to 25). Here the block
follows the model: the same torch operations, the same start offset, the value from the model
config. Wherever the two differ, the processor's block gives some audio tokens video positions.
"""

from __future__ import annotations

import torch

BOS_TOKENS = 2  # <|vision_start|><|audio_start|>: positions before the merged tokens


def audio_in_video_order(grid_thw, merge_size: int, second_per_grid: float, position_id_per_seconds,
                         audio_tokens: int, start: int) -> list[bool]:
    """For each placeholder of the merged block, in order: True for a video token, False for audio.

    `start`: the position of the block's first token (`<|vision_start|>`); the model adds it, plus
    the two opening tokens, to every time before it compares them."""
    grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
    per_frame = (grid_h // merge_size) * (grid_w // merge_size)
    offset = torch.tensor(start + BOS_TOKENS)  # int64, as get_rope_index's st_idx
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
