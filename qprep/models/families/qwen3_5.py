"""Qwen3.5 (`qwen3_5`, and the MoE `qwen3_5_moe`): Qwen3-VL's video layout and processor, no
deepstack, and a hybrid language model of Gated DeltaNet (linear attention) and gated full-attention
layers.

The block, the time stamps and the positions are Qwen3-VL's (`qwen3_vl.Qwen3VLFamily`); the vision
tower returns merged tokens only. LoRA targets cover both layer kinds: the full-attention
projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`) and the linear-attention ones (`in_proj_qkv`,
`in_proj_z`, `out_proj`), plus the dense MLP (`up_proj`, `down_proj`) where there is one.
"""

from __future__ import annotations

from qprep.models.families import experts
from qprep.models.families.qwen3_vl import QWEN3_CHECKPOINT, Qwen3VLFamily

FULL_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LINEAR_ATTENTION = ("in_proj_qkv", "in_proj_z", "out_proj")

QWEN3_5 = Qwen3VLFamily(
    name="qwen3_5",
    module="transformers.models.qwen3_5.modeling_qwen3_5",
    vision_class="Qwen3_5VisionModel",
    feature_class="Qwen3_5Model",
    text_class="Qwen3_5TextModel",
    full_model=("Qwen3_5ForConditionalGeneration", None),
    lora_targets=FULL_ATTENTION + LINEAR_ATTENTION + ("up_proj", "down_proj"),
    isolates_packed_samples=False,  # the Gated DeltaNet layers scan the whole row without the packed mask
    **QWEN3_CHECKPOINT,
)

# The experts are fused 3-D parameters, as in Qwen3-VL-MoE: attention of both kinds by default.
QWEN3_5_MOE = Qwen3VLFamily(
    name="qwen3_5_moe",
    module="transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    vision_class="Qwen3_5MoeVisionModel",
    feature_class="Qwen3_5MoeModel",
    text_class="Qwen3_5MoeTextModel",
    full_model=("Qwen3_5MoeForConditionalGeneration", None),
    lora_targets=FULL_ATTENTION + LINEAR_ATTENTION,
    weight_conversions=(experts.per_expert,),  # some releases, and save_pretrained, store one tensor per expert
    isolates_packed_samples=False,
    **QWEN3_CHECKPOINT,
)
