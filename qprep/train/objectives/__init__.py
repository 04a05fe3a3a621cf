"""Training objectives: the part of `qprep train` that differs from one kind of training to another.

The recipe (`qprep.train.loop.Recipe`) sets the run up, deals the batches, steps the optimizer, logs,
validates, checkpoints and resumes, the same for every objective; an `Objective` decides what data
there is, how each optimizer step's loss is normalised, the loss of a batch, and what validation
measures. Supervised fine-tuning (`sft.SupervisedObjective`) is the one `qprep train` runs.
"""

from __future__ import annotations

from typing import Protocol

import torch

from qprep.train.optim import StepShare


class Objective(Protocol):
    # the training samples the recipe plans batches over (their indices), and those left out, by reason
    samples: list
    skipped: dict[str, list[str]]

    def build(self, data_path, eval_data, cache, tokenizer, layout, echo) -> None:
        """Read the training records (and the held-out ones, with `eval_data`) into samples; report them
        through `echo`; refuse data that leaves nothing to train on."""

    def start_step(self, batches: list, model, world) -> list[StepShare]:
        """Each of one optimizer step's global batches (`PlannedBatch`es)' share of the step, before its
        first forward: the step's loss normaliser, summed over the ranks where it depends on them."""

    def loss(self, model, batch, position, share: StepShare, whole: bool) -> torch.Tensor:
        """This rank's part of global batch `position`: its share of the step's loss (the parts of all
        ranks and batches sum to the step's loss). `whole`: the part is its whole batch, on one process."""

    def batch_loss(self, summed: float, position, share: StepShare) -> float:
        """The batch's own loss for the curve, from its parts' losses summed over the ranks."""

    @property
    def validates(self) -> bool:
        """Whether held-out records were given."""

    def validate(self, model, device: str, autocast, world, even: bool) -> float:
        """The held-out loss with the model as it is now (lower is better: `--save-best` keeps the lowest)."""

    def validation_row(self, epoch: int, step: int, value: float, started: float) -> dict:
        """The metrics row of one validation that began at `started` (`time.perf_counter()`)."""
