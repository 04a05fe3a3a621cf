"""Data-parallel training on CPU ranks (gloo): the global order, the losses and the adapter of N
ranks follow one rank with the same global batch; a run resumes on another rank count; the model sharded over the ranks (FSDP2) trains as unsharded; torchrun
starts the same loop; a killed rank ends the run with its name, and `--resume` finishes it.

Tolerance. Two ranks each run a batch of one sample and all-reduce (sum) their gradients; one rank
with the same global batch runs one right-padded batch of two, whose matmuls have other shapes,
so its per-sample values differ by float32 rounding, and Adam's normalised steps carry that into
the weights at the scale of the learning rate. Measured on the tiny Omni model over 6 steps at lr
1e-3: losses within 2e-7 relative, adapter weights within 3e-8 to 1.8e-7 from one test session to
the next (1.3e-7 at lr 1e-2 in a plain process, every time). The tests allow 1e-5 relative on the
losses (two samples' losses differ by 1e-3 and more, so an order mistake shows) and 1e-6 on the
weights. Where the two runs do the same arithmetic (a 1-rank resume of a 2-rank run takes the same
one-sample parts in turn, and gradient accumulation adds them as the all-reduce does), they are
equal bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from qprep.schemas.training import LoraSettings, TrainSettings
from qprep.train.loop import train

SETTINGS = TrainSettings(epochs=2, lr=1e-3, batch_size=1, grad_accum=1, workers=0,
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0))


def write_records(path) -> str:
    """Five records over the store's two videos: a global batch of two leaves one rank idle at each
    epoch's end."""
    records = [{"id": video_id, "conversations": [{"from": "human", "value": "<video> what happens"},
                                                  {"from": "gpt", "value": f"answer {n} for {video_id}"}]}
               for n, video_id in enumerate("ababa")]
    path.write_text(json.dumps(records))
    return str(path)


