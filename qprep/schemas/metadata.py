"""What the CPU stage learns about each video: the time and geometry facts the cache records."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class VideoMetadata:
    path: str
    codec: str
    width: int  # as displayed, after rotation
    height: int
    rotation: int  # counter-clockwise degrees applied, as players do
    native_fps: float  # the stream's average frame rate (what frame sampling uses, as qwen-vl-utils)
    real_fps: float  # the stream's base rate (FFmpeg's r_frame_rate)
    frame_count: int  # frames in the whole video
    duration: float  # seconds
    frame_indices: tuple[int, ...]  # sampled frames, presentation order
    frame_times: tuple[float, ...]  # their timestamps, seconds from the first frame (from pts)
    sample_fps: float  # the rate actually sampled at
    second_per_grid: float  # temporal_patch_size / sample_fps
    resized_height: int
    resized_width: int
    has_audio: bool
    audio_seconds: float  # length of the audio window used (0 without audio)
    audio_windows: int  # processor windows the audio was featurized in (0 without audio)
    audio_note: str  # why there is no audio, when there is none

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
