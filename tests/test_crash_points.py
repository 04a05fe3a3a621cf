"""kill -9 of the extract driver at 10 chosen moments: while rows are decoding and encoding, after a
token array is written, after a manifest's temporary file is written, right after the commit's
rename, and after a commit returns. After every kill a reader sees only complete shards; the next
run picks up the work, and each chain of killed runs ends in a store byte-identical to an
uninterrupted run's.

The killed drivers join the session's Ray (a kill -9 of the driver is what is tested; Ray cleans up
its job), so no run pays for starting Ray. Both chains run again with the in-process executor
(`--executor local`), whose worker processes end with the killed driver. Every chain ends in the
same uninterrupted store, made in process: the chains on Ray also check that the executors agree,
and the local chains need no Ray at all (they run beside the Ray tests under pytest-xdist).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qprep import open_cache
from qprep.extraction.run import ExtractOptions
from test_extract import reference_run, snapshot

pytestmark = pytest.mark.slow

CLIPS = {f"clip{i:02d}.mp4": dict(width=64, height=48, fps=10, seconds=1, audio=i % 2 == 0) for i in range(12)}
POINTS = ("row", "array", "manifest", "renamed", "committed")
CHAINS = [[f"{point}:{k}" for point in POINTS] for k in (1, 2)]  # 10 kills in 2 chains
SCRIPT = Path(__file__).with_name("crash_run.py")


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-points")
    model_dir = str(tiny_model("qwen2_5_omni"))
    videos, reference = reference_run(root, CLIPS, model_dir, shards=12,
                                      options=ExtractOptions(progress=False, executor="local"))
    return root, videos, model_dir, snapshot(reference)


def run(point: str, videos, store, model_dir, executor: str = "ray") -> int:
    """A driver that joins the session's Ray (or runs without it, `executor` "local") and dies with
    SIGKILL at `point` (return code -9)."""
    command = [sys.executable, str(SCRIPT), point, "extract", "--videos", str(videos), "--out", str(store),
               "--model", model_dir, "--fps", "2", "--shards", "12", "--batch-size", "1", "--quiet",
               "--executor", executor]
    if executor == "ray":
        import ray

        command += ["--ray-address", ray.get_runtime_context().gcs_address]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, -signal.SIGKILL), result.stderr[-3000:]
    return result.returncode


def assert_only_complete_shards(store: Path) -> int:
    if not (store / "zarr.json").exists():
        return 0
    cache = open_cache(store)
    for video_id in cache.ids():
        row = cache.row(video_id)
        assert cache.video_tokens(video_id).shape[0] == row.video_length
        audio = cache.audio_tokens(video_id)
        assert (0 if audio is None else audio.shape[0]) == row.audio_length
    return len(cache.ids())


@pytest.mark.parametrize("chain", range(len(CHAINS)))
def test_killed_drivers_on_ray_leave_consistent_stores_and_the_next_run_finishes(setup, ray_cluster, chain):
    kill_along(CHAINS[chain], setup, "ray")


@pytest.mark.parametrize("chain", range(len(CHAINS)))
def test_killed_local_drivers_leave_consistent_stores_and_the_next_run_finishes(setup, chain):
    kill_along(CHAINS[chain], setup, "local")


def kill_along(points: list[str], setup, executor: str) -> None:
    """One killed run per point in `points`, each resuming the store the last one left; then a run
    that finishes, ending in the uninterrupted store."""
    root, videos, model_dir, reference = setup
    store = root / f"{executor}-{points[0].replace(':', '')}.zarr"
    landed = []
    for point in points:
        before = assert_only_complete_shards(store)
        if run(point, videos, store, model_dir, executor) == -signal.SIGKILL:
            landed.append(point)
        after = assert_only_complete_shards(store)
        assert after >= before  # committed work is never lost
    assert landed == points, f"kills that did not land (the run finished first): {landed}"
    assert run("none:0", videos, store, model_dir, executor) == 0
    assert snapshot(store) == reference
