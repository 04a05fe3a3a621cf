"""The audit's reference: what transformers itself makes of a video, with none of qprep's CPU stage
or tower stage in the path.

* frames: decoded plainly with PyAV, every frame of the stream in presentation order, the asked-for
  ones kept (turned as players show them);
* the frame plan (how many frames, which, at what rate) re-derived from that decode with
  qwen-vl-utils' rules (`calculate_video_frame_range`, `smart_nframes`, `linspace(...).round()`);
* pixels: the model's own video processor (`AutoProcessor.from_pretrained(model).video_processor`)
  applied once to the decoded frames; in fixed-size mode the frames are first resized as
  qwen-vl-utils resizes them (torchvision's functional bicubic + antialias) and the processor keeps
  that size;
* audio: the whole track resampled to 16 kHz by FFmpeg, channels averaged, cut to the window, then
  the model's own processor on it (its own feature-extractor call); for Qwen2.5-Omni, a track
  longer than the extractor's window goes in consecutive windows, as the cache records it (the
  processor alone would cut it), while Qwen3-Omni's processor takes any track whole;
* tokens: the model class loaded with `from_pretrained`, through its own
  `get_video_features(...).pooler_output` (and `.deepstack_features`, where the tower has deepstack
  levels) and `get_audio_features(...).last_hidden_state`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch

from transformers.video_utils import VideoMetadata

from qprep.schemas.dtypes import torch_dtype

# Frames per processor call. Resizing and patchifying act on each temporal pair alone, so calls on
# consecutive groups give the same rows as one call on the whole video, while only one group of
# full-size frames is held at a time. (The per-frame pixel cap depends on the frame count: with it,
# the video goes in one call.)
FRAMES_PER_CALL = 32
# qwen-vl-utils' bounds for an explicit resized_height / resized_width.
FIXED_SIZE_PIXELS = (4, 16384)  # × factor²


@dataclass(frozen=True)
class FramePlan:
    indices: list[int]
    sample_fps: float
    second_per_grid: float


@dataclass
class Decoded:
    """What the plain decode saw of the video stream."""

    pts: list[int] = field(default_factory=list)  # every frame, presentation order
    fps: float = 0.0  # the stream's average rate (what decord reports)
    time_base: float = 0.0
    rotation: int = 0

    def seconds(self, indices: list[int]) -> list[float]:
        """Times of these frames, from the video's first frame."""
        return [(self.pts[i] - self.pts[0]) * self.time_base for i in indices]


@dataclass
class ReferenceVideo:
    frame_count: int  # frames the plain decode produced
    plan: FramePlan | None  # re-derived; None when the rules refuse the video (plan_error says why)
    plan_error: str
    frame_times: list[float]  # of the frames compared (the cache's), seconds from the first frame
    video_grid_thw: tuple[int, int, int]
    video_tokens: torch.Tensor  # float32, on the CPU
    deepstack: torch.Tensor | None  # float32 [levels, tokens, hidden], towers with deepstack levels
    audio_tokens: torch.Tensor | None
    mel_length: int
    audio_note: str  # why there is no audio, when there is none


@dataclass
class ReferenceImage:
    grid_thw: tuple[int, int, int]
    tokens: torch.Tensor  # float32, on the CPU
    deepstack: torch.Tensor | None  # float32 [levels, tokens, hidden], towers with deepstack levels


@dataclass
class ReferenceAudio:
    audio_tokens: torch.Tensor | None  # float32, on the CPU; None: the file holds no audio
    mel_length: int
    audio_note: str  # why there is no audio, when there is none


def frame_plan(total_frames: int, video_fps: float, settings: dict, factor: int) -> FramePlan:
    """qwen-vl-utils' frame choice for a stream of `total_frames` at `video_fps` (raises ValueError
    where it refuses the video)."""
    first, last, count = _frame_range(total_frames, video_fps, settings.get("video_start"), settings.get("video_end"))
    nframes = _nframes(settings, count, video_fps, factor)
    indices = torch.linspace(first, last, nframes).round().long().tolist()
    sample_fps = nframes / max(count, 1e-6) * video_fps
    return FramePlan(indices=indices, sample_fps=sample_fps, second_per_grid=factor / sample_fps)


