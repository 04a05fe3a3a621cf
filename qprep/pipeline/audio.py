"""Stage 5 (Omni): the audio track as the model hears it, a video's or an audio file's (wav, flac,
mp3, ogg, m4a: `read_audio_file`, the same decode and features).

The track is decoded and resampled to 16 kHz by FFmpeg's resampler (PyAV), its channels averaged to
mono as the reference (librosa) does, whatever their count (mono to 7.1 and beyond), in one streaming
pass that keeps only the `video_start`/`video_end` window, so the result equals a full decode cut
afterwards, sample for sample, without holding a long track in memory. Features come from
transformers' own `WhisperFeatureExtractor`, called as the model's processor calls it, so they match
the processor exactly: `Qwen2_5OmniProcessor` pads every track to the model's 300 s window;
`Qwen3OmniMoeProcessor` featurizes the track whole, at its own length (`AudioSpec.whole_track`).

Qwen2.5-Omni's processor would silently cut a track longer than its window. qprep never does: with
`long_audio="window"` the track is featurized in consecutive 300 s windows (the audio tower
attends within 2 s chunks, so windows concatenate cleanly) and the count is recorded; with
`long_audio="error"` such a video fails with that cause.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import av
import numpy as np
import torch

from qprep.errors import AudioError
from qprep.schemas.settings import AudioSpec, VideoSettings


@dataclass(frozen=True)
class AudioFeatures:
    waveform: np.ndarray  # float32 mono at spec.sampling_rate, the window only
    input_features: torch.Tensor  # [windows, feature_size, window frames] float32
    feature_attention_mask: torch.Tensor  # [windows, window frames] int32

    @property
    def mel_length(self) -> int:
        return int(self.feature_attention_mask.sum())

    @property
    def windows(self) -> int:
        return int(self.input_features.shape[0])

    def mel_frames(self) -> torch.Tensor:
        """The valid mel frames only, [mel bins, mel_length]: the compact form the towers need."""
        return valid_mel_frames(self.input_features, self.feature_attention_mask)


def valid_mel_frames(input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
    """Each window's valid frames (its mask's), back to back: [mel bins, valid frames]."""
    valid = feature_attention_mask.bool()
    return torch.cat([window[:, keep] for window, keep in zip(input_features, valid)], dim=1)


def sample_window(settings: VideoSettings, rate: int) -> tuple[int, int | None]:
    """First and end sample of the window (the processor's `int(rate * seconds)`)."""
    start = int(rate * settings.video_start) if settings.video_start is not None else 0
    end = int(rate * settings.video_end) if settings.video_end is not None else None
    return start, end


def decode_audio(path: str, spec: AudioSpec, start: int = 0, end: int | None = None) -> np.ndarray:
    """Mono float32 samples [start, end) of the first audio stream, at `spec.sampling_rate`.

    The file is opened afresh: seeking a used container back to 0 loses the first audio packet in
    some containers (Matroska), and the reference decodes the track from its very first packet.
    """
    from qprep.pipeline.probe import open_container

    with open_container(path) as container:
        return _decode_track(container, path, spec, start, end)


def read_audio_file(path: str, spec: AudioSpec, settings: VideoSettings) -> AudioFeatures:
    """An audio file as the model hears it: its first audio stream decoded, resampled and mixed down as
    a video's track is (its `video_start`/`video_end` window, if any), featurized as `log_mel` says."""
    from qprep.pipeline.probe import open_container

    path = str(path)
    start, end = sample_window(settings, spec.sampling_rate)
    with open_container(path, what="an audio file") as container:
        if not container.streams.audio:
            raise AudioError(path, "holds no audio stream (not an audio file)")
        waveform = _decode_track(container, path, spec, start, end)
    if len(waveform) == 0:
        raise AudioError(path, "the audio stream holds no samples" + (" in the window" if start or end else ""))
    return log_mel(waveform, spec, settings.long_audio, path)


def _decode_track(container, path: str, spec: AudioSpec, start: int, end: int | None) -> np.ndarray:
    stream = container.streams.audio[0]
    # Resample every channel, then average them: the reference (librosa's to_mono) takes the channel
    # mean, where FFmpeg's own stereo→mono downmix weights each channel 1/√2 (3 dB louder). The samples
    # come packed (interleaved, one plane): PyAV 18.1's `AudioFrame.planes` (which `to_ndarray` reads)
    # walks a planar frame's channel pointers until a NULL one, which a frame of 8 or more channels does
    # not have, so on 7.1 audio it reads past them and the process dies (SIGSEGV). That is PyAV's fault;
    # a packed frame has one plane, and FFmpeg packs the same floats it would have written planar.
    resampler = av.AudioResampler(format="flt", rate=spec.sampling_rate)
    pieces, seen = [], 0
    try:
        for packet in container.demux(stream):
            frames = stream.codec_context.decode(packet if packet.size else None)
            for frame in frames:
                seen = _keep(resampler.resample(frame), pieces, seen, start, end)
            if end is not None and seen >= end:
                break
        else:
            seen = _keep(resampler.resample(None), pieces, seen, start, end)
    except av.error.FFmpegError as exc:
        raise AudioError(path, f"the audio track cannot be decoded ({getattr(exc, 'strerror', None) or exc})") from None
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)


