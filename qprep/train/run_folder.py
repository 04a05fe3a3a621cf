"""The run folder `qprep train --out` writes: the one place that names its files.

    run.json            the effective settings and what the run was trained on (`--resume` checks it)
    metrics.jsonl       one row per batch (and per validation)
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

import os
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"


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
