"""Validation while training: the loss on held-out records, from the cache (no tower, no decoding).

The loss is the training loss's token-level mean over the whole held-out set: every batch's summed
cross-entropy divided by the label tokens of all the held-out samples (the model's own
`loss_function` with `num_items_in_batch`), the parts added up. The model runs in eval mode (no
LoRA dropout) without gradients, and validation draws no random numbers, so a run with it trains
exactly as one without it. `best-adapter/` keeps the adapter with the lowest validation loss (with
`best.json`: its step and loss) when asked.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from qprep.schemas.metrics import metrics_json


@dataclass
class Validation:
    samples: list  # qprep.train.data.Sample
    cache: object
    layout: object
    batch_size: int
    label_tokens: int

    @classmethod
    def build(cls, samples: list, cache, layout, batch_size: int) -> "Validation":
        from qprep.train.optim import label_tokens

        return cls(samples, cache, layout, batch_size, sum(label_tokens(s.labels) for s in samples))

    @torch.no_grad()
    def loss(self, model, device: str, autocast, world=None, even: bool = False) -> float:
        """The held-out set's mean loss per label token, with the model as it is now (each rank of
        `world` takes every size-th sample; the parts are summed over the ranks). `even`: every
        rank runs as many batches (sharded weights are gathered in each forward), the short ones
        topped up with stand-ins weighted 0."""
        from qprep.train.distributed import World
        from qprep.train.loader import PlannedBatch, batch_stream, plan

        world = world or World()
        samples = self.samples[world.rank::world.size]
        batches = plan(samples, seed=0, batch_size=self.batch_size, epochs=1)
        counted = len(batches)
        if even:
            rounds = max(len(plan(self.samples[rank::world.size], seed=0, batch_size=self.batch_size, epochs=1))
                         for rank in range(world.size))
            samples = samples or self.samples[:1]
            batches += [PlannedBatch(0, counted + n, (0,)) for n in range(rounds - counted)]
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64)
        try:
            for index, (_, batch) in enumerate(batch_stream(batches, samples, self.cache, self.layout, workers=0)):
                with autocast:
                    part = model(batch.to(device), num_items_in_batch=self.label_tokens)[0]
                if index < counted:
                    total += part.double().cpu()
        finally:
            model.train(was_training)
        return float(world.sum(total))


def best_so_far(folder) -> float | None:
    """The lowest validation loss a resumed run's `best-adapter/` holds (`folder`: its `RunFolder`)."""
    path = folder.best_file
    return json.loads(path.read_text())["val_loss"] if path.is_file() else None


def keep_best(folder, peft_model, step: int, val_loss: float, world, sharded: bool) -> None:
    """`best-adapter/` and `best.json` (every rank calls it; rank 0 writes)."""
    from qprep.train.sharding import save_adapter

    save_adapter(peft_model, folder.best_adapter, world, sharded)
    if world.main:
        folder.best_file.write_text(metrics_json({"step": step, "val_loss": val_loss}))


def validation_row(epoch: int, step: int, val_loss: float, tokens: int, started: float) -> dict:
    return {"epoch": epoch, "step": step, "val_loss": val_loss, "val_tokens": tokens,
            "val_time_s": time.perf_counter() - started}