def _keep(frames, pieces: list, seen: int, start: int, end: int | None) -> int:
    for frame in frames:
        samples = channel_mean(frame)
        lo, hi = seen, seen + len(samples)
        cut_lo, cut_hi = max(start, lo), hi if end is None else min(end, hi)
        if cut_hi > cut_lo:
            pieces.append(samples[cut_lo - lo : cut_hi - lo].astype(np.float32, copy=False))
        seen = hi
    return seen


def channel_mean(frame) -> np.ndarray:
    """The mean of a packed float32 frame's channels: summed one channel after the other, then divided by
    the count, the order in which numpy's `mean(axis=0)` over [channels, samples] adds them (the reference's
    arithmetic, whatever the frame's length)."""
    channels = frame.layout.nb_channels
    interleaved = frame.to_ndarray().reshape(-1, channels)  # [samples, channels]
    total = interleaved[:, 0].copy()
    for channel in range(1, channels):
        total += interleaved[:, channel]
    total /= np.float32(channels)
    return total


def log_mel(waveform: np.ndarray, spec: AudioSpec, long_audio: str, path: str) -> AudioFeatures:
    """Whisper log-mel features of `waveform`, as the model's processor makes them: the whole
    track in one piece where it does so (`spec.whole_track`, Qwen3-Omni), else one window at a time.

    transformers' `WhisperFeatureExtractor` is called exactly as the Omni processor calls it: every
    window padded to the whole 300 s. Computing only the frames that hold the signal would save
    0.1–0.2 s per short track, but the STFT and the mel matmul then run on another shape, and on some CPUs
    (AVX2 kernels) that rounds a few values one ulp away from the processor's. The same call shape
    is what makes the features bit-identical to the processor on every machine.
    """
    if spec.whole_track:
        features = whole_track_features(waveform, spec)
        return AudioFeatures(waveform=waveform, input_features=features["input_features"],
                             feature_attention_mask=features["attention_mask"].to(torch.int32))
    window = spec.window_samples
    count = max(1, math.ceil(len(waveform) / window))
    if count > 1 and long_audio == "error":
        raise AudioError(path, f"the audio track lasts {len(waveform) / spec.sampling_rate:.1f} s, longer than the "
                               f"model's {spec.chunk_length} s window (use long_audio='window' to encode it in windows)")
    pieces = [waveform[index * window : (index + 1) * window] for index in range(count)]
    features = window_features(pieces, spec)
    return AudioFeatures(waveform=waveform, input_features=features["input_features"],
                         feature_attention_mask=features["attention_mask"].to(torch.int32))


def window_features(pieces: list[np.ndarray], spec: AudioSpec):
    """transformers' WhisperFeatureExtractor on consecutive windows of one track, each padded to the
    model's window as `Qwen2_5OmniProcessor` pads it (one call: `verify` recomputes it the same way)."""
    return spec.feature_extractor()(
        pieces,
        sampling_rate=spec.sampling_rate,
        padding="max_length",
        return_attention_mask=True,
        return_tensors="pt",
    )


def whole_track_features(waveform: np.ndarray, spec: AudioSpec):
    """transformers' WhisperFeatureExtractor on one whole track, as `Qwen3OmniMoeProcessor` calls it
    (padded to the longest track, here the track itself, and never truncated)."""
    return spec.feature_extractor()(
        [waveform],
        sampling_rate=spec.sampling_rate,
        padding=True,
        truncation=False,
        return_attention_mask=True,
        return_tensors="pt",
    )
