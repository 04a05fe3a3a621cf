"""Qwen2-VL (`qwen2_vl`): a vision tower, no audio; Qwen2.5-VL's placeholders and block, and no time.

What differs from Qwen2.5-VL (`qwen2_5_vl`), as transformers' `modeling_qwen2_vl` has it:

* The vision tower (`Qwen2VisionTransformerPretrainedModel`): every block attends over all patches
  of a temporal patch (two frames), never within windows (so no window order for the merger to
  undo); LayerNorm rather than RMSNorm, a quick-GELU MLP, a merger of LayerNorm + MLP. Its config names
  the merged tokens' width `hidden_size` (the language model's; `embed_dim` is the tower's own),
  where Qwen2.5-VL's names it `out_hidden_size` (`Family.merged_width_key`).
* Positions: `get_rope_index` has no time scale and takes no `second_per_grid_ts`. The temporal
  id advances by one per temporal patch (two frames), whatever the frame rate or the frames' real
  times. The sampled frames' times still decide which frames the model sees (and the manifest
  records them), but the model sees only the patch index.

Block: `<|vision_start|>` + `<|video_pad|>` × (t·h·w / merge²) + `<|vision_end|>`; `get_rope_index`
needs `mm_token_type_ids` (video tokens are type 2, as `Qwen2VLProcessor` marks them). The
checkpoint keys are Qwen2.5-VL's: `visual.*`, `model.*`, `lm_head.*`, in the releases and in what
transformers 5's `save_pretrained` writes.
"""

from __future__ import annotations

from qprep.models.families.qwen2_5_vl import QwenVLFamily


class Qwen2VLFamily(QwenVLFamily):
    """Qwen2.5-VL's placeholders and block; positions without `second_per_grid_ts`."""

    positions_take_time = False


QWEN2_VL = Qwen2VLFamily(
    name="qwen2_vl",
    module="transformers.models.qwen2_vl.modeling_qwen2_vl",
    vision_class="Qwen2VisionTransformerPretrainedModel",
    audio_class=None,
    feature_class="Qwen2VLModel",
    text_class="Qwen2VLTextModel",
    full_model=("Qwen2VLForConditionalGeneration", None),
    thinker_key=None,
    vision_prefixes=("visual.", "model.visual."),
    audio_prefixes=(),
    text_prefixes=("model.language_model.", "model."),
    lm_head_prefixes=("lm_head.",),
    merged_width_key="hidden_size",
    vision_width_key="embed_dim",
)
