"""Typed errors for bad input.

Every error raised for a video names the file and the cause, so that the extractor can record it
in the manifest and move on. `code` is a short stable identifier for scripts and the manifest.
"""

from __future__ import annotations

from pathlib import Path

# Every code a failed manifest row can hold is here: these three, and each VideoError's `code`.
# Codes of failures that are not the video's content: the run records them per video and goes on.
WORKER_DIED = "worker_died"  # the process preparing the video died on every try (decoder crash, OOM kill)
TOWER_ERROR = "tower_error"  # the towers could not take the prepared video
INTERNAL_ERROR = "internal_error"  # a qprep bug, recorded loudly instead of stopping the run


class QprepError(Exception):
    """Base class of every error qprep raises on purpose."""


class SettingsError(QprepError, ValueError):
    """Settings that contradict each other or the model (raised before any video is touched)."""


class LossNotFinite(SettingsError):
    """Training reached a loss that is not a number (NaN or infinite): the step and its samples are
    named, and the run stops before the optimizer applies it (the checkpoints so far stay sound)."""


class RankFailed(QprepError):
    """A data-parallel training process died or raised; the message names the rank and the cause."""


class ExtractError(QprepError):
    """The extraction itself cannot run (no video's fault): its workers cannot start."""


class StoreError(SettingsError):
    """A store that cannot be used as asked: not a store, built with other settings, or in use."""


class VideoError(QprepError):
    """A video that cannot be prepared. Subclasses say why."""

    code = "video_error"

    def __init__(self, path: str | Path, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class EmptyFileError(VideoError):
    code = "empty_file"


class UnreadableFileError(VideoError):
    """Missing, not permitted, or not a container FFmpeg can open."""

    code = "unreadable"


class FileNameError(VideoError):
    """A file name that cannot be recorded as it is (not valid UTF-8: ids and the manifest are text)."""

    code = "bad_file_name"


class NoVideoStreamError(VideoError):
    code = "no_video_stream"


class DecodeError(VideoError):
    """Frames that the index promises but the decoder cannot produce (truncated or corrupt data)."""

    code = "decode_failed"


class GeometryError(VideoError):
    """A frame size or aspect ratio the model cannot take."""

    code = "bad_geometry"


class FrameCountError(VideoError):
    """Fewer frames in the (windowed) video than the sampling policy asks for."""

    code = "too_few_frames"


class TimeRangeError(VideoError):
    """`video_start` / `video_end` select nothing."""

    code = "bad_time_range"


class AudioError(VideoError):
    """An audio stream that exists but cannot be decoded, or is too long for the chosen policy."""

    code = "audio_failed"
