"""Sparse decoding returns exactly the frames a full decode returns, for less work."""

from __future__ import annotations

import av
import numpy as np
import pytest

from qprep.pipeline.decode import DecodeStats, decode_frames
from qprep.pipeline.probe import open_container, probe_container

STREAMS = {
    "h264-bframes.mp4": dict(bframes=3),
    "h264-no-bframes.mp4": dict(bframes=0),
    "h264-open-gop.mp4": dict(bframes=3, encoder_options=(("x264-params", "open-gop=1"),)),
    "hevc.mp4": dict(codec="libx265"),
    "vp9.webm": dict(codec="libvpx-vp9"),
    "mpeg4.avi": dict(codec="mpeg4"),
    "mjpeg.mkv": dict(codec="mjpeg", pix_fmt="yuvj420p"),
}


def full_decode(path) -> dict[int, np.ndarray]:
    with av.open(str(path)) as container:
        return {frame.pts: frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)}


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("step", [1, 4, 17, 45, 200])
def test_sparse_decode_is_bit_identical_to_a_full_decode(videos, name, step):
    path = videos(name, width=160, height=96, fps=30, seconds=8, gop_seconds=1.5, audio=False, **STREAMS[name])
    reference = full_decode(path)
    with open_container(path) as container:
        info = probe_container(container, path)
        assert info.frame_count == len(reference)
        wanted = info.frame_pts[::step]
        got = {frame.pts: frame.to_ndarray(format="rgb24") for frame in decode_frames(container, info, wanted)}
    assert sorted(got) == sorted(int(p) for p in wanted)
    for pts, picture in got.items():
        np.testing.assert_array_equal(picture, reference[pts])


def test_sparse_decode_skips_what_it_can(videos):
    path = videos("h264-bframes-long.mp4", width=160, height=96, fps=30, seconds=12, gop_seconds=2, audio=False,
                  bframes=3)
    with open_container(path) as container:
        info = probe_container(container, path)
        dense, sparse = DecodeStats(), DecodeStats()
        list(decode_frames(container, info, info.frame_pts[::15], stats=dense))  # 2 per second
        list(decode_frames(container, info, info.frame_pts[::75], stats=sparse))  # one per 2.5 s
    # fps 2 with 2 s groups: every group is needed, but non-reference frames are not decoded.
    assert dense.packets_sent <= info.frame_count
    assert dense.packets_skippable > 0.5 * dense.packets_sent
    # Sparser than the groups: whole groups are jumped over.
    assert sparse.seeks > 1 and sparse.packets_sent < 0.6 * info.frame_count


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_a_test_video_is_the_same_bytes_each_time_it_is_made(tmp_path, name):
    """`qprep.synth` converts its frames to the stream's pixel format itself: the encoder's own
    conversion gave other bytes from run to run, so media made apart (a bench's two sides, a rerun)
    would not be the same file."""
    from qprep.synth import VideoSpec, make_video

    spec = VideoSpec(width=112, height=84, fps=25, seconds=1, audio=True, **STREAMS[name])
    made = {make_video(tmp_path / f"{index}-{name}", spec).read_bytes() for index in range(3)}
    assert len(made) == 1
