"""What `qprep train` reports beyond its run folder: the trackers hold metrics.jsonl's numbers (read
back with each tracker's own reader), a tracker not installed is refused before the first step, the
memory metric says what it measures, and the figures have the axes and series they claim."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qprep.cli import main
from qprep.train.loop import memory_metric
from qprep.train.trackers import tracker_values

ANSWERS = {"a": "the video is short", "b": "the video is what happens"}


def write_data(path: Path, ids=("a", "b")) -> Path:
    path.write_text(json.dumps([{"id": i, "conversations": [{"from": "human", "value": "<video> what happens"},
                                                            {"from": "gpt", "value": ANSWERS[i]}]} for i in ids]))
    return path


def expected_series(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """Each tracker name's (step, value) pairs, in order, as metrics.jsonl's rows give them."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        for name, value in tracker_values(row).items():
            series.setdefault(name, []).append((row["step"], value))
    return series


@pytest.fixture(scope="module")
def reported_run(omni_store, tmp_path_factory):
    """A short `qprep train` with validation, reporting to every tracker: (run folder, its stderr). In a
    process of its own, with transformers' warnings on, so that its output is the command's alone."""
    model_dir, cache = omni_store
    root = tmp_path_factory.mktemp("reported")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRANSFORMERS_VERBOSITY"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", TRANSFORMERS_VERBOSITY="warning",
               # mlflow-skinny has no database store: its own file store (read back below with its client)
               MLFLOW_TRACKING_URI=(root / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true")
    run = root / "run"
    data, held_out = write_data(root / "train.json"), write_data(root / "val.json", ["a"])
    done = subprocess.run([sys.executable, "-m", "qprep", "train", "--cache", str(cache.store.root), "--data",
                           str(data), "--eval-data", str(held_out), "--model", model_dir, "--out", str(run),
                           "--epochs", "2", "--grad-accum", "2", "--lr", "1e-2", "--lora-r", "4",
                           "--report-to", "tensorboard,wandb", "--report-to", "mlflow", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return run, done.stdout + done.stderr


def test_tensorboard_holds_metrics_jsonl_name_for_name_and_step_for_step(reported_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = reported_run
    expected = expected_series(run / "metrics.jsonl")
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/batch_loss", "eval/loss",
            "train/host_peak_rss_mb"} <= set(expected)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, pairs in expected.items():
        # event files hold float32
        assert [(e.step, e.value) for e in events.Scalars(name)] == [(s, pytest.approx(v, rel=1e-6)) for s, v in pairs]
    tensors = events.Tags()["tensors"]  # the settings: as text, and as the HPARAMS tab's hyperparameters
    assert "settings/text_summary" in tensors
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def read_wandb_records(run: Path) -> list:
    """The records of W&B's offline run file. wandb 0.31 has no Python reader of its own for it (its
    datastore moved into the Go wandb-core), so this walks the file's LevelDB log framing (blocks of
    32 KiB, 7-byte record headers) and parses each record with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def items(repeated) -> dict:
    """A record's key/value items (history, config) as a dict."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in repeated}


def test_wandb_offline_history_holds_the_same_numbers(reported_run):
    run, _ = reported_run
    records = read_wandb_records(run)
    logged: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = items(record.history.item)
            for name, value in row.items():
                if not name.startswith("_") and name != "train/global_step":
                    logged.setdefault(name, []).append((row["train/global_step"], value))
    assert logged == expected_series(run / "metrics.jsonl")
    (started,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    config = items(started.config.update)  # the settings, as the run's config
    assert config["grad_accum"] == 2 and config["lora"]["r"] == 4 and config["epochs"] == 2


def test_mlflow_holds_the_same_numbers(reported_run, monkeypatch):
    import mlflow

    run, _ = reported_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient((run.parent / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("qprep").experiment_id])
    for name, pairs in expected_series(run / "metrics.jsonl").items():
        history = sorted(client.get_metric_history(found.info.run_id, name), key=lambda m: (m.step, m.timestamp))
        assert sorted((m.step, m.value) for m in history) == sorted(pairs), name
    assert found.data.params["lora.r"] == "4" and found.data.params["grad_accum"] == "2"


def test_train_output_has_no_loss_type_warning(reported_run):
    _, output = reported_run
    assert "reporting to" in output  # the command's own lines are there
    assert "loss_type" not in output, output


def test_a_tracker_not_installed_is_refused_before_the_first_step(omni_store, tmp_path, monkeypatch):
    model_dir, cache = omni_store
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an import of an uninstalled package finds
    result = CliRunner().invoke(main, ["train", "--cache", str(cache.store.root), "--data",
                                       str(write_data(tmp_path / "train.json")), "--model", model_dir,
                                       "--out", str(tmp_path / "run"), "--report-to", "wandb", "--quiet"])
    assert result.exit_code == 3, result.output
    assert "pip install 'qprep[wandb]'" in result.output
    assert not (tmp_path / "run").exists()  # nothing loaded, nothing written
    result = CliRunner().invoke(main, ["train", "--cache", str(cache.store.root), "--data",
                                       str(tmp_path / "train.json"), "--model", model_dir, "--out",
                                       str(tmp_path / "run"), "--report-to", "neptune"])
    assert result.exit_code == 3 and "unknown tracker neptune" in result.output


def test_the_memory_metric_names_the_device_it_measures():
    """A rank runs on cuda:N: its peak is the GPU's, not the host's (no GPU needed to decide the name)."""
    import torch

    assert memory_metric("cuda:1") == memory_metric(torch.device("cuda", 3)) == "cuda_peak_memory_mb"
    assert memory_metric("cuda") == "cuda_peak_memory_mb"
    assert memory_metric("cpu") == "host_peak_rss_mb"


def test_the_loss_figure_has_its_axes_and_series(reported_run):
    from qprep.train.plot import loss_figure

    run, _ = reported_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    figure = loss_figure(run / "metrics.jsonl")
    loss_axes, rate_axes = figure.axes
    assert (loss_axes.get_xlabel(), loss_axes.get_ylabel(), rate_axes.get_ylabel()) == (
        "batches trained", "loss", "learning rate")
    (epoch_axis,) = loss_axes.child_axes  # the epochs above the batches
    assert epoch_axis.get_xlabel() == "epoch"
    lines = {line.get_label(): line for axes in figure.axes for line in axes.get_lines()}
    assert set(lines) == {"loss per batch", "running mean of 10 batches", "validation loss", "epoch start",
                          "learning rate"}
    assert list(lines["loss per batch"].get_ydata()) == [row["loss"] for row in rows if "loss" in row]
    assert list(lines["validation loss"].get_ydata()) == [row["val_loss"] for row in rows if "val_loss" in row]
    assert list(lines["learning rate"].get_ydata()) == [row["lr"] for row in rows if "lr" in row]
    batches = sum("loss" in row for row in rows)
    assert list(lines["epoch start"].get_xdata()) == [batches / 2 + 0.5] * 2  # 2 epochs: one boundary
    assert [t.get_text() for t in loss_axes.get_legend().get_texts()] == [
        "loss per batch", "running mean of 10 batches", "validation loss", "epoch start", "learning rate"]
    assert (run / "loss.png").stat().st_size > 10_000


def test_qprep_plot_draws_several_runs_on_one_figure(reported_run, tmp_path):
    from qprep.train.plot import runs_figure

    run, _ = reported_run
    figure = runs_figure([run, run])
    loss_axes, rate_axes = figure.axes
    labels = [line.get_label() for line in loss_axes.get_lines()]
    assert labels == [f"{run}: training loss", f"{run}: validation loss"] * 2
    assert (rate_axes.get_xlabel(), rate_axes.get_ylabel()) == ("batches trained", "learning rate")
    result = CliRunner().invoke(main, ["plot", str(run), str(run), "--out", str(tmp_path / "both.png")])
    assert result.exit_code == 0 and (tmp_path / "both.png").is_file(), result.output
    result = CliRunner().invoke(main, ["plot", str(tmp_path), "--out", str(tmp_path / "none.png")])
    assert result.exit_code == 3 and "no metrics.jsonl" in result.output


def test_wandb_without_its_server_logs_offline(tmp_path, monkeypatch):
    """An API key but no network (a server that refuses): W&B's own offline mode, not a failed run."""
    import wandb

    from qprep.train.run_folder import RunFolder
    from qprep.train.trackers import Trackers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers.open(("wandb",), RunFolder(tmp_path), {"lr": 0.1})
    trackers.log({"epoch": 0, "batch": 0, "step": 1, "loss": 2.5, "lr": 0.1})
    (where,) = trackers.where()
    trackers.close()
    wandb.teardown()  # its service writes the run file apart from the run (a process's exit waits for it)
    assert "W&B offline, unreachable" in where
    rows = [items(r.history.item) for r in read_wandb_records(tmp_path) if r.WhichOneof("record_type") == "history"]
    assert [(row["train/global_step"], row["train/batch_loss"], row["train/learning_rate"]) for row in rows] == [
        (1, 2.5, 0.1)]


def test_report_to_reads_as_the_trainers_and_defaults_to_tensorboard_when_installed(monkeypatch):
    from qprep.errors import SettingsError
    from qprep.schemas.training import TrainSettings
    from qprep.train.trackers import chosen

    assert TrainSettings(report_to=["tensorboard,wandb", "mlflow", "wandb"]).report_to == ("tensorboard", "wandb",
                                                                                             "mlflow")
    assert TrainSettings(report_to="wandb").report_to == ("wandb",)  # a job file's string
    assert chosen(None) == ("tensorboard",) and chosen(("none",)) == ()
    assert chosen(("all",)) == ("tensorboard", "wandb", "mlflow")  # the test extra installs all three
    with pytest.raises(SettingsError, match="'none' with wandb: choose one"):
        TrainSettings(report_to=("none", "wandb"))
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert chosen(None) == ()  # without TensorBoard, the default reports nowhere


def test_an_mlflow_store_that_cannot_open_is_refused_before_the_first_step(omni_store, tmp_path, monkeypatch):
    """mlflow-skinny (the extra) has no database store: without MLFLOW_TRACKING_URI the error says what to set."""
    model_dir, cache = omni_store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # as with mlflow-skinny, even where the full mlflow is
    result = CliRunner().invoke(main, ["train", "--cache", str(cache.store.root), "--data",
                                       str(write_data(tmp_path / "train.json")), "--model", model_dir,
                                       "--out", str(tmp_path / "run"), "--report-to", "mlflow", "--quiet"])
    assert result.exit_code == 3, result.output
    assert "MLFLOW_TRACKING_URI" in result.output and "pip install mlflow" in result.output
    assert not (tmp_path / "run" / "run.json").exists()  # nothing loaded, nothing trained
