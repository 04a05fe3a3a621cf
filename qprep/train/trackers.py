"""Experiment trackers: every number of `metrics.jsonl` also goes to TensorBoard, Weights & Biases or
MLflow, as transformers' `Trainer` reports to them (`report_to`).

This module alone knows the trackers. A metrics row keeps its own names in `metrics.jsonl`; a tracker
gets them under the Trainer's names where the Trainer has one (`TRACKER_NAMES`: `train/loss`,
`train/learning_rate`, `train/grad_norm`, `eval/loss`, ...) and under `train/` or `eval/` otherwise, each
at the row's optimizer step (the Trainer's `global_step`; a step's batches share it). The run's
settings go as hyperparameters. Each tracker is an optional extra (`pip install qprep[wandb]`); one
asked for and not installed is refused before the model loads, naming the extra. Rank 0 alone reports.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable

from qprep.errors import SettingsError
from qprep.train.run_folder import RunFolder

TRACKERS = ("tensorboard", "wandb", "mlflow")
# the module each tracker needs (its extra, `qprep[<tracker>]`, installs it)
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}

# metrics.jsonl's names → the Trainer's (its `log` prefixes them with train/ and eval/)
TRACKER_NAMES = {
    "step_loss": "train/loss",  # the optimizer step's loss, what the Trainer logs as its loss
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "loss": "train/batch_loss",  # one batch's own mean (the Trainer has no per-batch loss)
    "val_loss": "eval/loss",
    "val_time_s": "eval/runtime",
}
STEP = "step"  # the x axis, not a series


def parse_report_to(values: Iterable[str] | None) -> tuple[str, ...] | None:
    """`--report-to` as given: repeated and/or comma-separated names, "none" for no tracker, "all" for
    every installed one; None when not given (then `chosen` picks the default)."""
    if values is None:
        return None
    if isinstance(values, str):  # a job file's `report_to = "wandb"`
        values = [values]
    names = [name.strip().lower() for value in values for name in str(value).split(",") if name.strip()]
    unknown = sorted(set(names) - {*TRACKERS, "none", "all"})
    if unknown:
        raise SettingsError(f"report_to: unknown tracker {', '.join(unknown)}; choose from "
                            f"{', '.join(TRACKERS)}, all or none")
    if "none" in names and len(set(names)) > 1:
        raise SettingsError(f"report_to: 'none' with {', '.join(n for n in names if n != 'none')}: choose one")
    return tuple(dict.fromkeys(names))


def installed(tracker: str) -> bool:
    try:
        return importlib.util.find_spec(MODULES[tracker]) is not None
    except ValueError:  # a module set to None in sys.modules (uninstalled in all but name)
        return False


def chosen(report_to: tuple[str, ...] | None) -> tuple[str, ...]:
    """The trackers a run reports to: the ones named (each must be installed), every installed one for
    "all", none for "none", and by default TensorBoard when it is installed."""
    if report_to is None:
        return ("tensorboard",) if installed("tensorboard") else ()
    if "none" in report_to:
        return ()
    if "all" in report_to:
        return tuple(t for t in TRACKERS if installed(t))
    missing = [t for t in report_to if not installed(t)]
    if missing:
        extras = ",".join(missing)
        raise SettingsError(f"--report-to {','.join(missing)}: {', '.join(MODULES[t] for t in missing)} is not "
                            f"installed; pip install 'qprep[{extras}]' (or --report-to none)")
    return report_to


def check(names: tuple[str, ...], run: RunFolder) -> None:
    """What can be known of the trackers before a run loads anything: MLflow's store answers."""
    if "mlflow" in names:
        _MLflow.check(run)


def tracker_name(key: str) -> str:
    """The tracker's name for one value of a metrics row (a validation row's under eval/)."""
    if key in TRACKER_NAMES:
        return TRACKER_NAMES[key]
    if key.startswith("val_"):
        return f"eval/{key[len('val_'):]}"
    return f"train/{key}"


def tracker_values(row: dict) -> dict[str, float]:
    """A metrics row as the trackers get it: every number but the step, under its tracker name."""
    return {tracker_name(key): float(value) for key, value in row.items()
            if key != STEP and isinstance(value, (int, float)) and not isinstance(value, bool)}


