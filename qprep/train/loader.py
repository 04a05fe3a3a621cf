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

from qprep.train.data import Sample, collate, collate_packed


@dataclass(frozen=True)
class PlannedBatch:
    epoch: int
    index: int  # position within the epoch
    samples: tuple[int, ...]  # indices into the dataset's samples
    # with packing: the packed rows (each a tuple of samples, side by side in one row); for a part
    # dealt to a rank, `packed` says its samples are one such row
    rows: tuple[tuple[int, ...], ...] | None = None
    packed: bool = False


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


def first_fit_packs(samples: list[Sample], seed: int, max_length: int) -> list[tuple[int, ...]]:
    """The samples packed into rows of at most `max_length` tokens: first fit over the order `seed`
    fixes, each sample into the first row of its kind (audio or not) it fits in; none is cut or left out."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[list[int]] = []
    kinds: list[bool] = []
    used: list[int] = []
    for i in order:
        length, kind = len(samples[i].input_ids), samples[i].has_audio
        if length > max_length:
            raise ValueError(f"sample {samples[i].id} has {length} tokens, more than the {max_length} a packed row holds")
        row = next((r for r in range(len(rows)) if kinds[r] == kind and used[r] + length <= max_length), None)
        if row is None:
            rows.append([])
            kinds.append(kind)
            used.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        used[row] += length
    return [tuple(row) for row in rows]


def plan_packed(packs: list[tuple[int, ...]], *, seed: int, packs_per_batch: int, epochs: int,
                start: tuple[int, int] = (0, 0)) -> list[PlannedBatch]:
    """Every batch of packed rows from `start`: each epoch a seeded permutation of the same packs,
    `packs_per_batch` of them per batch (one per rank)."""
    out = []
    for epoch in range(start[0], epochs):
        order = torch.randperm(len(packs), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for index, first in enumerate(range(0, len(order), packs_per_batch)):
            rows = tuple(packs[i] for i in order[first:first + packs_per_batch])
            if (epoch, index) >= start:
                out.append(PlannedBatch(epoch, index, tuple(i for row in rows for i in row), rows=rows))
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
        chosen = [self.samples[i] for i in planned.samples]
        if planned.packed:
            return planned, collate_packed(chosen, self._cache, self.layout)
        return planned, collate(chosen, self._cache, self.layout)

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
