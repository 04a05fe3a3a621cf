"""The run folder `qprep train --out` writes: the one place that names its files, and what run.json
records of the run (what `--resume` checks).

    run.json            the effective settings and what the run was trained on: the cache's content, the
                        samples, the model, the adapter it started from and its weights' digest
                        (`--resume` checks it)
    metrics.jsonl       one row per batch (and per validation)
    completions.jsonl   with --method grpo: a few sampled completions of each batch, with their rewards
    loss.png            the loss curves, the learning rate and the epochs (`qprep.train.plot`)
    checkpoint-<step>/  the adapter (peft's format), trainer.pt (optimizer, schedule, RNG) and
                        state.json (the position in the data and the length metrics.jsonl had;
                        written last: a checkpoint without it was cut short and is never resumed from)
    adapter/            the final adapter
    best-adapter/       with --save-best: the adapter of the lowest validation loss, and best.json
    ray/                under Ray Train: its copies of the checkpoints
    tensorboard/        with --report-to tensorboard (the default when installed): the event files
    wandb/              with --report-to wandb: W&B's run (offline-run-*/ when offline)
    mlflow.db           with --report-to mlflow and no MLFLOW_TRACKING_URI: MLflow's database
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qprep.errors import SettingsError

CHECKPOINT_PREFIX = "checkpoint-"
# Settings a resumed run may change: they decide when it saves, validates and reports, and how the
# global batch is cut per rank (it keeps the run's global batch), never what it computes. Every other
# setting does, the number of epochs too: the learning-rate schedule spans the whole run.
CHANGEABLE_ON_RESUME = frozenset({"save_every", "eval_every", "save_best", "batch_size", "report_to"})


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def completions(self) -> Path:
        return self.root / "completions.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def best_adapter(self) -> Path:
        return self.root / "best-adapter"

    @property
    def best_file(self) -> Path:
        return self.best_adapter / "best.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def ray_storage(self) -> Path:
        return self.root.resolve() / "ray"

    def checkpoint(self, step: int) -> Path:
        return self.root / f"{CHECKPOINT_PREFIX}{step:07d}"

    def keep_metrics_up_to(self, length: int) -> None:
        """Cut `metrics.jsonl` back to the `length` bytes it had at a checkpoint (a resumed run logs the
        batches after it again)."""
        if self.metrics.is_file() and self.metrics.stat().st_size > length:
            os.truncate(self.metrics, length)

    def complete_checkpoints(self) -> list[Path]:
        """The checkpoints written to the end (with their state file), oldest first."""
        return sorted(p for p in self.root.glob(f"{CHECKPOINT_PREFIX}*") if state_file(p).is_file())


def state_file(checkpoint: Path) -> Path:
    return checkpoint / "state.json"


def trainer_file(checkpoint: Path) -> Path:
    return checkpoint / "trainer.pt"


def run_identity(settings, cache, samples: list, checkpoint, data_path) -> dict:
    """What decides a run's result, as run.json records it: its settings, the cache's content, the
    samples and the model."""
    import hashlib

    values = settings.to_dict()
    values.pop("workers")  # the order and the batches do not depend on it
    for name, frozen in (("train_merger", "none"), ("merger_lr", None)):  # runs before they existed resume
        if values[name] == frozen:
            values.pop(name)
    # a sample's media are named only where they are not its one video `id` (runs of one video per
    # sample keep the identity they had, so they resume)
    digest = hashlib.sha256(json.dumps([[s.id, s.input_ids, s.labels] + ([list(s.media)] if s.media != (s.id,) else [])
                                        for s in samples]).encode())
    return {"settings": values, "cache": str(cache.store.root), "cache_content": cache.content_key,
            "data": str(data_path), "samples": digest.hexdigest()[:16], "model": checkpoint.source}


def saved_global_batch(folder: RunFolder) -> int | None:
    """The global batch run.json recorded (samples, or packed rows with packing), or None before the first run."""
    path = folder.run_file
    return json.loads(path.read_text()).get("global_batch") if path.is_file() else None


def check_resumable(folder: RunFolder, identity: dict) -> None:
    """Refuse `--resume` where the cache, the samples, the model, the adapter the run started from (or its
    weights) or a setting that decides the result changed since run.json was written."""
    out, saved_path = folder.root, folder.run_file
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    identity = json.loads(json.dumps(identity, default=str))  # tuples as the file holds them
    same = ("cache_content", "samples", "model")
    changed = [k for k in same if saved.get(k) != identity[k]]
    changed += ["adapter"] if saved.get("adapter") != identity.get("adapter") else []  # absent: a fresh init
    changed += [f"settings.{k}" for k, value in identity["settings"].items()
                if k not in CHANGEABLE_ON_RESUME and saved["settings"].get(k) != value]
    if changed:
        what = ", ".join(changed)
        hint = " (the cache was re-extracted since)" if "cache_content" in changed else ""
        raise SettingsError(f"--resume: {out} was trained with a different {what}{hint}; use a new --out")


def write_json(path: Path, value) -> None:
    """`path` replaced in one step: a reader finds the old file or the new one, never half of one."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=2, default=str))
    os.replace(temporary, path)
