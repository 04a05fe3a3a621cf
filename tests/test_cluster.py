"""A real several-node Ray cluster on this machine: the CPU stage spreads over the nodes, and the
store it writes is the same, byte for byte, as a single-node run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qprep.extraction.run import ExtractOptions, extract
from qprep.schemas.settings import VideoSettings
from test_extract import make_folder, snapshot

pytestmark = pytest.mark.slow

CLIPS = {f"clip{i}.mp4": dict(width=112, height=84, fps=25, seconds=2, audio=i % 3 != 0) for i in range(8)}


def test_a_three_node_cluster_writes_the_same_store_as_one_node(ray_cluster, tiny_model, tmp_path):
    model_dir = str(tiny_model("qwen2_5_omni"))
    videos = make_folder(tmp_path / "videos", CLIPS)
    single = tmp_path / "single.zarr"
    extract(videos, single, model_dir, VideoSettings(fps=2), shards=4, options=ExtractOptions(progress=False))

    script = Path(__file__).with_name("multinode_run.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, str(script), str(videos), str(tmp_path / "multi.zarr"), model_dir, "2", "2"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["nodes"] == 3 and report["extracted"] == len(CLIPS) and report["failed"] == 0
    assert report["cpu_stage_nodes"] == 2 and not report["cpu_stage_on_head"], report  # spread, head has no CPU
    assert report["tower_nodes"] == 1, report
    assert snapshot(tmp_path / "multi.zarr") == snapshot(single)
