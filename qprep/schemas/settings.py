"""Settings of the CPU stage: what the user chooses and what the model dictates.

`VideoSettings` holds the user's choices (named as the CLI flags). `ModelSpec` holds what the
model's preprocessor config fixes (patch sizes, pixel bounds, normalization, audio features). Both
are frozen dataclasses of plain values, so they travel to Ray workers and hash into fingerprints.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qprep.errors import SettingsError

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, the Qwen vision processors' defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

LONG_AUDIO_POLICIES = ("window", "error")
MEDIA_KINDS = ("video", "image", "audio")  # what a store can hold (`VideoSettings.kinds`)


@dataclass(frozen=True)
class VideoSettings:
    """How to sample, resize and featurize one video.

    Frame sampling is either fps-based (`fps`, qwen-vl-utils' `smart_nframes` rules, the default the
    checkpoints were trained with) or a fixed count (`num_frames`, the research recipe's uniform
    50/100 frames). `video_start`/`video_end` (seconds) restrict both to a window.
    Resizing is either `smart_resize` within `min_pixels`/`max_pixels` (None: the model's own) or
    a fixed `size` = (height, width).
    """

    fps: float | None = 2.0
    num_frames: int | None = None
    min_frames: int = 4
    max_frames: int = 768
    video_start: float | None = None
    video_end: float | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    size: tuple[int, int] | None = None
    audio: bool = True
    long_audio: str = "window"
    # the kinds of media a run takes from its folder: videos alone (`--videos`), or also images and
    # (models with an audio tower) audio files (`--media`)
    kinds: tuple[str, ...] = ("video",)

    def __post_init__(self) -> None:
        if self.num_frames is not None:
            object.__setattr__(self, "fps", None)
        for name in ("fps", "video_start", "video_end"):  # 4 and 4.0 are one setting (and one fingerprint)
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        if self.fps is None and self.num_frames is None:
            raise SettingsError("choose a frame policy: fps or num_frames (--fps N or --num-frames N, or a --job "
                                  "that sets one)")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise SettingsError(f"fps must be a positive number, got {self.fps}")
        if self.num_frames is not None and self.num_frames < 1:
            raise SettingsError(f"num_frames must be positive, got {self.num_frames}")
        if self.min_frames < 1 or self.max_frames < self.min_frames:
            raise SettingsError(f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        for name in ("video_start", "video_end"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise SettingsError(f"{name} must be a non-negative number of seconds, got {value}")
        if self.video_start is not None and self.video_end is not None and self.video_end <= self.video_start:
            raise SettingsError(f"video_end ({self.video_end}) must be after video_start ({self.video_start})")
        if self.size is not None:
            size = tuple(int(v) for v in self.size)
            if len(size) != 2 or min(size) < 1:
                raise SettingsError(f"size must be (height, width), got {self.size}")
            object.__setattr__(self, "size", size)
        if self.long_audio not in LONG_AUDIO_POLICIES:
            raise SettingsError(f"long_audio must be one of {LONG_AUDIO_POLICIES}, got {self.long_audio!r}")
        kinds = tuple(sorted(set(self.kinds), key=MEDIA_KINDS.index)) if set(self.kinds) <= set(MEDIA_KINDS) else None
        if not kinds or "video" not in kinds:
            raise SettingsError(f"kinds must hold video and any of {MEDIA_KINDS[1:]}, got {self.kinds}")
        object.__setattr__(self, "kinds", kinds)

    @property
    def images(self) -> bool:
        return "image" in self.kinds

    @property
    def audio_files(self) -> bool:
        return "audio" in self.kinds

    def to_dict(self) -> dict[str, Any]:
        """Plain values; `kinds` only where it is not the videos alone every store held before it
        existed (their fingerprints stay what they were)."""
        return _without_old_behaviour(dataclasses.asdict(self), {"kinds": ("video",)})


@dataclass(frozen=True)
class AudioSpec:
    """Whisper log-mel settings (the model's feature extractor config)."""

    sampling_rate: int = 16000
    feature_size: int = 128
    hop_length: int = 160
    n_fft: int = 400
    chunk_length: int = 300
    # True: the processor featurizes a track whole, padded to its own length and never cut
    # (Qwen3-Omni's); False: in windows of chunk_length seconds, each padded to it (Qwen2.5-Omni's)
    whole_track: bool = False

    @property
    def window_samples(self) -> int:
        """Samples the processor pads every track to (and would cut longer ones at), in windows."""
        return self.chunk_length * self.sampling_rate

    def feature_extractor(self):
        """transformers' own WhisperFeatureExtractor, configured as the model's processor is."""
        return _whisper_feature_extractor(self)


# ModelSpec fields (and AudioSpec's, under "audio"), and the value that means "as before"
_ADDED_LATER = {"pixel_bounds_per_clip": False, "audio": {"whole_track": False}, "image_pixels": None}


@dataclass(frozen=True)
class ModelSpec:
    """What the model's preprocessor config fixes for the CPU stage."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000
    # True: min/max_pixels bound the whole clip (all frames together), as Qwen3VLVideoProcessor's
    # `size` does; False: each frame, as Qwen2VLVideoProcessor's.
    pixel_bounds_per_clip: bool = False
    audio: AudioSpec = field(default_factory=AudioSpec)
    # (min, max) pixels of one image, as the checkpoint's processor resizes images (its image
    # processor's bounds, which differ from the video ones in every release); None: not read
    image_pixels: tuple[int, int] | None = None

    @property
    def factor(self) -> int:
        """Side lengths must be multiples of this (one merged token covers factor × factor pixels)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def to_dict(self, images: bool = True) -> dict[str, Any]:
        """Plain values; a field added after stores existed is left out at its old behaviour's value,
        so that the fingerprints of those stores stay what they were. Not `images`: without the image
        bounds (a run that extracts no image: they change none of its bytes)."""
        values = dataclasses.asdict(self)
        if not images:
            values["image_pixels"] = None
        return _without_old_behaviour(values, _ADDED_LATER)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelSpec":
        """The inverse of `to_dict` (JSON lists back to tuples)."""
        values = dict(values)
        values["audio"] = AudioSpec(**values["audio"])
        for name in ("image_mean", "image_std"):
            values[name] = tuple(values[name])
        if values.get("image_pixels") is not None:
            values["image_pixels"] = tuple(values["image_pixels"])
        return cls(**values)

    @classmethod
    def from_processors(cls, video_processor, feature_extractor=None, pixel_bounds: tuple[int, int] | None = None,
                        per_clip: bool = False, whole_track: bool = False,
                        image_pixels: tuple[int, int] | None = None) -> "ModelSpec":
        """Read the values from transformers' processor objects (the single source of truth).
        `pixel_bounds`: (min, max) pixels where the model's processor overrides the video
        processor's own `size` (see `Family.video_pixel_bounds`); `per_clip`: they bound the whole
        clip rather than each frame (`Family.pixel_bounds_per_clip`); `whole_track`: the processor
        featurizes audio whole (`Family.audio_whole_track`)."""
        size = video_processor.size
        min_pixels, max_pixels = pixel_bounds or (size["shortest_edge"], size["longest_edge"])
        audio = AudioSpec()
        if feature_extractor is not None:
            audio = AudioSpec(
                sampling_rate=int(feature_extractor.sampling_rate),
                feature_size=int(feature_extractor.feature_size),
                hop_length=int(feature_extractor.hop_length),
                n_fft=int(feature_extractor.n_fft),
                chunk_length=int(feature_extractor.chunk_length),
                whole_track=whole_track,
            )
        return cls(
            patch_size=int(video_processor.patch_size),
            temporal_patch_size=int(video_processor.temporal_patch_size),
            merge_size=int(video_processor.merge_size),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            image_mean=tuple(float(v) for v in video_processor.image_mean),
            image_std=tuple(float(v) for v in video_processor.image_std),
            rescale_factor=float(video_processor.rescale_factor),
            cap_pixels_per_frame=bool(getattr(video_processor, "cap_pixels_per_frame", None) or False),
            max_video_tokens=int(getattr(video_processor, "max_video_tokens", 128000)),
            pixel_bounds_per_clip=per_clip,
            audio=audio,
            image_pixels=None if image_pixels is None else (int(image_pixels[0]), int(image_pixels[1])),
        )


def _without_old_behaviour(values: dict, added_later: dict) -> dict:
    for name, old_behaviour in added_later.items():
        if isinstance(old_behaviour, dict):
            values[name] = _without_old_behaviour(values[name], old_behaviour)
        elif values[name] == old_behaviour:
            del values[name]
    return values


def load_model_spec(model: str | Path | dict | ModelSpec | None = None) -> ModelSpec:
    """The CPU-stage spec of a model.

    `model` is a checkpoint (a local HF-format directory with its `config.json`, or a hub id), a
    directory of processor configs alone, a path to a `preprocessor_config.json`, the parsed config
    as a dict, a ready `ModelSpec`, or None for transformers' Qwen2-VL defaults. Values are read
    through transformers' own processor classes so that qprep and the processor can never disagree
    on a default: for a checkpoint, the processor `AutoProcessor` builds from it as released, with
    the frame size its family's processor applies to video (`Family.video_pixel_bounds`).
    """
    if isinstance(model, ModelSpec):
        return model
    from transformers import Qwen2VLVideoProcessor, WhisperFeatureExtractor

    if model is None:
        return ModelSpec.from_processors(Qwen2VLVideoProcessor())
    if isinstance(model, dict):
        return _spec_from_config_dict(model)
    path = Path(model)
    if path.is_file():
        return _spec_from_config_dict(json.loads(path.read_text()))
    if (path / "config.json").is_file() or not path.exists():
        return _spec_from_checkpoint(str(model))
    try:
        video_processor = Qwen2VLVideoProcessor.from_pretrained(str(model))
    except Exception as exc:  # transformers raises OSError/ValueError/HTTP errors alike
        raise SettingsError(f"cannot read the preprocessor config of model {model}: {exc}") from exc
    try:
        audio_config, _ = WhisperFeatureExtractor.get_feature_extractor_dict(str(model))
    except Exception:
        audio_config = {}  # a vision-only model (Qwen2.5-VL) has no feature extractor config
    feature_extractor = WhisperFeatureExtractor.from_dict(audio_config) if _describes_audio(audio_config) else None
    return ModelSpec.from_processors(video_processor, feature_extractor)


def _spec_from_checkpoint(model: str) -> ModelSpec:
    from transformers import AutoProcessor

    from qprep.models.checkpoint import open_checkpoint

    try:
        checkpoint = open_checkpoint(model)
    except SettingsError as exc:
        raise SettingsError(f"cannot read the preprocessor config of model {model}: {exc}") from exc
    checkpoint.require_tokenizer()  # the processor is built around it
    try:
        processor = AutoProcessor.from_pretrained(model)
    except Exception as exc:  # transformers raises OSError/ValueError/HTTP errors alike
        raise SettingsError(f"cannot read the preprocessor config of model {model}: {exc}") from exc
    feature_extractor = getattr(processor, "feature_extractor", None)
    return ModelSpec.from_processors(processor.video_processor, feature_extractor,
                                     pixel_bounds=checkpoint.family.video_pixel_bounds(processor),
                                     per_clip=checkpoint.family.pixel_bounds_per_clip,
                                     whole_track=checkpoint.family.audio_whole_track,
                                     image_pixels=checkpoint.family.image_pixel_bounds(processor))


def _describes_audio(config: dict) -> bool:
    # Built from a config without audio keys, WhisperFeatureExtractor silently takes Whisper's own
    # defaults (80 bins, 30 s chunks): only trust a config that really describes audio features.
    return config.get("feature_extractor_type") == "WhisperFeatureExtractor" or "n_fft" in config


def _spec_from_config_dict(config: dict) -> ModelSpec:
    from transformers import Qwen2VLVideoProcessor, WhisperFeatureExtractor

    vision_keys = set(Qwen2VLVideoProcessor.valid_kwargs.__annotations__) | {
        "size", "image_mean", "image_std", "rescale_factor", "patch_size", "temporal_patch_size", "merge_size",
        "min_pixels", "max_pixels",
    }
    video_processor = Qwen2VLVideoProcessor(**{k: v for k, v in config.items() if k in vision_keys})
    feature_extractor = None
    if _describes_audio(config):
        audio_keys = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value")
        feature_extractor = WhisperFeatureExtractor(**{k: config[k] for k in audio_keys if k in config})
    return ModelSpec.from_processors(video_processor, feature_extractor)


_FEATURE_EXTRACTORS: dict[AudioSpec, Any] = {}


def _whisper_feature_extractor(spec: AudioSpec):
    extractor = _FEATURE_EXTRACTORS.get(spec)
    if extractor is None:
        from transformers import WhisperFeatureExtractor

        extractor = WhisperFeatureExtractor(
            feature_size=spec.feature_size,
            sampling_rate=spec.sampling_rate,
            hop_length=spec.hop_length,
            chunk_length=spec.chunk_length,
            n_fft=spec.n_fft,
        )
        _FEATURE_EXTRACTORS[spec] = extractor
    return extractor
