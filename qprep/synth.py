"""Synthetic videos for the demo, the tests and the benchmarks, encoded with PyAV.

The pictures move (a gradient that drifts, a bright block that walks, the frame number in binary
along the top edge) so that every frame differs and encoders make real P/B frames; the sound is
speech-like (a few formants, amplitude-modulated at syllable rate) with a tone burst at known
times. Everything is deterministic for a given set of arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


@dataclass(frozen=True)
class VideoSpec:
    width: int = 320
    height: int = 240
    fps: float | Fraction = 30
    seconds: float = 3.0
    codec: str = "libx264"
    pix_fmt: str = "yuv420p"
    gop_seconds: float = 2.0
    bframes: int | None = None  # None: the encoder's default
    audio: bool = True
    audio_rate: int = 48000
    audio_channels: int = 2  # 1 mono, 2 stereo, more: FFmpeg's default layout for the count (8: 7.1)
    audio_codec: str | None = None  # None: AAC (Opus in WebM); FFmpeg's AAC encoder takes at most 8 channels
    audio_seconds: float | None = None  # default: as long as the video
    rotation: int = 0  # counter-clockwise degrees written as display matrix
    vfr: bool = False  # jitter frame durations (variable frame rate)
    events: tuple[tuple[float, float], ...] = ()  # (start, end) seconds when a red disc shows
    crf: int = 23
    preset: str = "veryfast"
    encoder_options: tuple[tuple[str, str], ...] = ()  # extra (key, value) codec options
    faststart: bool = False  # mp4/mov: index (moov) before the data, as streaming sites write it


def make_video(path: str | Path, spec: VideoSpec = VideoSpec(), **overrides) -> Path:
    """Encode a synthetic video to `path` (container from the extension) and return the path."""
    if overrides:
        spec = VideoSpec(**{**spec.__dict__, **overrides})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # bitexact: no random ids (Matroska's segment and track UIDs) or version strings in the container
    options = {"fflags": "+bitexact", **({"movflags": "faststart"} if spec.faststart else {})}
    with av.open(str(path), mode="w", options=options) as container:
        video = _add_video_stream(container, spec)
        audio = _add_audio_stream(container, spec) if spec.audio else None
        for frame in _video_frames(spec, video):
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            for frame in _audio_frames(spec):
                container.mux(audio.encode(frame))
            container.mux(audio.encode(None))
    return path


def frame_times(spec: VideoSpec) -> np.ndarray:
    """Presentation times (s) of the frames `make_video` writes."""
    count = int(round(spec.seconds * float(spec.fps)))
    step = 1.0 / float(spec.fps)
    if not spec.vfr:
        return np.arange(count) * step
    rng = np.random.default_rng(count)
    return np.concatenate([[0.0], np.cumsum(step * rng.choice([0.5, 1.0, 1.5, 2.0], size=count - 1))])


def _add_video_stream(container, spec: VideoSpec):
    rate = Fraction(spec.fps).limit_denominator(1001)
    stream = container.add_stream(spec.codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, spec.pix_fmt
    gop = max(1, int(round(spec.gop_seconds * float(spec.fps))))
    options = {"g": str(gop)}
    if spec.codec in ("libx264", "libx265"):
        options.update(preset=spec.preset, crf=str(spec.crf))
        if spec.bframes is not None:
            options["bf"] = str(spec.bframes)
    if spec.codec == "libx264":
        options["threads"] = "1"  # its frame threads made B-frame streams differ now and then between runs
    if spec.codec == "libx265":
        options["x265-params"] = "log-level=error:pools=1:frame-threads=1"
    options.update(spec.encoder_options)
    stream.options = options
    if spec.vfr:
        stream.time_base = stream.codec_context.time_base = Fraction(1, 90000)
    if spec.rotation:
        stream.set_display_rotation(spec.rotation)
    return stream


def _add_audio_stream(container, spec: VideoSpec):
    codec = spec.audio_codec or ("libopus" if Path(container.name).suffix.lower() == ".webm" else "aac")
    stream = container.add_stream(codec, rate=spec.audio_rate)
    stream.layout = channel_layout(spec.audio_channels)
    return stream


def channel_layout(channels: int) -> str:
    """The layout `make_video` writes for a channel count (FFmpeg's default for counts above 2)."""
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


def _video_frames(spec: VideoSpec, stream):
    times = frame_times(spec)
    ys, xs = np.mgrid[0 : spec.height, 0 : spec.width].astype(np.float32)
    for index, t in enumerate(times):
        picture = render_frame(index, float(t), spec, ys, xs)
        # converted here, not by the encoder: its own conversion does not write the same bytes twice
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format=stream.pix_fmt)
        if spec.vfr:
            frame.pts = int(round(t * 90000))
            frame.time_base = Fraction(1, 90000)
        yield frame


def render_frame(index: int, t: float, spec: VideoSpec, ys=None, xs=None) -> np.ndarray:
    """The RGB picture of frame `index` at time `t` (what `make_video` encodes)."""
    h, w = spec.height, spec.width
    if ys is None:
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[..., 0] = (xs / max(w - 1, 1) * 200 + 40 * np.sin(t)).clip(0, 255)
    img[..., 1] = (ys / max(h - 1, 1) * 200 + index % 50).clip(0, 255)
    img[..., 2] = ((xs + ys + 7 * index) % 64) * 3
    side = max(2, min(h, w) // 6)
    x0 = int((t * 0.25 % 1.0) * max(w - side, 1))
    y0 = int((0.5 + 0.4 * np.sin(t)) * max(h - side, 1))
    img[y0 : y0 + side, x0 : x0 + side] = 255
    bit = max(1, w // 32)
    for b in range(min(16, w // bit)):
        img[: max(1, h // 40), b * bit : (b + 1) * bit] = 255 if (index >> b) & 1 else 0
    if any(start <= t < end for start, end in spec.events):
        r = min(h, w) // 4
        disc = (ys - h / 2) ** 2 + (xs - w / 2) ** 2 < r * r
        img[disc] = (230, 20, 20)
    return img


def speech_like(seconds: float, rate: int, events=()) -> np.ndarray:
    """Mono float32 in [-1, 1]: voiced formants modulated at ~4 Hz, tone bursts during events."""
    t = np.arange(int(round(seconds * rate))) / rate
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in (1, 2, 3, 5, 8))
    syllables = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    signal = 0.15 * voice * syllables
    for start, end in events:
        inside = (t >= start) & (t < end)
        signal[inside] += 0.3 * np.sin(2 * np.pi * 880 * t[inside])
    return np.clip(signal, -1, 1).astype(np.float32)


def _audio_frames(spec: VideoSpec):
    seconds = spec.audio_seconds if spec.audio_seconds is not None else spec.seconds
    mono = speech_like(seconds, spec.audio_rate, spec.events)
    # Each channel a quieter copy of the one before, so that a mixdown that drops or weights a channel shows.
    channels = np.stack([np.float32(0.8**k) * mono for k in range(spec.audio_channels)])
    layout = channel_layout(spec.audio_channels)
    block = 1024
    for start in range(0, channels.shape[1], block):
        # Packed samples (one plane): PyAV 18.1's from_ndarray cannot fill a planar frame of 8 or more channels.
        chunk = np.ascontiguousarray(channels[:, start : start + block].T).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout=layout)
        frame.sample_rate = spec.audio_rate
        frame.pts = start
        yield frame
