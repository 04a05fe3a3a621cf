"""The two executors of `qprep extract`: Ray Data and the in-process one write the same store, byte
for byte (Omni with and without audio, VL), also after an incremental change; `auto` picks the
in-process one for a small plan with no cluster; a video that kills its local worker process on
every try is recorded failed while the rest finish; the local workers start beside the towers'
loading; a script without a `__main__` guard gets a clear error, not a folder of failed videos.
Kills of the driver at the crash points run against both executors in tests/test_crash_points.py.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qprep import open_cache
from qprep.errors import WORKER_DIED
from qprep.extraction import executors
from qprep.extraction.run import ExtractOptions, extract
from qprep.schemas.settings import VideoSettings
from qprep.synth import VideoSpec, make_video
from test_extract import FOLDER, make_folder, snapshot

LOCAL = ExtractOptions(progress=False, executor="local")
RAY = ExtractOptions(progress=False, executor="ray")
VL_FOLDER = {name: {**spec, "audio": False} for name, spec in FOLDER.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2_5_omni", "qwen2_5_vl"])
def test_both_executors_write_the_same_store(ray_cluster, tiny_model, tmp_path, kind):
    model_dir = str(tiny_model(kind))
    videos = make_folder(tmp_path / "videos", FOLDER if kind == "qwen2_5_omni" else VL_FOLDER)
    (videos / "broken.mp4").write_bytes(b"\0" * 64)  # a failed row: recorded the same way by both

    def both() -> tuple[dict, dict]:
        runs = {}
        for name, options in (("ray", RAY), ("local", LOCAL)):
            summary = extract(videos, tmp_path / f"{name}.zarr", model_dir, VideoSettings(fps=2), shards=3,
                              options=options)
            assert summary.executor == name and (summary.failed, summary.failures[0][0]) == (1, "broken.mp4")
            runs[name] = snapshot(tmp_path / f"{name}.zarr")
        return runs["ray"], runs["local"]

    on_ray, local = both()
    assert on_ray == local and len(local) > 3
    make_video(videos / "talk/b.mp4", VideoSpec(width=96, height=64, fps=30, seconds=3, bframes=2))
    make_video(videos / "new/e.mp4", VideoSpec(width=64, height=64, fps=25, seconds=2, audio=kind == "qwen2_5_omni"))
    again_on_ray, again_local = both()
    assert again_on_ray == again_local != local
    if kind == "qwen2_5_omni":
        cache = open_cache(tmp_path / "local.zarr")
        assert cache.row("silent").audio_length == 0 and cache.row("talk/a").audio_length > 0


def test_auto_runs_small_plans_in_process_and_clusters_and_large_plans_on_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(executors, "_ray_running", lambda: False)
    assert executors.choose("auto", None, executors.LOCAL_MAX_VIDEOS) == "local"
    assert executors.choose("auto", None, executors.LOCAL_MAX_VIDEOS + 1) == "ray"
    assert executors.choose("auto", "10.0.0.1:6379", 3) == "ray"
    assert executors.choose("local", None, 10**6) == "local" and executors.choose("ray", None, 1) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert executors.choose("auto", None, 3) == "ray"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(executors, "_ray_running", lambda: True)  # a notebook's Ray, or this suite's
    assert executors.choose("auto", None, 3) == "ray"


def dies_on_the_poison(video, *, poison: str, tries: str, **kwargs):
    """The CPU stage, except that the process preparing the poison video kills itself (a module-level
    function: the worker processes import it from here)."""
    from qprep.extraction.stages import prepare_video

    if video.path == poison:
        with open(tries, "a") as tally:
            tally.write("try\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return prepare_video(video, **kwargs)


@pytest.mark.slow
def test_a_video_that_kills_its_local_worker_on_every_try_is_recorded_failed_and_the_rest_finish(
        tiny_model, tmp_path, monkeypatch):
    """The pool goes down with every task in it, so each video in flight may be the cause: they are
    tried again one at a time, and only the one whose worker dies again and again is failed."""
    model_dir = str(tiny_model("qwen2_5_omni"))
    videos = make_folder(tmp_path / "videos")
    clean = extract(videos, tmp_path / "clean.zarr", model_dir, VideoSettings(fps=2), shards=3, options=LOCAL)
    tries = tmp_path / "tries"
    monkeypatch.setattr(executors, "prepare_video", functools.partial(dies_on_the_poison, poison="c.mp4", tries=str(tries)))
    store = tmp_path / "store.zarr"
    summary = extract(videos, store, model_dir, VideoSettings(fps=2), shards=3, options=LOCAL)
    assert tries.read_text().count("try") == executors.CPU_STAGE_TRIES
    assert (summary.extracted, summary.failed) == (clean.extracted - 1, 1)
    assert summary.failures[0][0] == "c.mp4" and "died on all 3 tries" in summary.failures[0][1]
    assert open_cache(store).row("c").error_code == WORKER_DIED

    monkeypatch.undo()
    again = extract(videos, store, model_dir, VideoSettings(fps=2), shards=3, options=LOCAL)
    assert (again.extracted, again.failed) == (1, 0)
    assert snapshot(store) == snapshot(tmp_path / "clean.zarr")


def marks_its_start(video, *, marker: str, **kwargs):
    """The CPU stage, after leaving a file behind (a module-level function, as above)."""
    from qprep.extraction.stages import prepare_video

    Path(marker).touch()
    return prepare_video(video, **kwargs)


def test_the_local_workers_prepare_videos_while_the_towers_load(tiny_model, tmp_path, monkeypatch):
    """The workers start beside the towers' loading, not after it: a released checkpoint's towers take
    seconds to load (weights read, CUDA started), which the other cores would spend idle."""
    import time

    videos = make_folder(tmp_path / "videos", {"a.mp4": FOLDER["talk/a.mp4"], "b.mp4": FOLDER["talk/b.mp4"]})
    marker = tmp_path / "a-worker-started"
    load_towers = executors._load_towers

    def load_once_a_worker_runs(job, options):
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline, "no worker took a video while the towers were loading"
            time.sleep(0.05)
        return load_towers(job, options)

    monkeypatch.setattr(executors, "prepare_video", functools.partial(marks_its_start, marker=str(marker)))
    monkeypatch.setattr(executors, "_load_towers", load_once_a_worker_runs)
    summary = extract(videos, tmp_path / "store.zarr", str(tiny_model("qwen2_5_omni")), VideoSettings(fps=2),
                      options=LOCAL)
    assert (summary.extracted, summary.failed) == (2, 0)


@pytest.mark.slow
def test_a_script_without_a_main_guard_is_told_so(tiny_model, tmp_path):
    videos = make_folder(tmp_path / "videos", {"a.mp4": FOLDER["talk/a.mp4"]})
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from qprep.extraction.run import ExtractOptions, extract\n"
        f"extract({str(videos)!r}, {str(tmp_path / 'store.zarr')!r}, {str(tiny_model('qwen2_5_omni'))!r},\n"
        "        options=ExtractOptions(progress=False, executor='local'))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)
    assert done.returncode != 0
    assert "worker processes could not start" in done.stderr and "__main__" in done.stderr


def test_the_local_executor_counts_the_cores_a_container_allows(monkeypatch):
    import io

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(64)), raising=False)
    limits = {"cpu.max": "400000 100000\n"}  # a pod of 4 CPUs on a 64-core host

    def fake_open(path, *args, **kwargs):
        if str(path).endswith("cpu.max") and "cpu.max" in limits:
            return io.StringIO(limits["cpu.max"])
        raise FileNotFoundError(path)

    monkeypatch.setattr(executors, "open", fake_open, raising=False)
    assert executors.usable_cores() == 4
    limits["cpu.max"] = "max 100000\n"
    assert executors.usable_cores() == 64
    del limits["cpu.max"]  # no cgroup v2: the affinity alone
    assert executors.usable_cores() == 64


@pytest.mark.slow
def test_fixed_shape_image_calls_write_the_same_store_on_both_executors(ray_cluster, tiny_model, tmp_path):
    """`--image-call-rows`: Ray hands the tower actor batches of --batch-size media, the local executor
    groups images as its workers finish them; other batch-mates, other offsets, the same bytes."""
    import dataclasses

    from conftest import make_image
    from qprep.schemas.towers import Budget

    media = tmp_path / "media"
    for index, (width, height) in enumerate(((200, 150), (96, 160), (120, 120), (64, 48), (180, 100), (140, 210))):
        make_image(media / f"photo-{index}.jpg", width, height, seed=index, quality=90)
    make_video(media / "clip.mp4", VideoSpec(width=64, height=64, fps=25, seconds=1, audio=False))
    budget, stores = Budget(image_rows=1024), {}
    for name, options in (("ray", dataclasses.replace(RAY, budget=budget, batch_size=3)),
                          ("local", dataclasses.replace(LOCAL, budget=budget))):
        summary = extract(media, tmp_path / f"{name}.zarr", str(tiny_model("qwen2_5_vl")),
                          VideoSettings(fps=2, kinds=("video", "image")), dtype="float32", shards=2, options=options)
        assert (summary.executor, summary.extracted, summary.failed) == (name, 7, 0)
        stores[name] = snapshot(tmp_path / f"{name}.zarr")
    assert stores["ray"] == stores["local"]
