"""`qprep train` end to end on a tiny Omni store: the loss falls, a resumed run equals an
uninterrupted one, and the adapter and metrics land where they should."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qprep.cli import main
from qprep.errors import SettingsError
from qprep.schemas.training import TrainSettings
from qprep.train.loop import train
from qprep.schemas.training import LoraSettings

ANSWERS = {"a": "the video is short", "b": "the video is what happens"}


def write_data(path) -> str:
    records = [{"id": video_id, "conversations": [{"from": "human", "value": "<video> what happens"},
                                                  {"from": "gpt", "value": answer}]}
               for video_id, answer in ANSWERS.items()] + [{"id": "broken", "conversations": [
                   {"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}]}]
    path.write_text(json.dumps(records))
    return str(path)


# warmup over 3 of the 4 steps, then the linear decay: a resume after step 2 restarts mid-warmup
SETTINGS = TrainSettings(epochs=4, lr=1e-2, batch_size=1, grad_accum=2, seed=3, warmup_steps=3,
                         lora=LoraSettings(r=4, alpha=8, dropout=0.1))


def adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_training_lowers_the_loss_and_a_resumed_run_equals_an_uninterrupted_one(omni_store, tmp_path):
    model_dir, cache = omni_store
    data = write_data(tmp_path / "train.json")
    store = cache.store.root
    whole = train(store, data, model_dir, tmp_path / "whole", SETTINGS, progress=False, echo=lambda _: None)
    assert whole.samples == 2 and whole.skipped == {"video failed extraction": ["broken"]}
    assert whole.steps == 4
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {"loss", "tokens_per_s", "step_time_s", "host_peak_rss_mb"} <= set(lines[0])
    # each optimizer step's last batch records the step: its loss, the lr it used, the norm before clipping
    assert [line["lr"] for line in lines[1::2]] == [1e-2 * f for f in (0.0, 1 / 3, 2 / 3, 1.0)]
    assert all({"step_loss", "grad_norm"} <= set(line) for line in lines[1::2])
    # every epoch visits both samples once: its mean loss is comparable from epoch to epoch
    epoch_loss = [sum(line["loss"] for line in lines if line["epoch"] == epoch) / 2 for epoch in range(4)]
    assert epoch_loss[-1] < epoch_loss[0], epoch_loss

    # killed after step 2, mid-warmup: the checkpoints after it and the adapter never written
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "adapter")
    for later in sorted((tmp_path / "split").glob("checkpoint-*"))[2:]:
        shutil.rmtree(later)
    assert sorted(p.name for p in (tmp_path / "split").glob("checkpoint-*")) == ["checkpoint-0000001",
                                                                              "checkpoint-0000002"]
    train(store, data, model_dir, tmp_path / "split", SETTINGS, resume=True, progress=False, echo=lambda _: None)
    ours, theirs = adapter(tmp_path / "split" / "adapter"), adapter(tmp_path / "whole" / "adapter")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the copied rows past checkpoint 2 were cut on resume and logged again: the metrics read as one run's
    resumed = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [(row["epoch"], row["batch"], row["loss"]) for row in resumed] == [(row["epoch"], row["batch"], row["loss"])
                                                                              for row in lines]
    # and so does TensorBoard's (the default tracker): the events copied past checkpoint 2 are gone with the
    # earlier attempt's event file, the kept rows reported again with the rest in the resumed run's own
    events = EventAccumulator(str(tmp_path / "split" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert len(list((tmp_path / "split" / "tensorboard").glob("events.*"))) == 1
    assert [(e.step, e.value) for e in events.Scalars("train/batch_loss")] == [
        (row["step"], pytest.approx(row["loss"], rel=1e-6)) for row in resumed]


def test_validation_reports_the_held_out_loss_keeps_the_best_adapter_and_leaves_the_training_unchanged(
        omni_store, tmp_path):
    """Validation runs in eval mode without gradients or random numbers: the adapter ends bit for bit
    as without it. Every --eval-every steps and at epoch ends; --save-best keeps the lowest."""
    model_dir, cache = omni_store
    data = write_data(tmp_path / "train.json")
    held_out = json.loads(Path(data).read_text())[:1]
    (tmp_path / "val.json").write_text(json.dumps(held_out))
    store = cache.store.root
    plain = train(store, data, model_dir, tmp_path / "plain", SETTINGS, progress=False, echo=lambda _: None)
    settings = dataclasses.replace(SETTINGS, eval_every=1, save_best=True)
    lines: list[str] = []
    run = train(store, data, model_dir, tmp_path / "validated", settings, eval_data=tmp_path / "val.json",
                progress=False, echo=lines.append)
    assert "validation: 1 samples" in lines
    ours, theirs = adapter(tmp_path / "validated" / "adapter"), adapter(tmp_path / "plain" / "adapter")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours) and run.last_loss == plain.last_loss
    rows = [json.loads(line) for line in (tmp_path / "validated" / "metrics.jsonl").read_text().splitlines()]
    validations = [row for row in rows if "val_loss" in row]
    # 4 optimizer steps of 2 batches, one epoch each: after every step, and the epoch end coincides
    assert [(row["epoch"], row["step"]) for row in validations] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    best = min(validations, key=lambda row: row["val_loss"])
    assert run.best_val_loss == best["val_loss"] and run.last_val_loss == validations[-1]["val_loss"]
    saved = json.loads((tmp_path / "validated" / "best-adapter" / "best.json").read_text())
    assert saved == {"step": best["step"], "val_loss": best["val_loss"]}
    at_best = adapter(tmp_path / "validated" / f"checkpoint-{best['step']:07d}")  # each epoch's end is a step's
    assert all(torch.equal(adapter(tmp_path / "validated" / "best-adapter")[k], at_best[k]) for k in at_best)
    assert (tmp_path / "validated" / "loss.png").is_file()  # its series: tests/test_train_trackers.py

    with pytest.raises(SettingsError, match="need --eval-data"):
        train(store, data, model_dir, tmp_path / "no-data", settings, progress=False, echo=lambda _: None)


def strict_json(line: str):
    """`line` read as strict JSON: NaN and Infinity, which Python writes and JSON lacks, fail the test."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))


