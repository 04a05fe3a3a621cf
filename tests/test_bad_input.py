"""Every kind of bad input raises one typed error that names the file and the cause."""

from __future__ import annotations

import pytest

import qprep
from qprep import errors
from qprep.synth import make_video


def cut(source, target, fraction: float):
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def assert_fails(path, error_type, *words, **settings):
    with pytest.raises(error_type) as caught:
        qprep.preprocess_video(path, **settings)
    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message.lower(), message
    assert isinstance(caught.value, errors.VideoError) and caught.value.code == error_type.code
    return caught.value


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    assert_fails(path, errors.EmptyFileError, "empty")


def test_missing_file_and_directory(tmp_path):
    assert_fails(tmp_path / "nope.mp4", errors.UnreadableFileError, "no such file")
    (tmp_path / "dir.mp4").mkdir()
    assert_fails(tmp_path / "dir.mp4", errors.UnreadableFileError, "directory")


def test_random_bytes_and_text_named_mp4(tmp_path):
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(bytes(range(256)) * 400)
    assert_fails(noise, errors.UnreadableFileError, "not a video")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    assert_fails(text, errors.UnreadableFileError, "not a video")


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.7, 0.9])
def test_truncated_with_index_at_the_end(videos, tmp_path, fraction):
    source = videos("moov-at-end.mp4", width=160, height=96, fps=25, seconds=4)
    assert_fails(cut(source, tmp_path / f"cut{fraction}.mp4", fraction), errors.UnreadableFileError)


@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.95])
def test_truncated_with_index_at_the_start(videos, tmp_path, fraction):
    source = videos("faststart.mp4", width=160, height=96, fps=25, seconds=4, faststart=True)
    error = assert_fails(cut(source, tmp_path / f"cut{fraction}.mp4", fraction), errors.DecodeError, "truncated")
    assert "frames" in error.cause


def test_cut_inside_the_index_is_truncated_not_a_video_without_audio(videos, tmp_path):
    # Cut near its end, the index still describes the whole video track: FFmpeg reads it and drops
    # the audio track without a word.
    source = videos("moov-at-end.mp4", width=160, height=96, fps=25, seconds=4)
    data = source.read_bytes()
    moov = data.rindex(b"moov") - 4
    path = tmp_path / "cut-index.mp4"
    path.write_bytes(data[: moov + (len(data) - moov) * 99 // 100])  # its last 1 %
    assert_fails(path, errors.DecodeError, "truncated", "'moov' box")
    stopped = cut(source, tmp_path / "stopped.mp4", 0.5)  # a recording stopped before its index was written
    assert_fails(stopped, errors.UnreadableFileError, "truncated", "'mdat' box")


def avi_frames(path, timestamps):
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for pts in timestamps:
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), pts * 8 % 256, np.uint8), format="rgb24")
            frame.pts = pts
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_avi_dropped_frame_is_a_gap_not_a_truncation(tmp_path):
    # AVI writes a dropped frame as an empty index entry: counted by the container, skipped by the demuxer.
    path = avi_frames(tmp_path / "dropped.avi", [0, 1, 2, 4, 5, 6, 7, 8, 9])
    prepared = qprep.preprocess_video(path, num_frames=4)
    assert prepared.metadata.frame_count == 9
    assert prepared.metadata.frame_times == pytest.approx((0.0, 0.4, 0.6, 0.9))  # from the timestamps: 3 is missing
    whole = avi_frames(tmp_path / "whole.avi", range(30))
    assert_fails(cut(whole, tmp_path / "cut.avi", 0.7), errors.DecodeError, "truncated", "30 frames")


def test_undecodable_frames(videos, tmp_path):
    source = videos("faststart-b.mp4", width=160, height=96, fps=25, seconds=4, faststart=True, audio=False)
    data = bytearray(source.read_bytes())
    start = len(data) // 3
    data[start : start + len(data) // 3] = bytes(len(data) // 3)  # zero a third of the frame data
    path = tmp_path / "zeroed.mp4"
    path.write_bytes(bytes(data))
    assert_fails(path, errors.DecodeError, "decod", fps=25.0)


def test_no_video_stream(tmp_path):
    from corpus import write_audio_only

    path = tmp_path / "audio-only.mp4"
    write_audio_only(path)
    assert_fails(path, errors.NoVideoStreamError, "no video stream")


def test_extreme_aspect_ratio(tmp_path):
    path = make_video(tmp_path / "sliver.mp4", width=1200, height=4, fps=10, seconds=1, audio=False)
    assert_fails(path, errors.GeometryError, "aspect ratio")


def test_absurd_frame_size(tmp_path):
    path = make_video(tmp_path / "huge.mkv", width=16400, height=96, fps=2, seconds=1, codec="mjpeg",
                      pix_fmt="yuvj420p", audio=False)
    assert_fails(path, errors.GeometryError, "16400x96", "exceeds")


def test_fewer_frames_than_asked(videos):
    path = videos("short.mp4", width=160, height=96, fps=10, seconds=2)
    assert_fails(path, errors.FrameCountError, "num_frames=100", "20", num_frames=100)


def test_single_frame_video(tmp_path):
    path = make_video(tmp_path / "one.mp4", width=160, height=96, fps=10, seconds=0.1, audio=False)
    assert_fails(path, errors.FrameCountError, "only 1")


def test_window_outside_the_video(videos):
    path = videos("short.mp4", width=160, height=96, fps=10, seconds=2)
    assert_fails(path, errors.TimeRangeError, "select no frames", video_start=5.0, video_end=9.0)


@pytest.mark.slow  # a 302 s track
def test_long_audio_policy_error_refuses_instead_of_cutting(tmp_path):
    spec = dict(width=64, height=48, fps=2, seconds=302, gop_seconds=10, audio_rate=16000, audio_channels=1)
    path = make_video(tmp_path / "long.mp4", **spec)
    assert_fails(path, errors.AudioError, "longer than", "300 s", long_audio="error", num_frames=4)
    windowed = qprep.preprocess_video(path, num_frames=4)
    assert windowed.metadata.audio_windows == 2
    assert windowed.input_features.shape == (2, 128, 30000)
    assert windowed.mel_length == pytest.approx(windowed.metadata.audio_seconds * 100, abs=2)


def test_bad_settings_fail_before_any_video(tmp_path):
    with pytest.raises(qprep.SettingsError):
        qprep.preprocess_video(tmp_path / "any.mp4", fps=-1)
    with pytest.raises(qprep.SettingsError):
        qprep.preprocess_video(tmp_path / "any.mp4", video_start=5, video_end=2)
