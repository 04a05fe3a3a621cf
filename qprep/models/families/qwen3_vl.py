"""Qwen3-VL (`qwen3_vl`, and the MoE `qwen3_vl_moe`): a vision tower with deepstack levels, no audio.

Block: for each temporal patch k, `<{t_k:.1f} seconds><|vision_start|>` + `<|video_pad|>` × (h·w /
merge²) + `<|vision_end|>`, in place of the chat template's whole
`<|vision_start|><|video_pad|><|vision_end|>`: each patch carries its own pair, so the template's
does not wrap them (`Qwen3VLProcessor` collapses it, as the processor Qwen3-VL was released with
did). Time reaches the model only through that text: `get_rope_index` splits the grid into one
(1, h, w) row per temporal patch and gives every patch the same temporal positions.

t_k is the mean time of the patch's first and last frame, as `Qwen3VLProcessor` computes it
(`(t_a + t_b) / 2`, Python floats, printed with `.1f`). The processor derives frame times from
`frames_indices / fps` of the metadata it is handed (24 fps when it has none); qprep takes them from
the sampled frames' presentation timestamps, computed exactly (`qprep.pipeline.probe`), so on a
constant-rate stream they are the processor's own numbers given the true metadata, and on a
variable-rate stream they are the frames' real times, which no (indices, fps) pair expresses.

The vision tower also returns one `[n, d]` feature map per `deepstack_visual_indexes` entry; the
language model adds level i to the hidden states at the visual positions after decoder layer i.
They are cached beside the merged tokens and handed back as `visual_pos_masks` +
`deepstack_visual_embeds`, as the model's own forward does.

Frame size: `Qwen3VLVideoProcessor`'s `size` bounds the pixels of the whole clip (all frames),
not of one frame (`Family.pixel_bounds_per_clip`).
"""

from __future__ import annotations

from qprep.models.families import experts
from qprep.models.families.base import ATTENTION_AND_MLP
from qprep.models.families.qwen2_5_vl import QwenVLFamily


def patch_times(frame_times, temporal_patch_size: int) -> list[float]:
    """The time each temporal patch stands for: the mean of its first and last frame's time (the
    clip padded with its last frame, as the processor pads it)."""
    times = [float(t) for t in frame_times]
    if pad := -len(times) % temporal_patch_size:
        times += [times[-1]] * pad
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def time_stamp(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"


class Deepstack:
    """What a family whose vision tower has deepstack levels tells the store and the language model
    (mixed into Qwen3-VL's and Qwen3-Omni's families)."""

    def deepstack_levels(self, config) -> int:
        return len(getattr(config.vision_config, "deepstack_visual_indexes", None) or ())

    def text_model_inputs(self, batch, config) -> dict:
        if batch.deepstack is None:
            return {}
        # images' and videos' levels are cached in placeholder order, the order of their positions
        visual = (batch.input_ids == config.video_token_id) | (batch.input_ids == self.image_token_id(config))
        return {"visual_pos_masks": visual, "deepstack_visual_embeds": list(batch.deepstack)}


class Qwen3VLFamily(Deepstack, QwenVLFamily):
    """Qwen2.5-VL's placeholders and token types; its own block (time as text), and positions that
    count temporal patches (no `second_per_grid_ts`)."""

    positions_take_time = False

    def video_block(self, layout, row, start=0) -> list[int]:
        ids = layout.ids
        grid_t, grid_h, grid_w = (int(v) for v in row.grid_thw)
        per_patch = (grid_h // layout.merge_size) * (grid_w // layout.merge_size)
        times = patch_times(row.frame_times, layout.config.vision_config.temporal_patch_size)
        if len(times) != grid_t:
            raise ValueError(f"video {row.id}: {len(times)} temporal patches of frame times for a grid of {grid_t}")
        block = []
        for seconds in times:
            block += layout.text_ids(time_stamp(seconds)) + [ids.vision_start] + [ids.video] * per_patch + [ids.vision_end]
        return block


QWEN3_CHECKPOINT = dict(
    audio_class=None,
    thinker_key=None,
    vision_prefixes=("model.visual.",),
    audio_prefixes=(),
    text_prefixes=("model.language_model.",),
    lm_head_prefixes=("lm_head.",),
    pixel_bounds_per_clip=True,
)

QWEN3_VL = Qwen3VLFamily(
    name="qwen3_vl",
    module="transformers.models.qwen3_vl.modeling_qwen3_vl",
    vision_class="Qwen3VLVisionModel",
    feature_class="Qwen3VLModel",
    text_class="Qwen3VLTextModel",
    full_model=("Qwen3VLForConditionalGeneration", None),
    lora_targets=ATTENTION_AND_MLP,
    **QWEN3_CHECKPOINT,
)

# Every decoder layer's MLP is a sparse MoE block whose experts are fused 3-D parameters
# (`experts.gate_up_proj`, `experts.down_proj`), which peft's `target_modules` cannot name: the
# default adapts the attention projections only (`experts` in the targets adds them).
QWEN3_VL_MOE = Qwen3VLFamily(
    name="qwen3_vl_moe",
    module="transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
    vision_class="Qwen3VLMoeVisionModel",
    feature_class="Qwen3VLMoeModel",
    text_class="Qwen3VLMoeTextModel",
    full_model=("Qwen3VLMoeForConditionalGeneration", None),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    weight_conversions=(experts.transposed,),  # the releases store the fused experts transposed
    **QWEN3_CHECKPOINT,
)