def flat_settings(settings: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested settings as flat hyperparameters (`lora.r`); values a tracker cannot hold as a number
    or a flag (None, lists) as text."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return flat


class Trackers:
    """The trackers of one run (rank 0's). `log(row)` takes each metrics row as it is written."""

    def __init__(self, reporters: list):
        self.reporters = reporters

    @classmethod
    def open(cls, names: tuple[str, ...], run: RunFolder, settings: dict, resumed: bool = False) -> "Trackers":
        """Start each named tracker for the run folder `run`. A `resumed` run first reports again the rows
        its metrics.jsonl kept (those up to its checkpoint), so that each tracker's run reads as one
        uninterrupted run's, as metrics.jsonl does; TensorBoard hides what the earlier attempts logged."""
        openers = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
        trackers = cls([])
        try:
            for name in names:
                trackers.reporters.append(openers[name](run, settings, resumed))
            if resumed and trackers.reporters and run.metrics.is_file():
                for line in run.metrics.read_text().splitlines():
                    trackers.log(json.loads(line))
        except BaseException:
            trackers.close()
            raise
        return trackers

    def log(self, row: dict) -> None:
        values = tracker_values(row)
        for reporter in self.reporters:
            reporter.log(values, int(row[STEP]))

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []

    def where(self) -> list[str]:
        return [reporter.where for reporter in self.reporters]


class _TensorBoard:
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN`, or the parent of several runs)."""

    def __init__(self, run: RunFolder, settings: dict, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.where = str(run.tensorboard)
        if resumed:
            # Every row metrics.jsonl kept is reported again, so the earlier attempts' event files hold
            # nothing more: they go. (TensorBoard's `purge_step` would hide them only while it reads the
            # files in the order they were written, which it takes from names stamped to the second:
            # an attempt started in the same second as the one it resumes could be read first.)
            for earlier in Path(self.where).glob("events.out.tfevents.*"):
                earlier.unlink()
        self.writer = SummaryWriter(self.where)
        flat = flat_settings(settings)
        self.writer.add_text("settings", f"```\n{json.dumps(settings, indent=2, default=str)}\n```")
        # into this run's own event file (SummaryWriter.add_hparams would open a second run for them)
        for summary in hparams(flat, {}):
            self.writer.file_writer.add_summary(summary)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A W&B run in RUN/wandb, as the run's name the run folder's, in WANDB_PROJECT (default qprep).
    Online when W&B has an API key (WANDB_API_KEY, `wandb login`) and reaches its server; otherwise in
    W&B's own offline mode (`wandb sync RUN/wandb/offline-run-*` uploads it later). WANDB_MODE decides
    when set."""

    def __init__(self, run: RunFolder, settings: dict, resumed: bool):
        import wandb

        # a configured key, not checked against the server here: init tells an unreachable one
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb.login(prompt=False, verify=False) else "offline")
        init = dict(project=os.environ.get("WANDB_PROJECT", "qprep"), name=run.root.resolve().name,
                    dir=str(run.root), config=settings, reinit="create_new")
        why = "no API key" if mode == "offline" and not os.environ.get("WANDB_MODE") else "WANDB_MODE"
        try:
            self.run = wandb.init(**init, mode=mode)
        except wandb.errors.CommError as exc:  # no network: W&B's offline mode, not a failed training run
            if os.environ.get("WANDB_MODE"):
                raise
            mode, why = "offline", f"unreachable: {str(exc).splitlines()[0]}"
            self.run = wandb.init(**init, mode=mode)
        # as the Trainer's integration: every series against the optimizer step, and a step's
        # several batches kept as rows of their own (wandb.log's step= would merge them)
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)
        self.where = self.run.url if mode == "online" else f"{Path(self.run.dir).parent} (W&B offline, {why})"

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "train/global_step": step})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """An MLflow run at MLFLOW_TRACKING_URI (a tracking server, or a database), by default the database
    RUN/mlflow.db (`mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`), which needs the full mlflow
    package; the experiment is MLFLOW_EXPERIMENT_NAME's (default qprep)."""

    def __init__(self, run: RunFolder, settings: dict, resumed: bool):
        import mlflow

        self.client, uri, name = self.check(run)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run.root.resolve().name).info.run_id
        params = [mlflow.entities.Param(k, str(v)) for k, v in flat_settings(settings).items()]
        self.client.log_batch(self.run_id, params=params)
        self.where = f"{uri} (MLflow run {self.run_id})"
        self.mlflow = mlflow

    @staticmethod
    def check(run: RunFolder):
        """(client, store URI, experiment name), once the store answers; else a SettingsError naming the fix."""
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run.mlflow_db.resolve()}"
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "qprep")
        try:
            client = mlflow.MlflowClient(uri)
            client.get_experiment_by_name(name)
        except Exception as exc:  # mlflow-skinny has no database store: its error names neither cause nor fix
            raise SettingsError(f"--report-to mlflow: MLflow cannot open the store {uri} ({exc}); set "
                                f"MLFLOW_TRACKING_URI to a tracking server (http://host:5000), or pip install "
                                f"mlflow for a local database") from exc
        return client, uri, name

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.mlflow.entities.Metric(k, v, now, step)
                                                    for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
