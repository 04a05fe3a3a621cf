"""Checkpoints of a training run, and resuming from them.

`checkpoint-<step>/` holds the adapter in peft's format (and, with a trained merger, its
`merger.safetensors`: `qprep.train.merger`), `trainer.pt` (the optimizer, the schedule and
the RNG state: tensors and plain values only) and `state.json` (the position in the data and the
length `metrics.jsonl` had), written last: `--resume` takes only checkpoints with a state.json, so one
killed while being written is skipped, never half-read (`qprep.train.run_folder`).
"""

from __future__ import annotations

import json
import os
import pickle  # for its error type only: nothing here unpickles
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
