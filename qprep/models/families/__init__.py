"""The model families qprep knows, by the `model_type` of their `config.json` (see `base.Family`).

Adding a family is one module here plus its tests: its `Family` subclass and instance, and a line in
`FAMILIES`.
"""

from __future__ import annotations

from qprep.models.families.base import Family, PlaceholderIds, PromptLayout
from qprep.models.families.qwen2_5_omni import QWEN2_5_OMNI, QWEN2_5_OMNI_THINKER
from qprep.models.families.qwen2_5_vl import QWEN2_5_VL
from qprep.models.families.qwen2_vl import QWEN2_VL
from qprep.models.families.qwen3_5 import QWEN3_5, QWEN3_5_MOE
from qprep.models.families.qwen3_omni_moe import QWEN3_OMNI_MOE, QWEN3_OMNI_MOE_THINKER
from qprep.models.families.qwen3_vl import QWEN3_VL, QWEN3_VL_MOE

FAMILIES: dict[str, Family] = {family.name: family for family in (
    QWEN2_VL, QWEN2_5_OMNI, QWEN2_5_OMNI_THINKER, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE, QWEN3_5, QWEN3_5_MOE,
    QWEN3_OMNI_MOE, QWEN3_OMNI_MOE_THINKER)}

__all__ = ["FAMILIES", "Family", "PlaceholderIds", "PromptLayout"]
