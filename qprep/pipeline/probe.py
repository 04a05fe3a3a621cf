"""Stage 1: open a video, check it, and index its frames without decoding them.

The index is the list of packet timestamps in decode order. Sorted, it numbers the frames in
presentation order (frame `i` is the `i`-th smallest pts), which is how every reference reader
(decord, torchcodec, torchvision) indexes frames; keyframe positions tell the decoder where it
may start. Demuxing reads the compressed bytes once but decodes nothing.

Only the frames a player shows are numbered. A clip cut from a longer MP4 without re-encoding
(`ffmpeg -ss 1.3 -i long.mp4 -c copy clip.mp4`) starts at the keyframe before the cut and holds an
edit list that starts playback at the cut: FFmpeg's demuxer marks the packets before it as discarded
(they are decoded only as references, and the decoder drops their pictures) and gives the first
shown frame pts 0, while the container's frame count still includes them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from qprep.errors import DecodeError, EmptyFileError, GeometryError, NoVideoStreamError, UnreadableFileError

# Larger than any real camera or codec level produces (8K is 7680 wide); a bigger header is a
# corrupt or hostile file, and decoding it would exhaust memory.
MAX_SIDE = 16384
# Top-level boxes of MP4/MOV files (ISO base media), and the two whose end a complete file holds.
_ISO_TOP_LEVEL = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"uuid", b"moof", b"mfra", b"meta",
                            b"pdin", b"styp", b"sidx", b"prft"})
_ISO_CONTENT = {b"moov": "the index", b"mdat": "the media data"}


@dataclass(frozen=True)
class AudioStreamInfo:
    codec: str
    sample_rate: int
    channels: int


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video, plus its frame index."""

    path: str
    codec: str
    coded_width: int  # before rotation: the decoded frames carry their display rotation
    coded_height: int
    time_base: Fraction
    average_fps: float
    real_fps: float  # the stream's base rate (FFmpeg's r_frame_rate): the timestamps' finest rhythm
    duration: float  # seconds
    packet_pts: np.ndarray  # int64, decode order: every packet, shown or not (decoding may start at any)
    packet_is_key: np.ndarray  # bool, decode order
    packet_shown: np.ndarray  # bool, decode order: False where an edit list discards the packet's picture
    audio: AudioStreamInfo | None

    @property
    def frame_count(self) -> int:
        """Frames a player shows."""
        return int(self.packet_shown.sum())

    @property
    def frame_pts(self) -> np.ndarray:
        """Timestamps of the frames a player shows, in presentation order."""
        return np.sort(self.packet_pts[self.packet_shown])

    def seconds(self, pts: np.ndarray) -> np.ndarray:
        """Seconds from the first frame shown (an edit list's start), each the float nearest the exact rational
        (pts - first) · time_base: on a constant-rate stream, the same float as `index / fps`."""
        first = int(self.frame_pts[0])
        return np.array([float((int(p) - first) * self.time_base) for p in np.asarray(pts, dtype=np.int64)],
                        dtype=np.float64)