def _frame_range(total: int, fps: float, start: float | None, end: float | None) -> tuple[int, int, int]:
    """`calculate_video_frame_range`."""
    if start is None and end is None:
        return 0, total - 1, total
    longest = total / fps
    first = math.ceil(max(0.0, min(start, longest)) * fps) if start is not None else 0
    last = min(math.floor(max(0.0, min(end, longest)) * fps), total - 1) if end is not None else total - 1
    if first >= last:
        raise ValueError(f"video_start={start} / video_end={end} select no frames ({total} frames at {fps:.3f} fps)")
    return first, last, last - first + 1


def _nframes(settings: dict, total: int, fps: float, factor: int) -> int:
    """`smart_nframes`, with the temporal patch size as the frame factor."""
    if settings.get("num_frames") is not None:
        nframes = round(settings["num_frames"] / factor) * factor
    else:
        least = math.ceil(settings["min_frames"] / factor) * factor
        most = math.floor(settings["max_frames"] / factor) * factor
        nframes = min(max(total / fps * settings["fps"], least), most, total)
        nframes = math.floor(nframes / factor) * factor
    if not factor <= nframes <= total:
        raise ValueError(f"{nframes} frames asked of a video (window) of {total}")
    return nframes


class Reference:
    """transformers' processor and model for one checkpoint, loaded once, applied video by video."""

    def __init__(self, source: str, full_model: tuple[str, str | None], *, dtype: str, device: str,
                 attn_implementation: str = "sdpa", revision: str | None = None, pixel_bounds_per_clip: bool = False,
                 audio_whole_track: bool = False):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(source, revision=revision)
        self.processor = processor
        # the frame size then depends on the frame count: the clip goes to the processor in one call
        self.whole_clip = pixel_bounds_per_clip
        self.whole_track = audio_whole_track  # the processor featurizes a track whole, never cut
        self.video_processor = processor.video_processor
        self.feature_extractor = getattr(processor, "feature_extractor", None)
        self.dtype, self.device = torch_dtype(dtype), device
        self.model = load_model(source, full_model, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                revision=revision)
        self.audio = self.feature_extractor is not None and hasattr(self.model, "get_audio_features")

    @torch.inference_mode()
    def compute(self, path: str | Path, frame_indices: list[int], settings: dict) -> ReferenceVideo:
        """Everything the cache holds for one video, recomputed. `frame_indices` are the frames whose
        tokens are compared (the cache's own, so that a sampling difference shows as such and not as
        a token difference)."""
        decoded = Decoded()
        frames = _plain_frames(path, frame_indices, decoded)
        pixels, grid = self._pixels(frames, len(frame_indices), settings)
        if len(decoded.pts) <= max(frame_indices):
            raise ValueError(f"the plain decode gives {len(decoded.pts)} frames; the cache samples frame "
                             f"{max(frame_indices)}")
        output = self.model.get_video_features(pixels.to(self.device, self.dtype), torch.tensor([grid], device=self.device))
        video = output.pooler_output[0]
        levels = getattr(output, "deepstack_features", None)
        deepstack = torch.stack([level[0] for level in levels]).float().cpu() if levels else None
        try:
            plan, plan_error = frame_plan(len(decoded.pts), decoded.fps, settings,
                                          int(self.video_processor.temporal_patch_size)), ""
        except ValueError as exc:
            plan, plan_error = None, str(exc)
        audio, mel_length, note = self._audio(path, settings)
        return ReferenceVideo(frame_count=len(decoded.pts), plan=plan, plan_error=plan_error,
                              frame_times=decoded.seconds(frame_indices), video_grid_thw=grid,
                              video_tokens=video.float().cpu(), deepstack=deepstack, audio_tokens=audio,
                              mel_length=mel_length,
                              audio_note=note)

    @torch.inference_mode()
    def compute_image(self, path: str | Path) -> ReferenceImage:
        """What the cache holds for one image, recomputed: transformers' `load_image` (EXIF orientation
        applied), the checkpoint's processor with its own image bounds, `get_image_features`."""
        from transformers.image_utils import load_image

        token = getattr(self.processor, "image_token", None) or "<|image_pad|>"
        out = self.processor(text=[token], images=[load_image(str(path))], return_tensors="pt")
        grid = out["image_grid_thw"]
        output = self.model.get_image_features(out["pixel_values"].to(self.device, self.dtype), grid.to(self.device))
        levels = getattr(output, "deepstack_features", None)
        deepstack = torch.stack([level[0] for level in levels]).float().cpu() if levels else None
        return ReferenceImage(tuple(grid[0].tolist()), output.pooler_output[0].float().cpu(), deepstack)

    def compute_audio(self, path: str | Path, settings: dict) -> ReferenceAudio:
        """What the cache holds for one audio file, recomputed as for a video's track (plain decode of
        the whole stream, the checkpoint's processor, `get_audio_features`)."""
        return ReferenceAudio(*self._audio(path, {**settings, "audio": True}))

    def _pixels(self, frames: Iterator[np.ndarray], count: int, settings: dict) -> tuple[torch.Tensor, tuple]:
        processor = self.video_processor
        factor = int(processor.temporal_patch_size)
        whole = processor.cap_pixels_per_frame or self.whole_clip
        per_call = count if whole else max(1, FRAMES_PER_CALL // factor) * factor
        pieces, grid_t, grid_hw = [], 0, (0, 0)
        for group in _batched(frames, per_call):
            out = self._process(group, settings)
            pieces.append(out["pixel_values_videos"])
            t, h, w = out["video_grid_thw"][0].tolist()
            grid_t, grid_hw = grid_t + t, (h, w)
        if not pieces:
            raise ValueError("the plain decode gives none of the sampled frames")
        return torch.cat(pieces), (grid_t, *grid_hw)

    def _process(self, frames: list[np.ndarray], settings: dict):
        """The checkpoint's processor on decoded frames, as the extraction's settings ask: called on a
        prompt holding the video, so that what the processor itself imposes on video applies (the
        Omni processor's own frame-size bounds) unless the settings name bounds."""
        processor = self.video_processor
        kwargs = dict(do_sample_frames=False, cap_pixels_per_frame=bool(processor.cap_pixels_per_frame),
                      return_tensors="pt")
        if settings.get("size"):
            from torchvision.transforms import InterpolationMode
            from torchvision.transforms import functional as F
            from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

            factor = processor.patch_size * processor.merge_size
            low, high = (n * factor**2 for n in FIXED_SIZE_PIXELS)
            size = list(smart_resize(*settings["size"], factor=factor, min_pixels=low, max_pixels=high))
            video = torch.stack([F.resize(torch.from_numpy(f).permute(2, 0, 1), size,
                                          interpolation=InterpolationMode.BICUBIC, antialias=True) for f in frames])
            kwargs["do_resize"] = False
        else:
            video = np.stack(frames)
            if settings.get("min_pixels") or settings.get("max_pixels"):
                default = self._default_video_size()
                kwargs["size"] = {"shortest_edge": settings.get("min_pixels") or default["shortest_edge"],
                                  "longest_edge": settings.get("max_pixels") or default["longest_edge"]}
        # metadata only to spare the processors that print time stamps their warning: the text is not compared
        metadata = VideoMetadata(total_num_frames=len(frames), fps=1.0, frames_indices=list(range(len(frames))))
        return self.processor(text=[self.processor.video_token], videos=[video], video_metadata=[metadata], **kwargs)

    def _default_video_size(self) -> dict:
        """The frame-size bounds the processor applies to video by itself: its own kwargs defaults
        where its class has them, else its video processor's config."""
        merged = self.processor._merge_kwargs(getattr(self.processor, "valid_processor_kwargs", None),
                                              tokenizer_init_kwargs=self.processor.tokenizer.init_kwargs)
        return merged["videos_kwargs"].get("size") or self.video_processor.size

    def _audio(self, path, settings: dict) -> tuple[torch.Tensor | None, int, str]:
        if not self.audio or not settings.get("audio"):
            return None, 0, "audio disabled"
        rate = int(self.feature_extractor.sampling_rate)
        waveform = plain_audio(path, rate)
        if waveform is None:
            return None, 0, "no audio stream"
        start = int(rate * settings["video_start"]) if settings.get("video_start") is not None else 0
        end = int(rate * settings["video_end"]) if settings.get("video_end") is not None else None
        waveform = waveform[start:end]
        if len(waveform) == 0:
            return None, 0, "the audio stream holds no samples in the window"
        window = int(self.feature_extractor.n_samples)
        pieces = [waveform] if self.whole_track else [waveform[i:i + window] for i in range(0, len(waveform), window)]
        # the whole processor, on one audio prompt per piece: its own feature-extractor call
        features = self.processor(text=[self.processor.audio_token] * len(pieces), audio=pieces, return_tensors="pt")
        mask = features["feature_attention_mask"]
        tokens = self.model.get_audio_features(features["input_features"].to(self.device, self.dtype),
                                               mask.to(self.device)).last_hidden_state
        return tokens.float().cpu(), int(mask.sum()), ""


def load_model(source: str, full_model: tuple[str, str | None], *, dtype: str, device: str,
               attn_implementation: str = "sdpa", revision: str | None = None):
    """The full model (`Family.full_model`: its transformers class, and the part that owns the towers),
    loaded by transformers itself; returns that part."""
    import transformers

    from qprep.models.checkpoint import in_own_memory

    class_name, part = full_model
    model = getattr(transformers, class_name).from_pretrained(
        source, revision=revision, dtype=torch_dtype(dtype), attn_implementation=attn_implementation, device_map=device,
        use_safetensors=True)  # never unpickle weights: a .bin-only checkpoint is refused
    model = getattr(model, part) if part else model
    # The weights in torch's own memory, as qprep's towers hold them: some CPU kernels round by alignment.
    return in_own_memory(model).eval().requires_grad_(False)


def _plain_frames(path, indices: list[int], decoded: Decoded) -> Iterator[np.ndarray]:
    """The frames at `indices` (ascending, repeats allowed) from a decode of the whole stream; fills
    `decoded` as it goes (complete once the iterator is exhausted)."""
    wanted = Counter(indices)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded.time_base = float(stream.time_base)
        decoded.fps = float(stream.average_rate or stream.guessed_rate or 0)
        for index, frame in enumerate(container.decode(stream)):
            decoded.pts.append(frame.pts if frame.pts is not None else frame.dts)
            if index == 0:
                decoded.rotation = int(round(frame.rotation or 0)) % 360
            if wanted.get(index):
                rgb = frame.to_ndarray(format="rgb24")
                if decoded.rotation and decoded.rotation % 90 == 0:
                    rgb = np.ascontiguousarray(np.rot90(rgb, k=decoded.rotation // 90))
                for _ in range(wanted[index]):
                    yield rgb


def plain_audio(path, rate: int) -> np.ndarray | None:
    """The whole first audio track at `rate`, channels averaged; None without an audio stream."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="fltp", rate=rate)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
    if not frames:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([_planar_samples(f) for f in frames], axis=1).mean(axis=0, dtype=np.float32)


def _planar_samples(frame) -> np.ndarray:
    """[channels, samples] of a planar float32 frame, each channel's plane read by its index: PyAV 18.1's
    `frame.planes` (which `to_ndarray` reads) looks past the channel pointers of a frame of 8 or more
    channels for a NULL one, and the process dies (SIGSEGV) on 7.1 audio."""
    from av.audio.plane import AudioPlane

    return np.stack([np.frombuffer(AudioPlane(frame, channel), dtype=np.float32, count=frame.samples)
                     for channel in range(frame.layout.nb_channels)])


def _batched(items: Iterator, size: int) -> Iterator[list]:
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
