"""MoE expert weights as the releases store them, into the fused 3-D parameters of transformers 5.

transformers 5 holds each layer's experts as `mlp.experts.gate_up_proj` [E, 2I, H] and
`mlp.experts.down_proj` [E, H, I], and converts at load time what a checkpoint holds instead. qprep
reads weights itself (only the parts it needs), so it applies the same conversions, which the
parity tests hold against `from_pretrained` on checkpoints of each layout:

* `transposed`: the Qwen3-VL-MoE releases store the fused tensors transposed ([E, H, 2I] and
  [E, I, H]); transformers transposes them where the shape differs from the parameter's;
* `per_expert`: one tensor per expert and projection (`mlp.experts.<e>.gate_proj.weight`, ...), as
  some Qwen3.5-MoE releases and transformers' own `save_pretrained` write them; stacked in expert
  order, gate before up.
"""

from __future__ import annotations

import re

FUSED = ("gate_up_proj", "down_proj")
PER_EXPERT = re.compile(r"^(?P<layer>.*\bmlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def transposed(state: dict, module) -> dict:
    """Fused expert tensors whose shape is the parameter's with its last two dims swapped, swapped back."""
    import torch

    shapes = {name: tuple(p.shape) for name, p in module.state_dict().items() if name.endswith(FUSED)}
    for name, tensor in state.items():
        want = shapes.get(name)
        if want is not None and tuple(tensor.shape) != want and tuple(tensor.shape[:-2]) + tuple(tensor.shape[:-3:-1]) == want:
            state[name] = torch.transpose(tensor, -1, -2).contiguous()
    return state


def per_expert(state: dict, module) -> dict:
    """Per-expert projections stacked into the fused parameters."""
    import torch

    groups: dict[str, dict[str, dict[int, object]]] = {}
    for name in [n for n in state if PER_EXPERT.match(n)]:
        match = PER_EXPERT.match(name)
        groups.setdefault(match["layer"], {}).setdefault(match["proj"], {})[int(match["expert"])] = state.pop(name)
    for layer, projections in groups.items():
        def stacked(proj: str):
            experts = projections[proj]
            return torch.stack([experts[e] for e in sorted(experts)])

        state[f"{layer}.gate_up_proj"] = torch.cat([stacked("gate_proj"), stacked("up_proj")], dim=1)
        state[f"{layer}.down_proj"] = stacked("down_proj")
    return state
