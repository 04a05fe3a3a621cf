"""`--shard`: the frozen base and the adapter sharded over the ranks with FSDP2 (`fully_shard`).

For language models that do not fit one device: each decoder layer is one FSDP unit (its weights
all-gathered just before its forward and backward, freed after), and the rest (embeddings, final
norm, `lm_head`) is the root unit. Each rank keeps 1/N of every weight, gradient and Adam moment.

What stays as unsharded training does it:
* the gradients are summed over the ranks, not averaged (divide factor 1): each part's loss is
  already its share of the step's token-level mean (`qprep.train.objectives.sft`);
* every rank runs as many forwards as every other (a gather is a collective): a rank with no part
  of a global batch runs a stand-in (`qprep.train.distributed.Part`) whose loss is weighted 0;
* the adapter is saved whole, in peft's format, by rank 0 (the LoRA weights are gathered, never
  the base), so it loads onto the full model as an unsharded run's does;
* the optimizer state is saved whole (torch's `get_optimizer_state_dict(full_state_dict=True)`),
  and loaded back onto the shards by each rank.
A sharded run resumes sharded only (the setting is part of the run's identity).
"""

from __future__ import annotations

import torch


def shard(peft_model, device: str, world) -> None:
    """Shard `peft_model` (a peft-wrapped `LanguageModel`, its adapter already loaded) over `world`'s
    ranks, in place; build the optimizer after this, over the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world.size,))
    language_model = peft_model.get_base_model()
    for layer in language_model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(language_model, mesh=mesh)
    for module in language_model.modules():
        if isinstance(module, FSDPModule):
            # a plain sum: factor 1 and sum-only comms (else a factor goes through PREMUL_SUM, which gloo lacks)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def full_adapter(peft_model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights gathered whole, on every rank (a collective: every rank calls it)."""
    return {name: _full(p.detach()).cpu() for name, p in peft_model.named_parameters() if p.requires_grad}


def save_adapter(peft_model, directory, world, sharded: bool) -> None:
    """The adapter in peft's format, written by rank 0 (every rank calls it: sharded, it gathers)."""
    from qprep.train.merger import trained_merger

    weights = full_adapter(peft_model) if sharded else None
    if world.main:
        peft_model.save_pretrained(directory, state_dict=weights)
        if (merger := trained_merger(peft_model)) is not None:  # beside the adapter, the checkpoint's key names
            merger.save(directory)


def full_optimizer_state(peft_model, optimizer) -> dict:
    """The optimizer state gathered whole, keyed by parameter name (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(peft_model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(peft_model, optimizer, state: dict) -> None:
    """`full_optimizer_state`'s result put back onto this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(peft_model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a number: a sharded model's `clip_grad_norm_` returns it as a DTensor."""
    return float(_full(norm))