def test_a_loss_that_is_not_a_number_stops_the_run_at_its_step_and_no_metric_is_ever_nan(
        omni_store, tmp_path, monkeypatch):
    """The third batch's loss is made NaN: the run stops there naming the step and its sample, every
    metrics line written is strict JSON, and the checkpoint before it resumes into a finished run.
    A validation loss that is NaN is written as null with a warning, and never kept as the best."""
    from qprep.errors import LossNotFinite
    from qprep.train.objectives.sft import SupervisedObjective

    model_dir, cache = omni_store
    data, store, real = write_data(tmp_path / "train.json"), cache.store.root, SupervisedObjective.loss
    calls = []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(SupervisedObjective, "loss", poisoned)
    with pytest.raises(LossNotFinite, match=r"the loss is nan at optimizer step 2 \(epoch 1, batch 0; samples [ab]\)"):
        train(store, data, model_dir, tmp_path / "run", SETTINGS, progress=False, echo=lambda _: None)
    rows = [strict_json(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(row["epoch"], row["batch"]) for row in rows] == [(0, 0), (0, 1)]
    monkeypatch.setattr(SupervisedObjective, "loss", real)
    resumed = train(store, data, model_dir, tmp_path / "run", SETTINGS, resume=True, progress=False,
                    echo=lambda _: None)
    assert resumed.steps == 4 and (tmp_path / "run" / "adapter").is_dir()

    monkeypatch.setattr(SupervisedObjective, "validate", lambda *args, **kwargs: float("nan"))
    (tmp_path / "val.json").write_text(json.dumps(json.loads(Path(data).read_text())[:1]))
    said: list[str] = []
    settings = dataclasses.replace(SETTINGS, epochs=1, save_best=True)
    run = train(store, data, model_dir, tmp_path / "nan-val", settings, eval_data=tmp_path / "val.json",
                progress=False, echo=said.append)
    rows = [strict_json(line) for line in (tmp_path / "nan-val" / "metrics.jsonl").read_text().splitlines()]
    assert [row["val_loss"] for row in rows if "val_loss" in row] == [None]
    assert "step 1: not a finite number, written as null: val_loss" in said
    assert run.best_val_loss is None and not (tmp_path / "nan-val" / "best-adapter").exists()


def test_metrics_json_writes_null_for_every_number_that_is_not_finite_and_names_it():
    from qprep.schemas.metrics import metrics_json

    warned: list[str] = []
    row = {"loss": float("nan"), "ok": 1.5, "grounding": {"mIoU": float("inf"), "per_query": [0.5, float("-inf")]}}
    text = metrics_json(row, warn=warned.append)
    assert strict_json(text) == {"loss": None, "ok": 1.5, "grounding": {"mIoU": None, "per_query": [0.5, None]}}
    assert warned == ["not a finite number, written as null: loss, grounding.mIoU, grounding.per_query[1]"]
    assert metrics_json({"step": 3}, warn=warned.append) == '{"step": 3}' and len(warned) == 1


def test_cli_train_takes_a_job_file_and_flags_and_records_the_effective_settings(omni_store, tmp_path):
    model_dir, cache = omni_store
    job = tmp_path / "job.toml"
    job.write_text('name = "mine"\n[train]\nepochs = 3\nlr = 1e-3\nlora_r = 4\nworkers = 0\n')
    result = CliRunner().invoke(main, [
        "train", "--cache", str(cache.store.root), "--data", write_data(tmp_path / "train.json"), "--model", model_dir,
        "--out", str(tmp_path / "run"), "--job", str(job), "--epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "left out 1: video failed extraction (broken)" in result.output
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert (settings["epochs"], settings["lr"], settings["lora"]["r"]) == (1, 1e-3, 4)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
