"""Clips cut from a longer video without re-encoding (`ffmpeg -ss 1.3 -i long.mp4 -c copy clip.mp4`).

Such a clip starts at the keyframe before the cut, and its MP4 edit list starts playback at the cut:
the frames before it are decoded (later frames refer to them) but never shown, and the container's
frame count includes them. qprep samples the frames a player shows, with times from the cut.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from transformers import Qwen2VLVideoProcessor

import qprep
from corpus import cut_with_stream_copy
from qprep.pipeline.audio import decode_audio
from qprep.pipeline.decode import decode_frames
from qprep.pipeline.probe import open_container, probe_container
from qprep.schemas.settings import load_model_spec
from reference import plain_audio_decode, plain_decode, reference_pixels

CUT = 1.3  # seconds: between two frames at 25 fps (1.28 and 1.32), 0.3 s after a keyframe
SOURCE = dict(width=160, height=96, fps=25, seconds=4, gop_seconds=1, audio_rate=48000)
KINDS = {"b-frames": dict(bframes=3), "no-b-frames": dict(bframes=0)}
FIRST_SHOWN = 33  # the source's first frame at or after the cut (1.32 s)


@pytest.fixture(scope="module", params=sorted(KINDS))
def clip(request, videos, tmp_path_factory):
    """(source, clip) for each kind of stream."""
    source = videos(f"long-{request.param}.mp4", **SOURCE, **KINDS[request.param])
    return source, cut_with_stream_copy(source, tmp_path_factory.mktemp("clips") / "clip.mp4", CUT)


def test_the_clip_hides_the_frames_before_the_cut_as_ffmpeg_writes_it(clip):
    """What failed before: the container counts frames the decoder never returns."""
    source, path = clip
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        declared = stream.frames
        discarded = [packet.pts for packet in container.demux(stream) if packet.size and packet.is_discard]
    shown = plain_decode(path)[0]
    assert discarded and max(discarded) < 0
    assert declared == len(shown) + len(discarded)
    assert len(shown) == len(plain_decode(source)[0]) - FIRST_SHOWN


@pytest.mark.parametrize("settings", [{}, dict(num_frames=10), dict(fps=4.0, video_start=0.5, video_end=2.0)])
def test_a_clip_is_prepared_from_the_frames_a_player_shows(clip, settings):
    source, path = clip
    prepared = qprep.preprocess_video(path, audio=False, **settings)
    meta = prepared.metadata
    shown, _ = plain_decode(path)
    assert meta.frame_count == len(shown)
    expected = reference_pixels(path, meta.frame_indices, Qwen2VLVideoProcessor())
    assert torch.equal(prepared.video_grid_thw, expected["video_grid_thw"])
    assert torch.equal(prepared.pixel_values_videos, expected["pixel_values_videos"])
    # Times count from the cut: the clip's frame i is the source's frame FIRST_SHOWN + i, 1/25 s apart.
    assert meta.frame_times == pytest.approx([index / 25 for index in meta.frame_indices], abs=1e-9)
    if "video_start" not in settings:
        assert meta.frame_indices[0] == 0 and meta.frame_times[0] == 0.0
    source_frames, _ = plain_decode(source)
    for index in meta.frame_indices:
        np.testing.assert_array_equal(shown[index], source_frames[FIRST_SHOWN + index])


@pytest.mark.parametrize("step", [1, 7, 30])
def test_sparse_decode_of_a_clip_equals_a_full_decode(clip, step):
    _, path = clip
    with av.open(str(path)) as container:
        reference = {frame.pts: frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)}
    with open_container(path) as container:
        info = probe_container(container, path)
        wanted = info.frame_pts[::step]
        got = {frame.pts: frame.to_ndarray(format="rgb24") for frame in decode_frames(container, info, wanted)}
    assert sorted(got) == sorted(int(p) for p in wanted) and set(got) <= set(reference)
    for pts, picture in got.items():
        np.testing.assert_array_equal(picture, reference[pts])


def test_a_clips_audio_starts_at_the_cut(clip):
    """The audio is the plain decode's (its edit list trims what precedes the cut), and it is the source's
    track from the cut on, sample for sample."""
    source, path = clip
    waveform = decode_audio(str(path), load_model_spec(None).audio)
    assert np.array_equal(waveform, plain_audio_decode(path))
    with av.open(str(source)) as container:
        whole = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)
    with av.open(str(path)) as container:
        cut = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)
    start = round(CUT * SOURCE["audio_rate"])
    assert cut.shape[1] >= whole.shape[1] - start - 1024
    np.testing.assert_array_equal(cut, whole[:, start : start + cut.shape[1]])
    prepared = qprep.preprocess_video(path, num_frames=4)
    assert prepared.metadata.audio_seconds == pytest.approx(len(waveform) / 16000)


def test_an_edit_that_ends_before_the_media_hides_the_frames_after_it(clip, tmp_path):
    """A clip cut with an end as well may hold frames past its edit's end: shown by no player, not sampled."""
    from corpus import end_edit_early

    _, cut = clip
    path = end_edit_early(cut, tmp_path / "ends-early.mp4", 0.5)
    shown, _ = plain_decode(path)
    before = plain_decode(cut)[0]
    assert 0 < len(before) - len(shown) < 0.5 * 25 + 2  # hidden at the end now (about 0.5 s of frames)
    assert all(np.array_equal(mine, theirs) for mine, theirs in zip(shown, before))  # the same first ones
    prepared = qprep.preprocess_video(path, audio=False, num_frames=10)
    meta = prepared.metadata
    assert meta.frame_count == len(shown) and meta.frame_indices[-1] == len(shown) - 1
    expected = reference_pixels(path, meta.frame_indices, Qwen2VLVideoProcessor())
    assert torch.equal(prepared.pixel_values_videos, expected["pixel_values_videos"])
    assert meta.frame_times[0] == 0.0 and meta.frame_times[-1] == pytest.approx((len(shown) - 1) / 25, abs=1e-9)
