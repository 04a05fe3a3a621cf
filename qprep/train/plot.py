"""A run's loss curves (`loss.png`), and several runs' side by side (`qprep plot`), drawn with matplotlib.

The figures are built with matplotlib's object API (`Figure`, no pyplot): nothing global changes and
no display is needed; `savefig` renders them with Agg. The x axis counts batches trained (each row
of `metrics.jsonl` is one batch), so runs with other accumulation or batch sizes line up by the data
they saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

SMOOTHING = 10  # batches in the running mean drawn over the per-batch loss
EPOCH_LINES = 12  # at most this many epoch starts are drawn as lines
BATCHES = "batches trained"


@dataclass(frozen=True)
class Curves:
    """A run's series, each as (x: batches trained, y)."""

    name: str
    loss: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    lr: tuple[np.ndarray, np.ndarray]
    epoch_starts: np.ndarray  # the x where each epoch after the first begins

    @classmethod
    def read(cls, metrics: str | Path, name: str | None = None) -> "Curves":
        rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
        loss, validation, lr, epochs = [], [], [], []
        for row in rows:
            if "loss" in row:  # a training batch
                loss.append((len(loss) + 1, row["loss"]))
                epochs.append(row["epoch"])
                if "lr" in row:
                    lr.append((len(loss), row["lr"]))
            if "val_loss" in row:  # after the batches trained so far
                validation.append((len(loss), row["val_loss"]))
        starts = [x for x, (before, epoch) in enumerate(zip(epochs, epochs[1:]), start=1) if epoch != before]
        return cls(name or Path(metrics).resolve().parent.name, _xy(loss), _xy(validation), _xy(lr),
                   np.array(starts, dtype=float))

    def batches_to_epochs(self):
        """(batches → epochs, epochs → batches), piecewise linear through the epochs' bounds (an epoch's
        first batch trained is at its start), for an epoch axis beside the batches."""
        bounds = np.concatenate([[0.0], self.epoch_starts + 0.5, [self.loss[0][-1] + 0.5]])
        epochs = np.arange(len(bounds), dtype=float)
        return (lambda x: np.interp(x, bounds, epochs, left=0.0, right=epochs[-1]),
                lambda e: np.interp(e, epochs, bounds, left=0.0, right=bounds[-1]))

    def smoothed(self) -> tuple[np.ndarray, np.ndarray]:
        """The running mean of the last SMOOTHING batches' loss (fewer at the start)."""
        x, y = self.loss
        if not len(y):
            return x, y
        sums = np.cumsum(y)
        window = np.minimum(np.arange(1, len(y) + 1), SMOOTHING)
        lagged = np.concatenate([np.zeros(SMOOTHING), sums])[: len(y)]
        return x, (sums - lagged) / window


def _xy(points: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    array = np.array(points, dtype=float).reshape(-1, 2)
    return array[:, 0], array[:, 1]


def loss_figure(metrics: str | Path) -> Figure:
    """One run: the loss of each batch and its running mean, the validation loss, the learning rate
    on its own axis (right), and a line where each epoch begins."""
    curves = Curves.read(metrics)
    figure = Figure(figsize=(9, 5), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(*curves.loss, color="tab:blue", alpha=0.35, linewidth=1, label="loss per batch")
    axes.plot(*curves.smoothed(), color="tab:blue", linewidth=2.2, label=f"running mean of {SMOOTHING} batches")
    if len(curves.validation[0]):
        axes.plot(*curves.validation, color="tab:red", marker="o", linewidth=1.6, label="validation loss")
    if len(curves.epoch_starts) <= EPOCH_LINES:  # more would hide the curves: the epoch axis above still says
        for index, start in enumerate(curves.epoch_starts):
            axes.axvline(start + 0.5, color="grey", linestyle=":", linewidth=1,
                         label="epoch start" if index == 0 else None)
    if len(curves.loss[0]):
        epoch_axis = axes.secondary_xaxis("top", functions=curves.batches_to_epochs())
        epoch_axis.set_xlabel("epoch")
    axes.set_xlabel(BATCHES)
    axes.set_ylabel("loss")
    axes.set_title(f"{curves.name}: {len(curves.loss[0])} batches")
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    if len(curves.lr[0]):
        rate = axes.twinx()
        rate.plot(*curves.lr, color="tab:orange", linewidth=1.4, label="learning rate")
        rate.set_ylabel("learning rate")
        rate.set_ylim(bottom=0)
        more_handles, more_labels = rate.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    axes.legend(handles, labels, loc="upper right")
    return figure


def plot_loss(metrics: str | Path, out: str | Path) -> Path:
    """`loss.png` of a run from its `metrics.jsonl`."""
    loss_figure(metrics).savefig(out, dpi=110)
    return Path(out)


def runs_figure(runs: list[str | Path]) -> Figure:
    """Several runs (their folders) on one figure: each one's smoothed training loss and validation loss
    (same colour, dashed), and below, their learning rates."""
    from qprep.train.run_folder import RunFolder

    figure = Figure(figsize=(10, 7), layout="constrained")
    loss, rate = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for index, run in enumerate(runs):
        curves = Curves.read(RunFolder(Path(run)).metrics, name=str(run))
        colour = f"C{index % 10}"
        loss.plot(*curves.smoothed(), color=colour, linewidth=2, label=f"{curves.name}: training loss")
        if len(curves.validation[0]):
            loss.plot(*curves.validation, color=colour, linestyle="--", marker="o",
                      label=f"{curves.name}: validation loss")
        rate.plot(*curves.lr, color=colour, label=curves.name)
    loss.set_ylabel(f"loss (running mean of {SMOOTHING} batches)")
    loss.set_title(f"{len(runs)} runs")
    loss.grid(alpha=0.3)
    loss.legend(loc="upper right")
    rate.set_xlabel(BATCHES)
    rate.set_ylabel("learning rate")
    rate.grid(alpha=0.3)
    return figure


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """`qprep plot`: several runs' curves to one PNG."""
    from qprep.errors import SettingsError
    from qprep.train.run_folder import RunFolder

    missing = [str(run) for run in runs if not RunFolder(Path(run)).metrics.is_file()]
    if missing:
        raise SettingsError(f"no metrics.jsonl in {', '.join(missing)}: pass run folders written by qprep train --out")
    runs_figure(runs).savefig(out, dpi=110)
    return Path(out)
