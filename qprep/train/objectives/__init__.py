"""Training objectives: the part of `qprep train` that differs from one kind of training to another.

The recipe (`qprep.train.loop.Recipe`) sets the run up, deals the batches, steps the optimizer, logs,
validates, checkpoints and resumes, the same for every objective; an `Objective` decides what data
there is, how each optimizer step's loss is normalised, the loss of a batch, and what validation
measures. Supervised fine-tuning (`sft.SupervisedObjective`) is what `qprep train` runs by default; GRPO
(`grpo.GRPOObjective`, its loss in `grpo_loss`) with `--method grpo`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from qprep.train.optim import StepShare


class Objective(Protocol):
    # the training samples the recipe plans batches over (their indices), and those left out, by reason
    samples: list
    skipped: dict[str, list[str]]
    # the metrics row name of a validation's value, and which way is better (what --save-best keeps)
    validation_metric: str
    validation_higher_is_better: bool
    # whether `loss` reads the recipe's batches (each part's samples with their cached tokens, read
    # ahead by the loader); an objective that builds its own rows (GRPO: prompts and completions) gets None
    reads_batches: bool
    # optimizer steps taken on each step's batches (GRPO's `num_iterations`; 1: each batch trains once)
    iterations: int

    def build(self, data_path, eval_data, checkpoint, cache, tokenizer, layout, echo) -> None:
        """Read the training records (and the held-out ones, with `eval_data`) into samples; report them
        through `echo`; refuse data that leaves nothing to train on."""

    def start_from(self, weights: dict[str, torch.Tensor]) -> None:
        """The run's LoRA starts from an adapter (`--adapter`): these are its weights (a detached copy, by
        parameter name), for an objective that keeps them."""

    def start_step(self, batches: list, model, world, iteration: int) -> list[StepShare]:
        """Each of one optimizer step's global batches (`PlannedBatch`es)' share of the step, before its
        first forward: the step's loss normaliser, summed over the ranks where it depends on them.
        `iteration`: which of the `iterations` passes over these batches begins."""

    def loss(self, model, batch, position, share: StepShare, whole: bool) -> torch.Tensor:
        """This rank's part of global batch `position`: its share of the step's loss (the parts of all
        ranks and batches sum to the step's loss). `whole`: the part is its whole batch, on one process."""

    def attended_tokens(self, batch) -> int:
        """The tokens the last `loss` call's training forwards attended to (the throughput's count)."""

    def batch_loss(self, summed: float, position, share: StepShare) -> float:
        """The batch's own loss for the curve, from its parts' losses summed over the ranks."""

    def batch_metrics(self, position, step: int, world) -> dict:
        """What the batch's metrics row reports besides its loss (every rank calls it, after the batch's
        last part: values summed over the ranks)."""

    def open_logs(self, folder, world, resumed_at: tuple[int, int] | None) -> None:
        """Open the objective's own files in the run folder (`resumed_at`: the (epoch, batch) a resumed
        run continues from, None for a new run)."""

    def close_logs(self) -> None:
        """Close them."""

    @property
    def validates(self) -> bool:
        """Whether held-out records were given."""

    def validate(self, model, device: str, autocast, world, even: bool) -> float:
        """The held-out value with the model as it is now (`validation_metric`)."""

    def validation_row(self, epoch: int, step: int, value: float, started: float) -> dict:
        """The metrics row of one validation that began at `started` (`time.perf_counter()`)."""
