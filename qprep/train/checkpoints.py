"""Checkpoints of a training run, and resuming from them.

`checkpoint-<step>/` holds the adapter in peft's format (and, with a trained merger, its
`merger.safetensors`: `qprep.train.merger`), `trainer.pt` (the optimizer, the schedule and
the RNG state: tensors and plain values only) and `state.json` (the position in the data and the
length `metrics.jsonl` had), written last: `--resume` takes only checkpoints with a state.json, so one
killed while being written is skipped, never half-read (`qprep.train.run_folder`).

A run can also start from an adapter such a folder holds (`--adapter`: `StartingAdapter`): its LoRA
weights replace the fresh init, checked to be the run's LoRA (rank, alpha, targets) and to fit the
model. A resumed run loads it too (GRPO's reference is that adapter), then its last checkpoint over it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle  # for its error type only: nothing here unpickles
from dataclasses import dataclass
from pathlib import Path

import torch

from qprep.errors import SettingsError
from qprep.train.run_folder import RunFolder, state_file, trainer_file, write_json
from qprep.train.sharding import full_optimizer_state, load_full_optimizer_state, save_adapter


def save_checkpoint(folder: RunFolder, peft_model, optimizer, scheduler, state: dict, world, sharded: bool,
                    metrics) -> None:
    """Checkpoint (every rank calls it: sharded, the adapter and the optimizer state are gathered; rank 0
    writes). The metrics rows so far reach the disk with it: a rank 0 killed later loses none of them."""
    directory = folder.checkpoint(state["step"])
    save_adapter(peft_model, directory, world, sharded)
    gathered = full_optimizer_state(peft_model, optimizer) if sharded else None  # a collective
    if not world.main:
        return
    optimizer_state = gathered if sharded else optimizer.state_dict()
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
               trainer_file(directory))
    metrics.flush()
    os.fsync(metrics.fileno())
    write_json(state_file(directory), {**state, "metrics_bytes": metrics.tell()})  # last, in one step


def latest_checkpoint(folder: RunFolder) -> Path | None:
    """The last checkpoint written to the end, or None."""
    complete = folder.complete_checkpoints()
    return complete[-1] if complete else None


def restore_adapter(checkpoint: Path, peft_model) -> None:
    """The checkpoint's adapter weights into the model (before it is sharded)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from qprep.train.merger import trained_merger

    set_peft_model_state_dict(peft_model, load_file(str(checkpoint / "adapter_model.safetensors")))
    if (merger := trained_merger(peft_model)) is not None:
        merger.load(checkpoint)


def restore_trainer(checkpoint: Path, peft_model, optimizer, scheduler, sharded: bool) -> dict:
    """The optimizer, schedule and RNG state of `checkpoint`; its state.json (the position in the plan)."""
    saved = load_trainer_state(trainer_file(checkpoint))
    if sharded:
        load_full_optimizer_state(peft_model, optimizer, saved["optimizer"])
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    return json.loads(state_file(checkpoint).read_text())


def load_trainer_state(path: Path) -> dict:
    """A checkpoint's optimizer and RNG state: tensors and plain values only, never unpickled objects."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only raises on anything else
        raise SettingsError(f"--resume: {path} holds objects other than tensors, so it was not written by "
                            f"qprep train and is not loaded; remove its checkpoint folder to resume from an "
                            f"earlier one") from exc


@dataclass(frozen=True)
class StartingAdapter:
    """The adapter folder a run's LoRA starts from, checked before anything is written to the run folder."""

    path: Path
    weights_sha256: str  # of adapter_model.safetensors: the run's identity, so a changed adapter is not resumed

    @classmethod
    def check(cls, adapter: str | Path, settings, family_targets: tuple[str, ...]) -> "StartingAdapter":
        """Refuse a folder without an adapter written by `qprep train`, one whose LoRA is not the run's
        (`settings.lora` on a family with these default targets), and one with a trained merger the run
        would not carry on (`merger.safetensors`: the run's own adapter would lose it)."""
        from qprep.train.infer import check_adapter_folder
        from qprep.train.lora import check_same_lora
        from qprep.train.merger import MERGER_FILE

        path = check_adapter_folder(adapter)
        check_same_lora(path, settings.lora, family_targets)
        if (path / MERGER_FILE).is_file() and settings.train_merger == "none":
            raise SettingsError(f"--adapter {path} holds a trained merger ({MERGER_FILE}); this run leaves the "
                                f"merger frozen, so it would start from, and save, a model without it: train with "
                                f"--train-merger full on a store of the merger's input, or start from an adapter "
                                f"trained without --train-merger")
        digest = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
        return cls(path, digest)

    def identity(self) -> dict:
        """What run.json records of it."""
        return {"path": str(self.path), "weights_sha256": self.weights_sha256}

    def load(self, peft_model) -> None:
        """Its LoRA weights into the model (before it is sharded), every LoRA weight of the model from it; its
        merger where the run trains the merger and the folder holds one (else the checkpoint's own)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from qprep.train.merger import MERGER_FILE, trained_merger

        try:
            loaded = set_peft_model_state_dict(peft_model, load_file(str(self.path / "adapter_model.safetensors")))
        except RuntimeError as exc:  # a shape that differs
            raise SettingsError(f"--adapter {self.path} does not fit the model: {str(exc).splitlines()[-1].strip()}") \
                from exc
        missing = [key for key in loaded.missing_keys if "lora_" in key]
        if loaded.unexpected_keys or missing:
            keys = (loaded.unexpected_keys or missing)[:2]
            raise SettingsError(f"--adapter {self.path} does not fit the model: its weights and the model's LoRA "
                                f"layers differ ({'not in the model' if loaded.unexpected_keys else 'missing'}: "
                                f"{', '.join(keys)})")
        if (merger := trained_merger(peft_model)) is not None and (self.path / MERGER_FILE).is_file():
            merger.load(self.path)


def lora_weights(peft_model) -> dict[str, torch.Tensor]:
    """A detached copy of the model's trained weights (its LoRA), by parameter name."""
    return {name: parameter.detach().clone() for name, parameter in peft_model.named_parameters()
            if parameter.requires_grad}
