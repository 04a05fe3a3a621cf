"""Stage 2: choose which frames to keep, and the time they stand for.

Two policies, both over an optional `video_start`/`video_end` window:

* fps-based, with qwen-vl-utils' `smart_nframes` rules: `fps` frames per second of video, at
  least `min_frames`, at most `max_frames`, never more than exist, a multiple of the temporal
  patch size;
* a fixed count (`num_frames`), rounded to a multiple of the temporal patch size.

Indices are `linspace(first, last, n).round()` over the window as in qwen-vl-utils, computed with
the same torch call so that float32 rounding agrees. The time a temporal patch spans is
`temporal_patch_size / actual sampling rate`: 100 frames over 180 s give 3.6 s per grid, whatever
fps was configured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from qprep.errors import FrameCountError, TimeRangeError
from qprep.pipeline.probe import VideoInfo
from qprep.schemas.settings import ModelSpec, VideoSettings


@dataclass(frozen=True)
class FramePlan:
    indices: np.ndarray  # int64, presentation-order frame numbers, ascending
    pts: np.ndarray  # int64, the stream timestamps of those frames
    times: np.ndarray  # float64, seconds from the first frame of the video (from pts)
    window_frames: int  # frames inside the video_start/video_end window
    sample_fps: float
    second_per_grid: float


def plan_frames(info: VideoInfo, settings: VideoSettings, spec: ModelSpec) -> FramePlan:
    first, last, window_frames = frame_window(info, settings)
    count = frame_count(info, settings, spec, window_frames)
    indices = torch.linspace(first, last, count).round().long().numpy()
    pts = info.frame_pts[indices]
    sample_fps = count / max(window_frames, 1e-6) * info.average_fps
    return FramePlan(
        indices=indices,
        pts=pts,
        times=info.seconds(pts),
        window_frames=window_frames,
        sample_fps=sample_fps,
        second_per_grid=spec.temporal_patch_size / sample_fps,
    )


def frame_window(info: VideoInfo, settings: VideoSettings) -> tuple[int, int, int]:
    """First and last frame inside the window, and how many there are (qwen-vl-utils' rule)."""
    total, fps = info.frame_count, info.average_fps
    start, end = settings.video_start, settings.video_end
    if start is None and end is None:
        return 0, total - 1, total
    max_duration = total / fps
    first = math.ceil(max(0.0, min(start, max_duration)) * fps) if start is not None else 0
    last = total - 1
    if end is not None:
        last = min(math.floor(max(0.0, min(end, max_duration)) * fps), total - 1)
    if first >= last:
        raise TimeRangeError(
            info.path,
            f"video_start={start} / video_end={end} select no frames of a {max_duration:.3f} s video "
            f"({total} frames at {fps:.3f} fps)",
        )
    return first, last, last - first + 1


def frame_count(info: VideoInfo, settings: VideoSettings, spec: ModelSpec, window_frames: int) -> int:
    factor = spec.temporal_patch_size
    if settings.num_frames is not None:
        count = round(settings.num_frames / factor) * factor
    else:
        min_frames = math.ceil(settings.min_frames / factor) * factor
        max_frames = math.floor(min(settings.max_frames, window_frames) / factor) * factor
        count = window_frames / info.average_fps * settings.fps
        count = min(max(count, min_frames), max_frames, window_frames)
        count = math.floor(count / factor) * factor
    if count < factor or count > window_frames:
        asked = f"num_frames={settings.num_frames}" if settings.num_frames is not None else f"fps={settings.fps}"
        raise FrameCountError(
            info.path,
            f"{asked} needs {max(count, factor)} frames but the video (window) has only {window_frames}",
        )
    return count
