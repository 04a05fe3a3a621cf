"""Supervised fine-tuning: next-token cross-entropy on the records' answers, as transformers' `Trainer`
computes it (`qprep.train.optim`: token-weighted accumulation, or each batch's mean with
`--loss-weighting batches`), with the held-out loss as validation (`qprep.train.validation`)."""

from __future__ import annotations

import torch

from qprep.errors import SettingsError
from qprep.schemas.training import TrainSettings
from qprep.train.optim import StepShare, label_tokens
from qprep.train.validation import Validation, validation_row


class SupervisedObjective:
    """The `Objective` of `qprep train`: samples with labels on the answer tokens."""

    validation_metric = "val_loss"
    validation_higher_is_better = False
    reads_batches = True
    iterations = 1

    def __init__(self, settings: TrainSettings):
        self.settings = settings
        self.samples: list = []
        self.skipped: dict[str, list[str]] = {}
        self.validation: Validation | None = None

    def build(self, data_path, eval_data, checkpoint, cache, tokenizer, layout, echo) -> None:
        from qprep.train.data import build_dataset, load_records

        dataset = build_dataset(load_records(data_path), cache, tokenizer, layout, max_length=self.settings.max_length,
                                cut=self.settings.cut_to_max_length)
        echo(dataset.report())
        if not dataset.samples:
            raise SettingsError(f"--data {data_path}: no sample left to train on (the reasons are listed above); its "
                                f"ids must be the cache's video ids (`qprep status {cache.store.location}` lists them)")
        self.samples, self.skipped = dataset.samples, dataset.skipped
        self.validation = self._held_out(eval_data, cache, tokenizer, layout, echo)

    def _held_out(self, eval_data, cache, tokenizer, layout, echo) -> Validation | None:
        """The held-out samples (reported as the training ones are), or None without --eval-data."""
        from qprep.train.data import build_dataset, load_records

        settings = self.settings
        if eval_data is None:
            if settings.eval_every or settings.save_best:
                raise SettingsError("--eval-every and --save-best need --eval-data (the held-out records)")
            return None
        held_out = build_dataset(load_records(eval_data), cache, tokenizer, layout, max_length=settings.max_length,
                                 cut=settings.cut_to_max_length)
        echo(f"validation: {held_out.report()}")
        if not held_out.samples:
            raise SettingsError(f"--eval-data {eval_data}: no sample left to validate on (the reasons are listed "
                                f"above)")
        return Validation.build(held_out.samples, cache, layout, settings.batch_size)

    def start_from(self, weights: dict[str, torch.Tensor]) -> None:
        pass  # the loss reads the model alone

    def start_step(self, batches: list, model, world, iteration: int) -> list[StepShare]:
        """The step's label tokens, counted from the samples: every rank knows the whole plan, so no sum."""
        tokens = sum(self._label_tokens(batch) for batch in batches)
        return [StepShare(len(batches), tokens, batch is batches[-1]) for batch in batches]

    def attended_tokens(self, batch) -> int:
        return int(batch.attention_mask.sum())

    def loss(self, model, batch, position, share: StepShare, whole: bool) -> torch.Tensor:
        if self.settings.loss_weighting == "tokens":
            return model(batch, num_items_in_batch=share.label_tokens)[0]
        if whole:  # the batch's own mean, as the Trainer takes it
            return model(batch)[0] / share.batches
        return model(batch, num_items_in_batch=self._label_tokens(position))[0] / share.batches

    def batch_loss(self, summed: float, position, share: StepShare) -> float:
        """The batch's own mean loss (the step's loss is what the optimizer follows)."""
        if self.settings.loss_weighting == "batches":
            return summed * share.batches
        return summed * share.label_tokens / max(self._label_tokens(position), 1)

    def batch_metrics(self, position, step: int, world) -> dict:
        return {}  # the loss is all a supervised batch reports

    def open_logs(self, folder, world, resumed_at: tuple[int, int] | None) -> None:
        pass  # metrics.jsonl, the recipe's, is all it writes

    def close_logs(self) -> None:
        pass

    @property
    def validates(self) -> bool:
        return self.validation is not None

    def validate(self, model, device: str, autocast, world, even: bool) -> float:
        return self.validation.loss(model, device, autocast, world, even=even)

    def validation_row(self, epoch: int, step: int, value: float, started: float) -> dict:
        return validation_row(epoch, step, value, self.validation.label_tokens, started)

    def _label_tokens(self, batch) -> int:
        """The label tokens of a global batch (a `PlannedBatch`: all its ranks' parts)."""
        return sum(label_tokens(self.samples[i].labels) for i in batch.samples)
