"""The reference path the tests compare qprep against: plain PyAV decoding of every frame and of the
whole audio track, then transformers' own processors and model classes. No qprep code computes
anything here (`in_own_memory` only moves loaded weights, see `full_model`)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import torch

# model_type → the transformers class of the released full model, and the part of it that sees video
FULL_MODELS = {
    "qwen2_5_omni": ("Qwen2_5OmniForConditionalGeneration", "thinker"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", None),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", None),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", None),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", None),
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", None),
    "qwen3_5_moe": ("Qwen3_5MoeForConditionalGeneration", None),
    "qwen3_omni_moe": ("Qwen3OmniMoeForConditionalGeneration", "thinker"),
    "qwen3_omni_moe_thinker": ("Qwen3OmniMoeThinkerForConditionalGeneration", None),
}


def kinds_and_layouts(kinds) -> list[tuple[str, str]]:
    """(kind, layout) cases: every kind in the layout `save_pretrained` writes and in the hub's released one."""
    from qprep.models.tiny import LAYOUTS

    return [(kind, layout) for kind in kinds for layout in LAYOUTS]


def full_model(model_dir, dtype: torch.dtype = torch.float32):
    """The checkpoint's full model as transformers loads it (Omni: its thinker), in eval mode.

    `from_pretrained` leaves weights memory-mapped at the offsets the file gives them; qprep copies the
    weights it loads into torch's own (64-byte aligned) memory. MKL's AVX2 kernels round by operand
    alignment, so the reference gets the same placement: a bit-for-bit comparison is then between the
    same arithmetic on every CPU.
    """
    import transformers

    from qprep.models.checkpoint import in_own_memory

    model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    class_name, part = FULL_MODELS[model_type]
    model = getattr(transformers, class_name).from_pretrained(model_dir, dtype=dtype)
    return in_own_memory(getattr(model, part) if part else model).eval()


def plain_decode(path) -> tuple[list[np.ndarray], int]:
    """Every frame, decoded start to end with no tricks, and the display rotation."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    rotation = int(round(frames[0].rotation or 0)) % 360
    return [f.to_ndarray(format="rgb24") for f in frames], rotation


def reference_pixels(path, indices, processor, rotate: bool = True):
    """`pixel_values_videos` and `video_grid_thw` of the plainly decoded frames at `indices`, from a
    video processor, or from a checkpoint's whole processor (`AutoProcessor`) called on a prompt
    holding the video, so that what the processor itself imposes on video (its frame size) applies."""
    frames, rotation = plain_decode(path)
    chosen = np.stack([frames[i] for i in indices])
    if rotate and rotation:
        chosen = np.ascontiguousarray(np.rot90(chosen, k=rotation // 90, axes=(1, 2)))
    video_processor = getattr(processor, "video_processor", processor)
    kwargs = dict(videos=[chosen], do_sample_frames=False, return_tensors="pt",
                  cap_pixels_per_frame=video_processor.cap_pixels_per_frame or False)
    if video_processor is not processor:
        kwargs["text"] = [processor.video_token]
    return processor(**kwargs)


def plain_audio_decode(path, start_s=None, end_s=None) -> np.ndarray:
    """The whole track decoded and resampled to 16 kHz in one go, channels averaged, cut to the window."""
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="fltp", rate=16000)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
    waveform = np.concatenate([planar_samples(f) for f in frames], axis=1).mean(axis=0, dtype=np.float32)
    start = int(16000 * start_s) if start_s is not None else 0
    end = int(16000 * end_s) if end_s is not None else None
    return waveform[start:end]


def planar_samples(frame) -> np.ndarray:
    """[channels, samples] of a planar float32 frame, each channel's plane read by its index. PyAV 18.1's
    `frame.planes` and `frame.to_ndarray()` read past the channel pointers of a frame of 8 or more
    channels (they look for a NULL pointer that is not there) and crash the process."""
    from av.audio.plane import AudioPlane

    assert frame.format.name == "fltp"
    return np.stack([np.frombuffer(AudioPlane(frame, channel), dtype=np.float32, count=frame.samples)
                     for channel in range(frame.layout.nb_channels)])
