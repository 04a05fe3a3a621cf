"""Batches from the cache, read ahead in worker processes.

The order of a run is fixed by (seed, epoch) alone, never by the number of workers: each epoch
visits the samples in a seeded permutation, and a batch is filled with the next samples of its
kind (with or without audio: the model's `get_rope_index` takes one `use_audio_in_video` flag per
batch). Workers only read and collate what the plan names, so the batches are the same with 0 or
8 workers and a resumed run picks the plan up at the batch where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from qprep.train.data import Sample, collate


@dataclass(frozen=True)
class PlannedBatch:
    epoch: int
    index: int  # position within the epoch
    samples: tuple[int, ...]  # indices into the dataset's samples


def plan_epoch(samples: list[Sample], epoch: int, seed: int, batch_size: int) -> list[tuple[int, ...]]:
    """Sample indices of each batch of one epoch, in order."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    batches: list[tuple[int, ...]] = []
    filling: dict[bool, list[int]] = {}
    for i in order:
        group = filling.setdefault(samples[i].has_audio, [])
        group.append(i)
        if len(group) == batch_size:
            batches.append(tuple(filling.pop(samples[i].has_audio)))
    batches.extend(tuple(group) for group in filling.values())  # the short last batch of each kind
    return batches


def batches_per_epoch(samples: list[Sample], batch_size: int) -> int:
    with_audio = sum(s.has_audio for s in samples)
    return -(-with_audio // batch_size) + -(-(len(samples) - with_audio) // batch_size)


def plan(samples: list[Sample], *, seed: int, batch_size: int, epochs: int, start: tuple[int, int] = (0, 0)
         ) -> list[PlannedBatch]:
    """Every batch from `start` = (epoch, batch index) to the end of the run."""
    out = []
    for epoch in range(start[0], epochs):
        for index, chosen in enumerate(plan_epoch(samples, epoch, seed, batch_size)):
            if (epoch, index) >= start:
                out.append(PlannedBatch(epoch, index, chosen))
    return out


class CachedBatches(torch.utils.data.Dataset):
    """The planned batches, collated from the cache. Each worker process opens its own reader."""

    def __init__(self, planned: list[PlannedBatch], samples: list[Sample], cache_path: str | Path, layout, cache=None):
        self.planned, self.samples = planned, samples
        self.cache_path, self.layout = str(cache_path), layout
        self._cache = cache

    def __len__(self) -> int:
        return len(self.planned)

    def __getitem__(self, position: int):
        if self._cache is None:
            from qprep.store.reader import open_cache

            self._cache = open_cache(self.cache_path)
        planned = self.planned[position]
        return planned, collate([self.samples[i] for i in planned.samples], self._cache, self.layout)

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}  # a worker opens the store itself


def batch_stream(planned: list[PlannedBatch], samples: list[Sample], cache, layout, *, workers: int,
                 prefetch: int = 4, pin_memory: bool = False) -> Iterator:
    """(PlannedBatch, Batch) in plan order (`layout`: the checkpoint's `PromptLayout`); `workers` > 0
    reads ahead in that many processes."""
    batches = CachedBatches(planned, samples, cache.store.location, layout, cache=cache)
    if workers == 0:
        return iter(batches[i] for i in range(len(batches)))
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=prefetch, pin_memory=pin_memory, collate_fn=_keep,
                                         # its own generator: seeding workers must not draw from the global
                                         # RNG that LoRA dropout uses, or the run would depend on `workers`
                                         generator=torch.Generator().manual_seed(0))
    return iter(loader)


def _keep(item):
    return item
