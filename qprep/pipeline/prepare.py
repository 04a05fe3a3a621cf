"""The CPU stage end to end: one video file in, one `PreparedVideo` out.

probe (index) → plan frames → sparse decode → rotate + resize each frame into a preallocated
uint8 buffer → patchify; and, for audio, decode + resample the window → Whisper log-mel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qprep.pipeline.audio import decode_audio, log_mel, sample_window, valid_mel_frames
from qprep.pipeline.decode import decode_frames
from qprep.pipeline.patchify import frame_to_tensor, normalize, patchify, resize, target_size
from qprep.pipeline.probe import VideoInfo, open_container, probe_container
from qprep.pipeline.sample import FramePlan, plan_frames
from qprep.schemas.metadata import VideoMetadata
from qprep.schemas.settings import ModelSpec, VideoSettings, load_model_spec


@dataclass(frozen=True)
class PreparedVideo:
    """A video ready for the towers: uint8 patches (what travels between stages), the audio
    features exactly as the processor returns them, and the metadata the cache records."""

    patches: torch.Tensor  # uint8 [grid_t·grid_h·grid_w, 3·tps·ps·ps]
    video_grid_thw: torch.Tensor  # int64 [1, 3]
    second_per_grid: float
    input_features: torch.Tensor | None  # float32 [windows, mel bins, window frames]
    feature_attention_mask: torch.Tensor | None  # int32 [windows, window frames]
    metadata: VideoMetadata
    spec: ModelSpec

    @property
    def pixel_values_videos(self) -> torch.Tensor:
        """The normalized float32 patches, identical to the processor's output."""
        return normalize(self.patches, self.spec)

    @property
    def mel_length(self) -> int:
        """Valid mel frames (what `get_rope_index` calls the audio sequence length)."""
        return 0 if self.feature_attention_mask is None else int(self.feature_attention_mask.sum())

    def mel_frames(self) -> torch.Tensor | None:
        """The valid mel frames only, [mel bins, mel_length]: the compact form the towers need."""
        if self.input_features is None:
            return None
        return valid_mel_frames(self.input_features, self.feature_attention_mask)


def preprocess_video(path: str | Path, model=None, *, threads: int = 0, **settings) -> PreparedVideo:
    """Prepare one video exactly as transformers' Qwen processors would, in bounded memory.

    `model` is a local model directory, hub id, preprocessor config (path or dict) or None for
    transformers' Qwen2-VL defaults. `settings` are `VideoSettings` fields, named as the CLI
    flags: `fps`, `num_frames`, `min_frames`, `max_frames`, `video_start`, `video_end`,
    `min_pixels`, `max_pixels`, `size`, `audio`, `long_audio`. `threads` caps FFmpeg's decoding
    threads (0: one per core).

    Returns a `PreparedVideo` with `pixel_values_videos`, `video_grid_thw`, `second_per_grid`,
    `input_features`, `feature_attention_mask` and `metadata`. Raises a `qprep.errors.VideoError`
    subclass naming the file and the cause for any input that cannot be prepared.
    """
    return prepare(path, VideoSettings(**settings), load_model_spec(model), threads=threads)


def prepare(path: str | Path, settings: VideoSettings, spec: ModelSpec, threads: int = 0) -> PreparedVideo:
    path = str(path)
    with open_container(path) as container:
        info = probe_container(container, path)
        plan = plan_frames(info, settings, spec)
        frames, rotation = _decode_and_resize(container, info, plan, settings, spec, threads)
    audio, audio_note = _audio(info, settings, spec)
    patches, grid = patchify(frames, spec)
    height, width = _display(info, rotation)
    metadata = VideoMetadata(
        path=path,
        codec=info.codec,
        width=width,
        height=height,
        rotation=rotation,
        native_fps=info.average_fps,
        real_fps=info.real_fps,
        frame_count=info.frame_count,
        duration=info.duration,
        frame_indices=tuple(int(i) for i in plan.indices),
        frame_times=tuple(float(t) for t in plan.times),
        sample_fps=plan.sample_fps,
        second_per_grid=plan.second_per_grid,
        resized_height=int(frames.shape[2]),
        resized_width=int(frames.shape[3]),
        has_audio=audio is not None,
        audio_seconds=0.0 if audio is None else len(audio.waveform) / spec.audio.sampling_rate,
        audio_windows=0 if audio is None else audio.windows,
        audio_note=audio_note,
    )
    return PreparedVideo(
        patches=patches,
        video_grid_thw=torch.tensor([grid], dtype=torch.int64),
        second_per_grid=plan.second_per_grid,
        input_features=None if audio is None else audio.input_features,
        feature_attention_mask=None if audio is None else audio.feature_attention_mask,
        metadata=metadata,
        spec=spec,
    )


def _display(info: VideoInfo, rotation: int) -> tuple[int, int]:
    """(height, width) as a player shows the video."""
    if rotation in (90, 270):
        return info.coded_width, info.coded_height
    return info.coded_height, info.coded_width


def _decode_and_resize(container, info: VideoInfo, plan: FramePlan, settings: VideoSettings, spec: ModelSpec,
                       threads: int) -> tuple[torch.Tensor, int]:
    """Decode the planned frames and resize each into its slot of one uint8 [T, 3, H, W] buffer."""
    slots: dict[int, list[int]] = {}
    for slot, pts in enumerate(plan.pts):
        slots.setdefault(int(pts), []).append(slot)
    buffer, size, rotation = None, None, 0
    for frame in decode_frames(container, info, plan.pts, threads=threads):
        if buffer is None:
            rotation = int(round(frame.rotation or 0)) % 360
            rotation = rotation if rotation % 90 == 0 else 0
            height, width = _display(info, rotation)
            size = target_size(info.path, height, width, len(plan.pts), settings, spec)
            buffer = torch.empty((len(plan.pts), 3, *size), dtype=torch.uint8)
        picture = resize(frame_to_tensor(frame.to_ndarray(format="rgb24"), rotation), size, settings)
        for slot in slots[frame.pts if frame.pts is not None else frame.dts]:
            buffer[slot] = picture
    return buffer, rotation


def _audio(info: VideoInfo, settings: VideoSettings, spec: ModelSpec):
    """Audio features of the window, or (None, why not)."""
    if not settings.audio:
        return None, "audio disabled"
    if info.audio is None:
        return None, "no audio stream"
    start, end = sample_window(settings, spec.audio.sampling_rate)
    waveform = decode_audio(info.path, spec.audio, start, end)
    if len(waveform) == 0:
        return None, "the audio stream holds no samples in the window"
    return log_mel(waveform, spec.audio, settings.long_audio, info.path), ""
