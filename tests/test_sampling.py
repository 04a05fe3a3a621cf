"""Frame choice and time metadata follow qwen-vl-utils' rules, with honest times."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from qwen_vl_utils.vision_process import calculate_video_frame_range, smart_nframes

import qprep
from qprep.errors import FrameCountError, TimeRangeError
from qprep.pipeline.probe import VideoInfo
from qprep.pipeline.sample import plan_frames
from qprep.schemas.settings import ModelSpec, VideoSettings
from qprep.synth import VideoSpec, frame_times


def fake_info(total_frames: int, fps: float) -> VideoInfo:
    time_base = Fraction(1, 90000)
    pts = np.round(np.arange(total_frames) * 90000 / fps).astype(np.int64)
    return VideoInfo(path="fake.mp4", codec="h264", coded_width=64, coded_height=64, time_base=time_base,
                     average_fps=fps, real_fps=fps, duration=total_frames / fps, packet_pts=pts,
                     packet_is_key=np.arange(total_frames) % 30 == 0, packet_shown=np.ones(total_frames, bool),
                     audio=None)


def reference_plan(total_frames, fps, element):
    """qwen-vl-utils' decord/torchcodec readers, minus the reading."""
    start, end, window = calculate_video_frame_range(element, total_frames, fps)
    count = smart_nframes(element, total_frames=window, video_fps=fps)
    indices = torch.linspace(start, end, count).round().long().tolist()
    return indices, count / max(window, 1e-6) * fps


CASES = list(itertools.product(
    [7, 30, 31, 299, 1800, 5401],  # frames in the video
    [24.0, 25.0, 30000 / 1001, 60.0, 12.5],  # its average fps
    [dict(fps=2.0), dict(fps=0.5), dict(fps=4.0, min_frames=8, max_frames=64), dict(nframes=6), dict(nframes=101),
     dict(fps=2.0, video_start=1.3, video_end=9.9), dict(fps=1.0, video_start=4.0), dict(nframes=4, video_end=3.1)],
))


@pytest.mark.parametrize("total, fps, element", CASES)
def test_frame_choice_equals_qwen_vl_utils(total, fps, element):
    settings = VideoSettings(
        fps=element.get("fps"), num_frames=element.get("nframes"), min_frames=element.get("min_frames", 4),
        max_frames=element.get("max_frames", 768), video_start=element.get("video_start"),
        video_end=element.get("video_end"))
    try:
        expected_indices, expected_fps = reference_plan(total, fps, element)
    except ValueError:
        with pytest.raises((FrameCountError, TimeRangeError)):
            plan_frames(fake_info(total, fps), settings, ModelSpec())
        return
    plan = plan_frames(fake_info(total, fps), settings, ModelSpec())
    assert plan.indices.tolist() == expected_indices
    assert plan.sample_fps == pytest.approx(expected_fps, rel=1e-12)
    assert plan.second_per_grid == pytest.approx(2 / expected_fps, rel=1e-12)


def test_probe_agrees_with_decord(videos):
    decord = pytest.importorskip("decord")  # listed in the test extra; absent only in a bare install
    for name, spec in {"p24.mp4": dict(fps=24, seconds=5), "p2997.mp4": dict(fps=30000 / 1001, seconds=4.5)}.items():
        path = videos(name, width=160, height=96, audio=False, **spec)
        reader = decord.VideoReader(str(path))
        prepared = qprep.preprocess_video(path, audio=False)
        assert prepared.metadata.frame_count == len(reader)
        assert prepared.metadata.native_fps == pytest.approx(reader.get_avg_fps(), rel=1e-9)


def test_fixed_count_over_a_long_clip_remaps_time(videos):
    """100 frames over 180 s: a temporal patch spans 3.6 s, not the 1 s that fps=2 would claim."""
    path = videos("long-180s.mp4", width=64, height=48, fps=10, seconds=180, gop_seconds=4, audio=False)
    prepared = qprep.preprocess_video(path, audio=False, num_frames=100, size=(56, 56))
    meta = prepared.metadata
    assert meta.duration == pytest.approx(180.0)
    assert meta.sample_fps == pytest.approx(100 / 180)
    assert prepared.second_per_grid == pytest.approx(3.6)
    assert prepared.video_grid_thw.tolist() == [[50, 4, 4]]
    assert len(meta.frame_times) == 100 and meta.frame_times[0] == 0.0
    assert meta.frame_times[-1] == pytest.approx(179.9)
    assert np.allclose(np.diff(meta.frame_times), 179.9 / 99, atol=0.1 + 1e-9)  # index rounding: one frame


def test_frame_times_come_from_pts_for_variable_frame_rate(videos):
    spec = dict(width=160, height=96, fps=30, seconds=4, vfr=True, audio=False)
    path = videos("vfr-times.mp4", **spec)
    prepared = qprep.preprocess_video(path, audio=False, num_frames=20)
    written = frame_times(VideoSpec(**spec))
    chosen = written[list(prepared.metadata.frame_indices)]
    assert np.allclose(prepared.metadata.frame_times, chosen, atol=1 / 90000)
    assert prepared.metadata.frame_count == len(written)


def test_window_restricts_frames_and_times(videos):
    path = videos("window.mp4", width=160, height=96, fps=25, seconds=10, audio=False)
    prepared = qprep.preprocess_video(path, audio=False, fps=2.0, video_start=2.0, video_end=6.0)
    times = prepared.metadata.frame_times
    assert 2.0 <= times[0] and times[-1] <= 6.0
    assert len(times) == 8


@pytest.mark.parametrize("total, fps, element", CASES)
def test_the_audits_frame_plan_equals_qwen_vl_utils(total, fps, element):
    """`qprep verify` re-derives the frame plan without qprep's CPU stage; it too is qwen-vl-utils'."""
    from qprep.audit.reference import frame_plan

    settings = {"fps": element.get("fps"), "num_frames": element.get("nframes"),
                "min_frames": element.get("min_frames", 4), "max_frames": element.get("max_frames", 768),
                "video_start": element.get("video_start"), "video_end": element.get("video_end")}
    try:
        expected_indices, expected_fps = reference_plan(total, fps, element)
    except ValueError:
        with pytest.raises(ValueError):
            frame_plan(total, fps, settings, factor=2)
        return
    plan = frame_plan(total, fps, settings, factor=2)
    assert plan.indices == expected_indices
    assert plan.sample_fps == pytest.approx(expected_fps, rel=1e-12)
    assert plan.second_per_grid == pytest.approx(2 / expected_fps, rel=1e-12)
