"""The reference path the tests compare qprep against: plain PyAV decoding of every frame and of the
whole audio track, then transformers' own processors. No qprep code is used here."""

from __future__ import annotations

import av
import numpy as np


def plain_decode(path) -> tuple[list[np.ndarray], int]:
    """Every frame, decoded start to end with no tricks, and the display rotation."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    rotation = int(round(frames[0].rotation or 0)) % 360
    return [f.to_ndarray(format="rgb24") for f in frames], rotation


def reference_pixels(path, indices, processor, rotate: bool = True):
    frames, rotation = plain_decode(path)
    chosen = np.stack([frames[i] for i in indices])
    if rotate and rotation:
        chosen = np.ascontiguousarray(np.rot90(chosen, k=rotation // 90, axes=(1, 2)))
    return processor(videos=[chosen], do_sample_frames=False, cap_pixels_per_frame=processor.cap_pixels_per_frame or False,
                     return_tensors="pt")


def plain_audio_decode(path, start_s=None, end_s=None) -> np.ndarray:
    """The whole track decoded and resampled to 16 kHz in one go, channels averaged, cut to the window."""
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="fltp", rate=16000)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
    waveform = np.concatenate([f.to_ndarray() for f in frames], axis=1).mean(axis=0, dtype=np.float32)
    start = int(16000 * start_s) if start_s is not None else 0
    end = int(16000 * end_s) if end_s is not None else None
    return waveform[start:end]
