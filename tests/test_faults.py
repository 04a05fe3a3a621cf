"""Faults a run must survive, each provoked for real:

* a Ray worker running a CPU-stage task and the tower actor in the middle of a batch, both killed
  with SIGKILL while an extract runs: Ray retries their work and the store is the same as an
  uninterrupted run's; a reader polling the store meanwhile only ever sees complete shards;
* a video whose worker process dies on every try: recorded failed after three, the run goes on;
  so is one that kills the tower actor on every try of its batch, while its batch-mates, tried
  again one a batch, are extracted;
* a full disk (a small tmpfs) while a shard is written: a StoreError that names the store and
  "no space left", the committed shards intact, and the next run (with space) finishes;
* two `qprep extract` started at once on one new store: one refuses, saying another extract is
  writing, while the other holds the lock; killed with SIGKILL, the holder leaves no stale lock;
* `qprep train` killed with SIGKILL in the middle of writing a checkpoint, then killed again after
  a later checkpoint: resuming gives the same adapter as an uninterrupted run, bit for bit.

kill -9 of the extract driver at 10 moments of a run (decoding and encoding, arrays written,
manifest written, renamed, committed) is tests/test_crash_points.py.

The faults of Ray's workers and actor, and the two extracts at once, run on the session's Ray (a
SIGKILL hits the driver only; Ray cleans up a dead driver's job); the full disk is the store's and
runs with the in-process executor, as does the uninterrupted run every store here is compared with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import qprep.extraction.stages as stages
from qprep import open_cache
from qprep.errors import WORKER_DIED, StoreError
from qprep.extraction.run import ExtractOptions, extract
from qprep.schemas.settings import VideoSettings
from qprep.store.layout import Store
from qprep.train.loop import train
from test_extract import reference_run, snapshot
from test_train_loop import SETTINGS, write_data

pytestmark = pytest.mark.slow

CLIPS = {f"clip{i:02d}.mp4": dict(width=64, height=48, fps=10, seconds=1, audio=i % 2 == 0) for i in range(12)}
SHARDS = 6  # about two videos a shard: shards wait for their second video while others are committed
ON_RAY = ExtractOptions(progress=False, batch_size=1, executor="ray")
IN_PROCESS = dataclasses.replace(ON_RAY, executor="local")


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    """(videos, model dir, snapshot of an uninterrupted run's store, that store)."""
    model_dir = str(tiny_model("qwen2_5_omni"))
    videos, reference = reference_run(tmp_path_factory.mktemp("faults"), CLIPS, model_dir, shards=SHARDS,
                                      options=IN_PROCESS)
    return videos, model_dir, snapshot(reference), reference


def extract_command(videos, store, model_dir) -> list[str]:
    """The same run as `job`'s uninterrupted one, from the command line, on the session's Ray (an
    in-process run of these clips can end before a second process has started)."""
    import ray

    return [sys.executable, "-m", "qprep.cli", "extract", "--videos", str(videos), "--out", str(store), "--model",
            model_dir, "--fps", "2", "--shards", str(SHARDS), "--batch-size", "1", "--quiet",
            "--ray-address", ray.get_runtime_context().gcs_address]


def environment() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # --ray-address says which Ray


def complete_rows(store: Path) -> int:
    """How many videos a reader sees; every one of them must have all its tokens."""
    if not Store.exists(store):
        return 0
    cache = open_cache(store)
    for video_id in cache.ids():
        row = cache.row(video_id)
        assert cache.video_tokens(video_id).shape[0] == row.video_length > 0, video_id
        audio = cache.audio_tokens(video_id)
        assert (0 if audio is None else audio.shape[0]) == row.audio_length, video_id
    return len(cache.ids())


def garbage(store: Path) -> list[str]:
    """Files no committed manifest refers to: arrays of unreferenced keys, temporary manifests."""
    keys = {(row["shard"], row["shard_key"][:16]) for row in Store.open(store).manifest().to_pylist()}
    leftovers = [str(p) for p in (store / "manifest").iterdir() if not p.name.endswith(".parquet") or
                 p.name.startswith(".")]
    for key_dir in (store / "shards").glob("*/*"):
        if (int(key_dir.parent.name), key_dir.name) not in keys:
            leftovers.append(str(key_dir))
    return leftovers


# ---- a Ray worker and the tower actor killed mid-task --------------------------------------------

def title(process: psutil.Process) -> str:
    """What Ray says the process is running: `ray::<task or actor.method>`, `ray::IDLE` between tasks."""
    try:
        return " ".join(process.cmdline()).strip()
    except psutil.Error:
        return ""


class Killer(threading.Thread):
    """SIGKILLs, one after the other, a process of the session's Ray caught running each task in
    `targets` (predicates on its title). The process is stopped first and its title read again, so
    the kill lands in the middle of that task, never between two."""

    def __init__(self, targets: list):
        import ray

        super().__init__(daemon=True)
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
        self.raylet = psutil.Process(raylet)
        self.targets = targets
        self.killed: list[tuple[int, str]] = []  # (pid, title when killed)
        self.stop = threading.Event()

    def run(self) -> None:
        for running in self.targets:
            while not self.stop.is_set() and not self._kill_one(running):
                time.sleep(0.02)

    def _kill_one(self, running) -> bool:
        for process in self.raylet.children(recursive=True):
            if not running(title(process)):
                continue
            try:
                process.send_signal(signal.SIGSTOP)
                now = title(process)
                if running(now):
                    process.send_signal(signal.SIGKILL)
                    self.killed.append((process.pid, now))
                    return True
                process.send_signal(signal.SIGCONT)  # it finished in between: try the next one
            except psutil.NoSuchProcess:
                pass
        return False


class Reader(threading.Thread):
    """Opens the store over and over while it is written, checking every visible video."""

    def __init__(self, store: Path):
        super().__init__(daemon=True)
        self.store, self.seen, self.errors = store, [], []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.seen.append(complete_rows(self.store))
            except Exception as exc:  # reported by the test, which fails on it
                self.errors.append(repr(exc))
            time.sleep(0.05)


def cpu_task(now: str) -> bool:
    return now.startswith("ray::Map(cpu_stage)")


def tower_batch(now: str) -> bool:
    return "TowerStage" in now and now.endswith(".submit")


def test_a_killed_cpu_worker_and_tower_actor_are_retried_and_the_store_is_complete(job, ray_cluster, tmp_path):
    videos, model_dir, reference, _ = job
    store = tmp_path / "store.zarr"
    killer, reader = Killer([cpu_task, tower_batch]), Reader(store)
    killer.start()
    reader.start()
    try:
        summary = extract(videos, store, model_dir, VideoSettings(fps=2), shards=SHARDS, options=ON_RAY)
    finally:
        killer.stop.set()
        reader.stop.set()
        killer.join()
        reader.join()
    assert len(killer.killed) == 2, killer.killed  # both kills landed while the run was going
    (_, worker), (_, actor) = killer.killed
    assert cpu_task(worker) and tower_batch(actor)  # a worker mid-task, then the actor mid-batch
    assert (summary.extracted, summary.failed) == (len(CLIPS), 0), summary.failures  # their work redone
    assert snapshot(store) == reference
    assert not reader.errors, reader.errors[:3]
    assert reader.seen == sorted(reader.seen) and reader.seen[-1] <= len(CLIPS)  # never a row lost
    assert any(0 < n < len(CLIPS) for n in reader.seen), reader.seen  # it read while shards came in


def test_a_video_whose_worker_dies_on_every_try_is_recorded_failed_and_the_rest_finish(
        job, ray_cluster, tmp_path, monkeypatch):
    """A video that kills the process preparing it (a decoder crash, an out-of-memory kill) is tried
    CPU_STAGE_TRIES times, then recorded as failed; it does not stall or abort the run, and the next
    run tries it again. With tower batches of several videos too: it never reached the towers, so it
    does not go through the one-a-batch pass that videos lost with a tower batch get."""
    import qprep.extraction.cluster as cluster

    videos, model_dir, reference, _ = job
    store, tries, poison = tmp_path / "store.zarr", tmp_path / "tries", "clip03.mp4"

    def dies_on_the_poison(item, **kwargs):  # runs in the Ray worker (a closure travels by value)
        if json.loads(item["video"])["path"] == poison:
            with open(tries, "a") as tally:
                tally.write("try\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return stages.cpu_stage(item, **kwargs)

    monkeypatch.setattr(cluster, "cpu_stage", dies_on_the_poison)
    summary = extract(videos, store, model_dir, VideoSettings(fps=2), shards=SHARDS,
                      options=dataclasses.replace(ON_RAY, batch_size=4))
    assert tries.read_text().count("try") == stages.CPU_STAGE_TRIES
    assert (summary.extracted, summary.failed) == (len(CLIPS) - 1, 1)
    assert summary.failures[0][0] == poison
    assert summary.failures[0][1].startswith("the worker preparing it died on all 3 tries"), summary.failures
    row = open_cache(store).row("clip03")
    assert (row.status, row.error_code) == ("failed", WORKER_DIED)

    monkeypatch.undo()
    again = extract(videos, store, model_dir, VideoSettings(fps=2), shards=SHARDS, options=ON_RAY)
    assert (again.extracted, again.failed, again.up_to_date) == (1, 0, len(CLIPS) - 1)
    assert snapshot(store) == reference


def test_a_video_that_kills_the_tower_actor_on_every_try_is_recorded_failed_and_the_rest_finish(
        job, ray_cluster, tmp_path, monkeypatch):
    """The tower actor is restarted each time it dies, and a batch is tried TOWER_BATCH_TRIES times:
    a video that crashes the towers ends failed instead of looping the run. Its batch-mates, lost
    with its batch, are extracted when the lost videos go through again one a batch."""
    import qprep.extraction.cluster as cluster

    videos, model_dir, reference, _ = job
    store, tries, poison = tmp_path / "store.zarr", tmp_path / "tries", "clip05.mp4"

    class CrashesOnThePoison(stages.TowerStage):  # runs in the actor (the class travels by value)
        def encode(self, prepared):
            if any(item.video.path == poison for item in prepared):
                with open(tries, "a") as tally:
                    tally.write(f"{len(prepared)}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            return super().encode(prepared)

    monkeypatch.setattr(cluster, "TowerStage", CrashesOnThePoison)
    summary = extract(videos, store, model_dir, VideoSettings(fps=2), shards=SHARDS,
                      options=dataclasses.replace(ON_RAY, batch_size=4))
    # each try's batch size: its batch with others, then alone
    assert tries.read_text().split() == ["4"] * stages.TOWER_BATCH_TRIES + ["1"] * stages.TOWER_BATCH_TRIES
    assert (summary.extracted, summary.failed) == (len(CLIPS) - 1, 1)
    assert summary.failures[0][0] == poison
    assert summary.failures[0][1].startswith("the tower actor died on all 3 tries"), summary.failures
    assert open_cache(store).row("clip05").error_code == WORKER_DIED

    monkeypatch.undo()
    again = extract(videos, store, model_dir, VideoSettings(fps=2), shards=SHARDS, options=ON_RAY)
    assert (again.extracted, again.failed, again.up_to_date) == (1, 0, len(CLIPS) - 1)
    assert snapshot(store) == reference


# ---- a full disk --------------------------------------------------------------------------------

def disk_pages(root: Path) -> int:
    """Bytes a tmpfs needs for every file under `root` (whole 4 KiB pages)."""
    return sum(-(-path.stat().st_size // 4096) * 4096 for path in root.rglob("*") if path.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted for the test; `resize(bytes)` changes its size in place."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def resize(size: int, options: str = "") -> None:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options}size={size}", "tmpfs", str(mount)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.fail(f"this test mounts a small tmpfs, which needs root (CAP_SYS_ADMIN): {done.stderr}")

    yield mount, resize
    subprocess.run(["umount", str(mount)], check=False, capture_output=True)


def test_a_full_disk_fails_clearly_keeps_the_committed_shards_and_the_next_run_finishes(job, small_disk):
    videos, model_dir, reference, reference_store = job
    mount, resize = small_disk
    resize(disk_pages(reference_store) // 2 // 4096 * 4096)  # room for about half the shards
    store = mount / "store.zarr"
    with pytest.raises(StoreError) as error:
        extract(videos, store, model_dir, VideoSettings(fps=2), shards=SHARDS, options=IN_PROCESS)
    message = str(error.value)
    assert str(store) in message and "no space left on device" in message and "shard" in message, message

    kept = complete_rows(store)
    assert 0 < kept < len(CLIPS), kept  # the disk filled up mid-run, after some commits
    assert garbage(store) == []  # the shard that did not fit gave its space back

    resize(64 << 20, "remount,")
    resumed = extract(videos, store, model_dir, VideoSettings(fps=2), options=IN_PROCESS)
    assert resumed.extracted == len(CLIPS) - kept
    assert snapshot(store) == reference


# ---- two extracts at once -----------------------------------------------------------------------

def flock_holders(path: Path) -> set[int]:
    """Pids holding a flock on `path`, as the kernel lists them."""
    inode = os.stat(path).st_ino
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and int(fields[5].rsplit(":", 1)[1]) == inode:
            holders.add(int(fields[4]))
    return holders


def test_two_extracts_at_once_one_refuses_and_a_killed_holder_leaves_no_stale_lock(job, ray_cluster, tmp_path):
    videos, model_dir, reference, _ = job
    store = tmp_path / "store.zarr"
    command = extract_command(videos, store, model_dir)
    both = [subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    try:
        deadline = time.monotonic() + 300
        while all(p.poll() is None for p in both) and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = next(p for p in both if p.poll() is not None)
        writer = next(p for p in both if p is not refused)
        _, stderr = refused.communicate()
        assert refused.returncode == 3, stderr[-3000:]
        assert f"{store}: another qprep extract is writing this store" in stderr, stderr[-3000:]
        assert writer.poll() is None  # the refusal came while the other one was writing
        assert flock_holders(store / ".qprep" / "lock") == {writer.pid}
        writer.send_signal(signal.SIGKILL)  # the lock's holder dies mid-run
        writer.wait()
    finally:
        for process in both:
            process.kill()
            process.communicate()
    assert flock_holders(store / ".qprep" / "lock") == set()  # the kernel dropped it with its holder

    before = complete_rows(store)
    resumed = extract(videos, store, model_dir, VideoSettings(fps=2), options=IN_PROCESS)
    assert resumed.extracted == len(CLIPS) - before
    assert snapshot(store) == reference


# ---- training killed and resumed ----------------------------------------------------------------

# Runs `qprep train` and dies with SIGKILL half-way through writing the K-th checkpoint's state
# (the file that makes a checkpoint count): what a kill at that instant leaves on disk.
DIE_WRITING_STATE = """
import os, pathlib, signal, sys
write_text, seen = pathlib.Path.write_text, []
def dying_write_text(self, data, *args, **kwargs):
    if self.parent.name.startswith("checkpoint-") and self.name.startswith("state"):
        seen.append(self)
        if len(seen) == int(sys.argv[1]):
            write_text(self, data[: len(data) // 2], *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
    return write_text(self, data, *args, **kwargs)
pathlib.Path.write_text = dying_write_text
from qprep.cli import main
main(sys.argv[2:])
"""


def train_command(cache, data, model_dir, out, *extra) -> list[str]:
    s = SETTINGS
    return ["-m", "qprep.cli", "train", "--cache", str(cache), "--data", data, "--model", model_dir, "--out", str(out),
            "--epochs", str(s.epochs), "--lr", str(s.lr), "--batch-size", str(s.batch_size),
            "--grad-accum", str(s.grad_accum), "--seed", str(s.seed), "--lora-r", str(s.lora.r),
            "--lora-alpha", str(s.lora.alpha), "--lora-dropout", str(s.lora.dropout), "--workers", "0",
            "--warmup-steps", str(s.warmup_steps), "--save-every", "1", "--quiet", *extra]


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def complete_checkpoints(out: Path) -> list[str]:
    return sorted(p.parent.name for p in out.glob("checkpoint-*/state.json"))


def test_training_killed_mid_checkpoint_and_after_one_resumes_to_the_same_adapter(omni_store, tmp_path):
    model_dir, cache = omni_store
    data = write_data(tmp_path / "train.json")
    out = tmp_path / "run"
    arguments = train_command(cache.store.root, data, model_dir, out)

    # killed while writing checkpoint 2's state: checkpoint 1 is the last one that counts
    result = subprocess.run([sys.executable, "-c", DIE_WRITING_STATE, "2", *arguments[2:]], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert complete_checkpoints(out) == ["checkpoint-0000001"]
    assert (out / "checkpoint-0000002" / "adapter_model.safetensors").is_file()  # a checkpoint cut short

    # resumed, and killed from outside as soon as a later checkpoint is complete
    resumed = subprocess.Popen([sys.executable, *arguments, "--resume"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while complete_checkpoints(out) == ["checkpoint-0000001"] and resumed.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    resumed.send_signal(signal.SIGKILL)
    _, stderr = resumed.communicate()
    assert resumed.returncode == -signal.SIGKILL, stderr[-3000:]
    assert not (out / "adapter").exists()  # it died before the end

    quiet = dict(progress=False, echo=lambda _: None)
    train(cache.store.root, data, model_dir, out, SETTINGS, resume=True, **quiet)
    whole = tmp_path / "whole"
    train(cache.store.root, data, model_dir, whole, SETTINGS, **quiet)
    ours, theirs = load_file(str(out / "adapter" / "adapter_model.safetensors")), \
        load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((out / "checkpoint-0000004" / "state.json").read_text())["step"] == 4
    # the rows up to each checkpoint reached the disk with it, and those logged after it were cut and logged again
    logged = ("epoch", "batch", "step", "loss")
    assert [[row[k] for k in logged] for row in metrics_rows(out)] == [[row[k] for k in logged]
                                                                      for row in metrics_rows(whole)]
    # TensorBoard's record (the default tracker) too, whatever the killed attempts had written
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/batch_loss")] == [
        (row["step"], pytest.approx(row["loss"], rel=1e-6)) for row in metrics_rows(whole)]