def rows(run) -> list[dict]:
    """The training rows of a run's metrics (validation rows apart: `validations`)."""
    return [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def validations(run) -> list[dict]:
    return [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in row]


def adapter(run) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def largest_gap(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max(float((ours[k] - theirs[k]).abs().max()) for k in ours)


def stop_after_epoch(source, target, epoch_steps: int) -> None:
    """A copy of a finished run as it was when killed after the first epoch (with the rows logged
    after its checkpoint, which the resumed run cuts and logs again)."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "adapter")
    for later in sorted(target.glob("checkpoint-*"))[1:]:
        shutil.rmtree(later)
    kept = json.loads(next(target.glob("checkpoint-*")).joinpath("state.json").read_text())
    assert {k: kept[k] for k in ("epoch", "batch", "step")} == {"epoch": 1, "batch": 0, "step": epoch_steps}


@pytest.fixture
def one_thread():
    """The single-process reference on one thread, as each rank runs (the launcher sets
    OMP_NUM_THREADS to the cores per rank): a thread count of its own would add its own rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_ranks(omni_store, tmp_path_factory):
    """A finished 2-rank run (per-rank batch 1) on the tiny Omni store."""
    model_dir, cache = omni_store
    root = tmp_path_factory.mktemp("ranks")
    data = write_records(root / "train.json")
    held_out = write_records(root / "val.json")  # five records: the ranks take three and two of them
    summary = train(cache.store.root, data, model_dir, root / "two", SETTINGS, ranks=2, device="cpu",
                    eval_data=held_out, progress=False)
    return model_dir, cache, data, root / "two", summary


@pytest.mark.slow
def test_two_ranks_follow_one_rank_with_the_same_global_batch(two_ranks, one_thread, tmp_path):
    model_dir, cache, data, two, summary = two_ranks
    one = tmp_path / "one"
    train(cache.store.root, data, model_dir, one, dataclasses.replace(SETTINGS, batch_size=2),
          eval_data=str(two.parent / "val.json"), progress=False, echo=lambda _: None)
    ours, theirs = rows(two), rows(one)
    # the validation loss: each rank's share of the held-out records, summed by rank 0
    assert [r["epoch"] for r in validations(two)] == [r["epoch"] for r in validations(one)] == [0, 1]
    for mine, reference in zip(validations(two), validations(one)):
        assert mine["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    assert summary.steps == 6 and summary.samples == 5  # 3 global batches per epoch, the last one sample
    assert [(r["epoch"], r["batch"], r["step"]) for r in ours] == [(r["epoch"], r["batch"], r["step"]) for r in theirs]
    for mine, reference in zip(ours, theirs):
        assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    gap = largest_gap(adapter(two), adapter(one))
    print(f"2 ranks against 1 rank with the same global batch: adapter weights within {gap:.3g}")
    assert gap < 1e-6
    assert json.loads((two / "run.json").read_text())["global_batch"] == 2
    assert (two / "loss.png").is_file() and len(list(two.glob("checkpoint-*"))) == 2  # rank 0 wrote them once
    # and reported alone, to the default tracker: one TensorBoard event file (tests/test_train_trackers.py reads one)
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_a_two_rank_run_resumes_on_one_rank_and_a_one_rank_run_on_two(two_ranks, one_thread, tmp_path):
    model_dir, cache, data, two, _ = two_ranks
    stop_after_epoch(two, tmp_path / "two-then-one", epoch_steps=3)
    train(cache.store.root, data, model_dir, tmp_path / "two-then-one", SETTINGS, resume=True, progress=False,
          echo=lambda _: None)
    # one rank takes the global batch's two one-sample parts in turn: the same arithmetic, bit for bit
    assert largest_gap(adapter(tmp_path / "two-then-one"), adapter(two)) == 0.0
    assert [(r["epoch"], r["batch"]) for r in rows(tmp_path / "two-then-one")] == [(r["epoch"], r["batch"])
                                                                                  for r in rows(two)]

    settings = dataclasses.replace(SETTINGS, batch_size=2)
    one = tmp_path / "one"
    train(cache.store.root, data, model_dir, one, settings, progress=False, echo=lambda _: None)
    stop_after_epoch(one, tmp_path / "one-then-two", epoch_steps=3)
    train(cache.store.root, data, model_dir, tmp_path / "one-then-two", dataclasses.replace(settings, batch_size=1),
          resume=True, ranks=2, device="cpu", progress=False)
    assert largest_gap(adapter(tmp_path / "one-then-two"), adapter(one)) < 1e-6


@pytest.mark.slow
def test_torchrun_starts_the_same_loop(two_ranks, tmp_path):
    model_dir, cache, data, two, _ = two_ranks
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "qprep", "train", "--cache", str(cache.store.root), "--data", data, "--model", model_dir,
               "--out", str(tmp_path / "torchrun"), "--epochs", "2", "--lr", "1e-3", "--grad-accum", "1",
               "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--workers", "0", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("6 steps, loss") == 1  # rank 0 alone reports
    assert largest_gap(adapter(tmp_path / "torchrun"), adapter(two)) == 0.0


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_with_its_name_and_resume_finishes_it(omni_store, tmp_path):
    import psutil

    model_dir, cache = omni_store
    data = write_records(tmp_path / "train.json")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "qprep", "train", "--cache", str(cache.store.root), "--data", data,
               "--model", model_dir, "--out", str(run), "--epochs", "40", "--grad-accum", "1", "--lora-r", "4",
               "--lora-dropout", "0", "--workers", "0", "--cpu-ranks", "2", "--quiet"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(run.glob("checkpoint-*/state.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if "multiprocessing" in " ".join(p.cmdline())]
        assert ranks, "no rank processes found"
        os.kill(ranks[-1].pid, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 6, stderr[-2000:]
    assert "training stopped: rank" in stderr and "SIGKILL" in stderr and "--resume continues" in stderr
    settings = TrainSettings(epochs=40, grad_accum=1, workers=0, lora=LoraSettings(r=4, dropout=0.0))
    summary = train(cache.store.root, data, model_dir, run, settings, resume=True, progress=False, echo=lambda _: None)
    assert summary.steps == 40 * 3 and (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_ray_train_runs_the_same_loop_on_the_suites_ray(two_ranks, ray_cluster, tmp_path):
    """Two Ray Train workers (TorchTrainer on the test session's Ray): the same adapter as the two
    ranks the elastic launcher started, bit for bit; the summary comes back from rank 0."""
    model_dir, cache, data, two, summary = two_ranks
    on_ray = train(cache.store.root, data, model_dir, tmp_path / "ray", SETTINGS, ranks=2, device="cpu",
                   ray_address="auto", progress=False)
    assert on_ray.steps == summary.steps and on_ray.last_loss == summary.last_loss
    assert largest_gap(adapter(tmp_path / "ray"), adapter(two)) == 0.0
    assert [(r["epoch"], r["batch"]) for r in rows(tmp_path / "ray")] == [(r["epoch"], r["batch"]) for r in rows(two)]


@pytest.mark.slow
def test_ray_train_restarts_the_workers_from_the_last_checkpoint_when_one_dies(omni_store, ray_cluster, tmp_path):
    import threading

    import psutil

    model_dir, cache = omni_store
    data = write_records(tmp_path / "train.json")
    run = tmp_path / "run"
    settings = dataclasses.replace(SETTINGS, epochs=10)
    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.monotonic() + 240
        while not list(run.glob("checkpoint-*/state.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
        if workers:
            killed.append(workers[-1].pid)
            os.kill(workers[-1].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint)
    killer.start()
    summary = train(cache.store.root, data, model_dir, run, settings, ranks=2, device="cpu", ray_address="auto",
                    ray_restarts=2, progress=False)
    killer.join()
    assert killed, "no Ray Train worker was found to kill"
    assert summary.steps == 10 * 3
    done = {(r["epoch"], r["batch"]) for r in rows(run)}
    assert done == {(epoch, batch) for epoch in range(10) for batch in range(3)}  # resumed, nothing skipped


@pytest.fixture(scope="module")
def sharded(two_ranks, tmp_path_factory):
    """The `two_ranks` run again with the model sharded over the two ranks (FSDP2)."""
    model_dir, cache, data, two, _ = two_ranks
    run = tmp_path_factory.mktemp("sharded") / "run"
    summary = train(cache.store.root, data, model_dir, run, dataclasses.replace(SETTINGS, shard=True), ranks=2,
                    device="cpu", eval_data=str(two.parent / "val.json"), progress=False)
    return run, summary


@pytest.mark.slow
def test_sharded_ranks_train_as_unsharded_ranks_and_the_adapter_loads_onto_the_full_model(two_ranks, sharded):
    """Sharded, the ranks all-gather each layer's weights whole and reduce-scatter its gradients: the
    same matmuls and the same sum of the same two values as the all-reduce, so losses and adapter are
    equal bit for bit. Only the gradient norm is computed otherwise (from the shards' norms), so it
    may differ in the last bits; here it stays near 0.6, below max_grad_norm 1, so clipping scales
    by exactly 1 on both sides."""
    from peft import PeftModel, get_peft_model_state_dict

    from reference import full_model

    model_dir, _, _, two, summary = two_ranks
    run, on_shards = sharded
    assert on_shards.steps == summary.steps
    ours, theirs = rows(run), rows(two)
    assert [(r["epoch"], r["batch"], r["step"]) for r in ours] == [(r["epoch"], r["batch"], r["step"]) for r in theirs]
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]
    for mine, reference in zip(ours, theirs):
        assert mine["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-6)
        assert mine["grad_norm"] < SETTINGS.max_grad_norm
    assert [r["val_loss"] for r in validations(run)] == [r["val_loss"] for r in validations(two)]
    assert largest_gap(adapter(run), adapter(two)) == 0.0
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(full_model(model_dir), run / "adapter"))
    saved = adapter(run)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.slow
def test_a_sharded_run_resumes_sharded_bit_for_bit_and_refuses_to_resume_unsharded(two_ranks, sharded, tmp_path):
    model_dir, cache, data, _, _ = two_ranks
    run, _ = sharded
    stop_after_epoch(run, tmp_path / "resumed", epoch_steps=3)
    with pytest.raises(Exception, match="settings.shard"):
        train(cache.store.root, data, model_dir, tmp_path / "resumed", SETTINGS, resume=True, progress=False,
              echo=lambda _: None)
    train(cache.store.root, data, model_dir, tmp_path / "resumed", dataclasses.replace(SETTINGS, shard=True),
          resume=True, ranks=2, device="cpu", progress=False)
    assert largest_gap(adapter(tmp_path / "resumed"), adapter(run)) == 0.0
    assert [r["loss"] for r in rows(tmp_path / "resumed")] == [r["loss"] for r in rows(run)]


def test_shard_needs_two_ranks(omni_store, tmp_path):
    from qprep.errors import SettingsError

    model_dir, cache = omni_store
    with pytest.raises(SettingsError, match="--shard shards the model over the ranks: start two or more"):
        train(cache.store.root, write_records(tmp_path / "train.json"), model_dir, tmp_path / "run",
              dataclasses.replace(SETTINGS, shard=True), progress=False, echo=lambda _: None)
