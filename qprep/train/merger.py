"""The vision tower's mergers alone, run by the trainer on a store of their input.

A store at the merger-input level (`qprep.schemas.towers`) holds what the checkpoint's
`visual.merger` (and each `visual.deepstack_merger_list[i]`) is called with; here those modules are
built with the family's own vision class (on the meta device, so no vision block is ever
allocated), loaded from the checkpoint's merger weights alone, and run as the tower's forward runs
them: the flat patch rows in, the merged tokens out, put back in the processor's order where the
tower attends in windows (`Family.merger_order`). Frozen, they give the merged store's tokens bit
for bit; trained (`--train-merger full`), their parameters train beside the LoRA.

A trained merger is saved beside the adapter as `merger.safetensors`, under the key names the
checkpoint itself gives those weights (`visual.merger.*` in a released Qwen2.5-VL, `model.visual.*`
in Qwen3-VL, `thinker.visual.*` in Omni): what `from_pretrained` reads, so its tensors replace the
checkpoint's own, and `load_merger` puts them into a full transformers model as it is. A peft
`modules_to_save` entry would instead tie the names to where the merger sits in qprep's language
model, which differs from the full model's in every family.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from qprep.errors import SettingsError
from qprep.models.checkpoint import Checkpoint, load_weights
from qprep.schemas.dtypes import resolve_dtype, torch_dtype

MERGER_FILE = "merger.safetensors"


class Merger(torch.nn.Module):
    """`merger` and (towers with deepstack levels) `deepstack_merger_list`, with the checkpoint's weights."""

    def __init__(self, checkpoint: Checkpoint, dtype: str = "float32", device: str = "cpu"):
        super().__init__()
        from transformers.initialization import no_init_weights

        family = checkpoint.family
        vision_config = checkpoint.model_config().vision_config
        with torch.device("meta"), no_init_weights():
            visual = getattr(importlib.import_module(family.module), family.vision_class)._from_config(
                vision_config, dtype=torch_dtype(resolve_dtype(dtype, checkpoint.dtype)))
        self.merger = visual.merger
        self.deepstack_mergers = getattr(visual, "deepstack_merger_list", None) or torch.nn.ModuleList()
        # the tower's own names of these modules (Qwen3-Omni registers its deepstack mergers as `merger_list`)
        self.parts = {name: child for name, child in visual.named_children()
                      if child is self.merger or (len(self.deepstack_mergers) and child is self.deepstack_mergers)}
        self.to_empty(device="cpu")
        self.prefix = _vision_prefix(checkpoint)
        self.family, self.vision_config = family, vision_config
        for name, part in self.parts.items():
            load_weights(part, checkpoint, (f"{self.prefix}{name}.",))
        self.to(device)

    def merged(self, inputs: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        """[tokens, merge², width] merger input → [tokens, hidden] merged tokens in the processor's
        order (`order`: the batch's `Batch.merger_order`)."""
        return _in_order(self.merger(self._flat(inputs)), order)

    def deepstack(self, inputs: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        """[levels, tokens, merge², width] → [levels, tokens, hidden], each level by its own merger."""
        return torch.stack([_in_order(merger(self._flat(level)), order)
                            for merger, level in zip(self.deepstack_mergers, inputs)])

    @torch.no_grad()
    def medium(self, cached):
        """A `CachedMedium` of the merger's input as a store of merged tokens would hold it."""
        import dataclasses

        order = self.family.merger_order(cached.grid_thw, self.vision_config)
        device = self.merger_device
        deepstack = None if cached.deepstack is None else self.deepstack(cached.deepstack.to(device), order).cpu()
        return dataclasses.replace(cached, video_tokens=self.merged(cached.video_tokens.to(device), order).cpu(),
                                   deepstack=deepstack)

    @property
    def merger_device(self) -> torch.device:
        return next(self.merger.parameters()).device

    def _flat(self, inputs: torch.Tensor) -> torch.Tensor:
        """The tower's layout: one row per patch (the mergers group merge² rows themselves)."""
        return inputs.reshape(-1, inputs.shape[-1]).to(self.merger_dtype)

    @property
    def merger_dtype(self) -> torch.dtype:
        return next(self.merger.parameters()).dtype

    # ---- saving -------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The mergers' weights under the checkpoint's own key names."""
        return {f"{self.prefix}{part}.{name}": tensor.detach().contiguous().cpu()
                for part, module in self.parts.items() for name, tensor in module.state_dict().items()}

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        save_file(self.checkpoint_state(), str(Path(directory) / MERGER_FILE),
                  metadata={"format": "pt", "prefix": self.prefix})

    def load(self, directory: str | Path) -> None:
        """Load a merger saved by `save` (a trained run's adapter folder)."""
        state = read_merger(directory)
        own = self.checkpoint_state()
        if set(state) != set(own):
            raise SettingsError(f"{Path(directory) / MERGER_FILE} does not fit this model's merger "
                                f"(keys {sorted(set(state) ^ set(own))[:3]})")
        for part, module in self.parts.items():
            start = f"{self.prefix}{part}."
            module.load_state_dict({k[len(start):]: v for k, v in state.items() if k.startswith(start)})


TRAIN_MERGER = ("none", "full")  # `--train-merger`: frozen, or every parameter of the mergers trained


def check_merger_trainable(mode: str, cache) -> None:
    """A merger trains only from a store of its input."""
    if mode != "none" and cache.level != "merger-input":
        raise SettingsError(f"--train-merger {mode}: {cache.store.location} holds merged tokens (the merger's "
                            f"output), so there is no merger input to train it on; re-extract the store with "
                            f"`qprep extract --level merger-input`")


def train_merger(model: torch.nn.Module, mode: str) -> list[torch.nn.Parameter]:
    """Make the mergers of a (LoRA-wrapped) `LanguageModel` trainable (`mode` "full") or leave them
    frozen ("none"); the parameters that now train. Call after `apply_lora`, which freezes all else."""
    if mode not in TRAIN_MERGER:
        raise SettingsError(f"train_merger must be one of {', '.join(TRAIN_MERGER)}, got {mode!r}")
    mergers = next((module for module in model.modules() if isinstance(module, Merger)), None)
    if mode == "none":
        return []
    if mergers is None:
        raise SettingsError("--train-merger needs a store of the merger's input: re-extract it with "
                            "`qprep extract --level merger-input` (a store of merged tokens has no merger to train)")
    mergers.requires_grad_(True)
    return list(mergers.parameters())


def trained_merger(model: torch.nn.Module) -> "Merger | None":
    """The mergers of a model where they train (`train_merger` "full"), else None."""
    merger = next((module for module in model.modules() if isinstance(module, Merger)), None)
    return merger if merger is not None and any(p.requires_grad for p in merger.parameters()) else None


def read_merger(directory: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(directory) / MERGER_FILE
    if not path.is_file():
        raise SettingsError(f"{directory}: no {MERGER_FILE} there (the adapter of a run with --train-merger)")
    return load_file(str(path))


def load_merger(full_model: torch.nn.Module, directory: str | Path) -> None:
    """Put a trained merger (`merger.safetensors` in an adapter folder) into a full transformers model
    (or its thinker): its vision tower's `merger` and deepstack mergers take the saved weights."""
    from safetensors import safe_open

    path = Path(directory) / MERGER_FILE
    with safe_open(str(path), "pt") as handle:
        prefix = handle.metadata()["prefix"]
    visual = next(module for name, module in full_model.named_modules() if hasattr(module, "merger")
                  and hasattr(module, "blocks"))
    state = {key[len(prefix):]: value for key, value in read_merger(directory).items()}
    missing, unexpected = visual.load_state_dict(state, strict=False)
    if unexpected or not set(state) or any(key.split(".")[0] in {k.split(".")[0] for k in state} for key in missing):
        raise SettingsError(f"{path} does not fit {type(full_model).__name__}'s vision tower "
                            f"(unexpected {unexpected[:3]}, missing {missing[:3]})")


def _in_order(merged: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    return merged if order is None else merged[order.to(merged.device)]


def _vision_prefix(checkpoint: Checkpoint) -> str:
    """The vision tower's key prefix in this checkpoint (the first of the family's that is present)."""
    files = checkpoint.weight_files(checkpoint.family.vision_prefixes)
    first = next(iter(files.values()))[0]
    return next(prefix for prefix in checkpoint.family.vision_prefixes if first.startswith(prefix))