def open_container(path: str | Path, what: str = "a video") -> av.container.InputContainer:
    """Open a file with FFmpeg, turning every way that can fail into a typed error (`what` the file
    should be, as the errors say it)."""
    path = Path(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise UnreadableFileError(path, "no such file") from None
    except OSError as exc:
        raise UnreadableFileError(path, f"cannot stat: {exc.strerror or exc}") from None
    if path.is_dir():
        raise UnreadableFileError(path, f"is a directory, not {what} file")
    if size == 0:
        raise EmptyFileError(path, "file is empty (0 bytes)")
    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except PermissionError:
        raise UnreadableFileError(path, "permission denied") from None
    except av.error.FFmpegError as exc:
        cut = _cut_box(path)  # e.g. a recording stopped before its index (written last) was
        if cut:
            raise UnreadableFileError(path, f"file is truncated: {cut}; FFmpeg cannot open it "
                                            f"({_ffmpeg_message(exc)})") from None
        raise UnreadableFileError(path, f"not {what} FFmpeg can read ({_ffmpeg_message(exc)})") from None


def probe(path: str | Path) -> VideoInfo:
    """Probe and index `path`. Raises a `VideoError` subclass naming the cause."""
    with open_container(path) as container:
        return probe_container(container, path)


def probe_container(container: av.container.InputContainer, path: str | Path) -> VideoInfo:
    if not container.streams.video:
        cut = _cut_box(path)  # a cut index can lose the video stream's description
        if cut:
            raise DecodeError(path, f"file is truncated: {cut}")
        raise NoVideoStreamError(path, "the file has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None or stream.codec_context.codec is None:
        raise NoVideoStreamError(path, "the video stream's codec is not supported by FFmpeg")
    width, height = int(stream.codec_context.width), int(stream.codec_context.height)
    if width <= 0 or height <= 0:
        raise GeometryError(path, f"the video stream declares a {width}x{height} frame size")
    if max(width, height) > MAX_SIDE:
        raise GeometryError(path, f"frame size {width}x{height} exceeds {MAX_SIDE} pixels on a side")
    if stream.time_base is None:
        raise DecodeError(path, "the video stream has no time base")

    packet_pts, packet_is_key, packet_shown = _index_packets(container, stream, path)
    if len(packet_pts) == 0:
        raise DecodeError(path, "the video stream holds no frames")
    if not packet_shown.any():
        raise DecodeError(path, f"the edit list discards all {len(packet_pts)} frames of the video stream")
    if _missing_frames(stream, packet_pts):
        raise DecodeError(
            path, f"file is truncated: the container lists {stream.frames} frames but only {len(packet_pts)} are present"
        )
    cut = _cut_box(path)
    if cut:
        raise DecodeError(path, f"file is truncated: {cut}")

    time_base = Fraction(stream.time_base)
    frame_pts = np.sort(packet_pts[packet_shown])
    span = float((int(frame_pts[-1]) - int(frame_pts[0])) * time_base)
    average_fps = _average_fps(stream, len(frame_pts), span)
    duration = len(frame_pts) / average_fps
    audio = None
    if container.streams.audio:
        a = container.streams.audio[0]
        if a.codec_context is not None and a.codec_context.codec is not None and (a.sample_rate or 0) > 0:
            audio = AudioStreamInfo(codec=a.codec_context.name, sample_rate=int(a.sample_rate),
                                    channels=int(a.channels or 0))
    return VideoInfo(
        path=str(path),
        codec=stream.codec_context.name,
        coded_width=width,
        coded_height=height,
        time_base=time_base,
        average_fps=average_fps,
        real_fps=float(stream.base_rate) if stream.base_rate else average_fps,
        duration=duration,
        packet_pts=packet_pts,
        packet_is_key=packet_is_key,
        packet_shown=packet_shown,
        audio=audio,
    )


def _index_packets(container, stream, path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pts, keys, shown = [], [], []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream marker
            timestamp = packet_timestamp(packet)
            if timestamp is None:
                raise DecodeError(path, f"video packet {len(pts)} has no timestamp")
            pts.append(timestamp)
            keys.append(bool(packet.is_keyframe))
            shown.append(not packet.is_discard)
    except av.error.FFmpegError as exc:
        if not pts:
            raise DecodeError(path, f"cannot read video packets ({_ffmpeg_message(exc)})") from None
        raise DecodeError(path, f"file is truncated or corrupt after frame {len(pts)} ({_ffmpeg_message(exc)})") from None
    container.seek(0)
    packet_pts = np.asarray(pts, dtype=np.int64)
    if len(np.unique(packet_pts)) != len(packet_pts):
        raise DecodeError(path, "the video stream has frames with duplicate timestamps")
    return packet_pts, np.asarray(keys, dtype=bool), np.asarray(shown, dtype=bool)


def _missing_frames(stream, packet_pts: np.ndarray) -> int:
    """Frames the container lists that the file does not hold.

    Where one tick of the time base is one frame period (AVI), a dropped frame is an empty index
    entry: the container counts it, the demuxer skips it, and the frames after it keep their
    slots. Only slots after the last frame present are missing then.
    """
    declared = int(stream.frames or 0)
    present = len(packet_pts)
    rate = stream.average_rate
    if rate and stream.time_base and Fraction(stream.time_base) * Fraction(rate) == 1:
        present = max(present, int(packet_pts.max()) + 1 - int(stream.start_time or 0))
    return max(declared - present, 0)


def _cut_box(path) -> str | None:
    """Where an MP4/MOV file ends inside its index (moov) or its data (mdat), if it does.

    FFmpeg reads what is left of a cut index without a word: a track whose description was cut
    off vanishes (a video would silently lose its audio), and frames past the cut are missing.
    Only the top-level boxes are read; any other file, or a layout not known here, is left to
    FFmpeg.
    """
    size = os.path.getsize(path)
    offset = 0
    with open(path, "rb") as handle:
        while offset + 8 <= size:
            handle.seek(offset)
            header = handle.read(16)
            box_size, kind = struct.unpack(">I4s", header[:8])
            if box_size == 1 and len(header) == 16:  # a 64-bit size follows
                box_size = struct.unpack(">Q", header[8:])[0]
            if box_size == 0 or kind not in _ISO_TOP_LEVEL or box_size < 8:
                return None  # runs to the end of the file, or not a layout known here
            if offset + box_size > size:
                if kind not in _ISO_CONTENT:
                    return None
                return (f"it ends inside its {kind.decode()!r} box ({_ISO_CONTENT[kind]}): "
                        f"{size - offset} of {box_size} bytes present")
            offset += box_size
    return None


def packet_timestamp(packet) -> int | None:
    """A packet's presentation time, or its decode time where the container stores no pts (AVI)."""
    return packet.pts if packet.pts is not None else packet.dts


def _average_fps(stream, frame_count: int, span: float) -> float:
    # The container's average rate is what decord and torchvision report, so sampling uses it
    # where it is sane; otherwise derive it from the timestamps.
    rate = stream.average_rate or stream.guessed_rate
    if rate is not None and 0 < float(rate) < 10000:
        return float(rate)
    if frame_count > 1 and span > 0:
        return (frame_count - 1) / span
    return 1.0


def _ffmpeg_message(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)
