"""Stage 3: decode only the frames a plan needs.

Reading forward from a keyframe is the only way to a frame, so the cost of sparse sampling is the
frames decoded on the way. Two things cut it without changing a single output bit:

* jumps: as soon as no later wanted frame depends on the rest of the current group of pictures,
  drain the decoder and seek straight to the keyframe that starts the next wanted frame's group;
* skips: a frame that is neither wanted nor a reference for another frame is never decoded
  (FFmpeg's `skip_frame = NONREF`, switched per packet; frame threads copy it per packet).
  With B-frames that is about half of all frames.

The start keyframe of a frame is the last keyframe whose pts is not after the frame's, so an
open-GOP leading picture is always decoded from the group before it, as a full decode would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

from qprep.errors import DecodeError
from qprep.pipeline.probe import VideoInfo, packet_timestamp


@dataclass
class DecodeStats:
    """What a sparse decode cost: packets handed to the decoder (of which marked skippable)."""

    packets_sent: int = 0
    packets_skippable: int = 0
    seeks: int = 0


class _Index:
    """The probe's packet index, arranged for the questions the decode loop asks."""

    def __init__(self, info: VideoInfo, wanted_pts: np.ndarray):
        self.packet_pts = info.packet_pts
        self.position_of = {int(p): d for d, p in enumerate(info.packet_pts)}
        self.wanted = {int(p) for p in wanted_pts}
        self.wanted_positions = np.sort([self.position_of[p] for p in self.wanted])
        # Earliest wanted pts among the wanted packets from the i-th (in decode order) on.
        pts_by_position = info.packet_pts[self.wanted_positions]
        self.earliest_pts_from = np.minimum.accumulate(pts_by_position[::-1])[::-1]
        # Every keyframe, shown or not: a clip cut with stream copy starts at one its edit list hides.
        key_positions = np.flatnonzero(info.packet_is_key)
        order = np.argsort(info.packet_pts[key_positions])
        self.key_pts = info.packet_pts[key_positions][order]
        self.key_positions = key_positions[order]

    def start_position(self, pts: int) -> int:
        """Where decoding must start to reproduce the frame with this pts."""
        k = int(np.searchsorted(self.key_pts, pts, side="right")) - 1
        return int(self.key_positions[k]) if k >= 0 else 0

    def next_start(self, position: int) -> int | None:
        """Where to start for the wanted frames whose packets lie at or after `position`."""
        i = int(np.searchsorted(self.wanted_positions, position))
        if i == len(self.wanted_positions):
            return None
        return self.start_position(int(self.earliest_pts_from[i]))


def decode_frames(container, info: VideoInfo, wanted_pts: np.ndarray, threads: int = 0,
                  stats: DecodeStats | None = None) -> Iterator[av.VideoFrame]:
    """Yield every wanted frame exactly once. Raises `DecodeError` if the data cannot produce one."""
    stats = stats if stats is not None else DecodeStats()
    stream = container.streams.video[0]
    context = stream.codec_context
    if not context.is_open:  # threading is fixed once the codec is open
        context.thread_type = "AUTO"
        context.thread_count = threads
    index = _Index(info, wanted_pts)
    pending = set(index.wanted)
    start = index.next_start(0)
    try:
        while start is not None and pending:
            stopped_at = yield from _decode_run(container, stream, index, start, pending, stats)
            start = index.next_start(stopped_at) if stopped_at is not None else None
    except av.error.FFmpegError as exc:
        raise DecodeError(info.path, f"the decoder failed ({getattr(exc, 'strerror', None) or exc})") from None
    if pending:
        missing = sorted(int(np.searchsorted(info.frame_pts, p)) for p in pending)
        shown = ", ".join(map(str, missing[:8])) + (" …" if len(missing) > 8 else "")
        raise DecodeError(info.path, f"frame(s) {shown} could not be decoded (corrupt or truncated data)")


def _decode_run(container, stream, index: _Index, start: int, pending: set[int], stats: DecodeStats):
    """Decode forward from the keyframe at `start`; return the keyframe position the next run
    should be planned from, or None when nothing wanted is left."""
    context = stream.codec_context
    context.flush_buffers()
    decoding_wanted = None
    stats.seeks += 1
    for packet, position in _packets_from(container, stream, index, start):
        wanted = packet_timestamp(packet) in index.wanted
        if wanted is not decoding_wanted:
            context.skip_frame = "DEFAULT" if wanted else "NONREF"
            decoding_wanted = wanted
        stats.packets_sent += 1
        stats.packets_skippable += not wanted
        yield from _wanted(context.decode(packet), pending)
        following = index.next_start(position + 1)
        if following is None or following > position + 1:  # the rest of this group is not needed
            yield from _wanted(context.decode(None), pending)
            return None if following is None else position + 1
    yield from _wanted(context.decode(None), pending)
    return None


def _packets_from(container, stream, index: _Index, start: int):
    """Packets from decode position `start` on, with their positions."""
    container.seek(int(index.packet_pts[start]), stream=stream, backward=True, any_frame=False)
    packets = _indexed_packets(container, stream, index)
    first = next(packets, None)
    if first is not None and first[1] > start:
        # The demuxer's seek overshot (its index holds dts, not pts): read from the top instead.
        container.seek(0)
        packets, first = _indexed_packets(container, stream, index), None
    if first is not None and first[1] == start:
        yield first
    yield from ((packet, position) for packet, position in packets if position >= start)


def _indexed_packets(container, stream, index: _Index):
    """Demuxed packets of the stream with their decode positions, up to the end-of-stream marker."""
    for packet in container.demux(stream):
        if packet.size == 0:
            return
        position = index.position_of.get(packet_timestamp(packet))
        if position is not None:
            yield packet, position


def _wanted(frames, pending: set[int]):
    for frame in frames:
        timestamp = frame.pts if frame.pts is not None else frame.dts
        if timestamp in pending:
            pending.discard(timestamp)
            yield frame
