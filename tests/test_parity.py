"""The CPU stage equals transformers' processors bit for bit.

Pixel parity: for the frames qprep samples, `pixel_values_videos` and `video_grid_thw` equal what
`Qwen2VLVideoProcessor` makes of the same frames decoded plainly (every frame, PyAV rgb24).
Audio parity: features equal the processor's `WhisperFeatureExtractor` call on the same waveform,
and the waveform equals a plain full decode cut to the window.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from transformers import Qwen2VLVideoProcessor, WhisperFeatureExtractor

import qprep
from qprep.schemas.settings import load_model_spec
from reference import plain_audio_decode, plain_decode, reference_pixels

# Qwen2.5-Omni's preprocessor_config.json (hub), the values that matter here.
OMNI_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
    "hop_length": 160, "chunk_length": 300, "n_fft": 400, "padding_value": 0.0,
}

VIDEO_MATRIX = {
    "24fps-landscape.mp4": dict(width=320, height=180, fps=24, seconds=4),
    "25fps-portrait.mp4": dict(width=180, height=320, fps=25, seconds=4, bframes=3),
    "2997fps-odd.mp4": dict(width=301, height=199, fps=30000 / 1001, seconds=4, pix_fmt="yuv444p"),
    "30fps-noaudio.mp4": dict(width=320, height=240, fps=30, seconds=3, audio=False),
    "60fps.mp4": dict(width=256, height=144, fps=60, seconds=3, gop_seconds=1),
    "vfr.mp4": dict(width=320, height=240, fps=30, seconds=4, vfr=True),
    "rot90.mp4": dict(width=336, height=168, fps=30, seconds=3, rotation=90),
    "rot180.mp4": dict(width=336, height=168, fps=30, seconds=3, rotation=180),
    "rot270.mp4": dict(width=336, height=168, fps=30, seconds=3, rotation=270),
    "mkv-vp9.mkv": dict(width=320, height=240, fps=25, seconds=3, codec="libvpx-vp9"),
}


@pytest.mark.parametrize("name", sorted(VIDEO_MATRIX))
def test_pixels_equal_the_processor(videos, name):
    path = videos(name, **VIDEO_MATRIX[name])
    prepared = qprep.preprocess_video(path, audio=False)
    expected = reference_pixels(path, prepared.metadata.frame_indices, Qwen2VLVideoProcessor())
    assert torch.equal(prepared.video_grid_thw, expected["video_grid_thw"])
    assert torch.equal(prepared.pixel_values_videos, expected["pixel_values_videos"])


@pytest.mark.parametrize(
    "settings, processor_kwargs",
    [
        (dict(num_frames=10), {}),
        (dict(fps=1.0, min_pixels=3136, max_pixels=200 * 28 * 28), dict(min_pixels=3136, max_pixels=200 * 28 * 28)),
        (dict(fps=4.0, max_pixels=64 * 28 * 28), dict(max_pixels=64 * 28 * 28)),
        (dict(num_frames=7, video_start=0.5, video_end=2.5), {}),  # odd count: last frame repeated
    ],
)
def test_pixels_equal_the_processor_across_settings(videos, settings, processor_kwargs):
    path = videos("settings.mp4", width=352, height=288, fps=30, seconds=4, bframes=3)
    spec = load_model_spec({**OMNI_PREPROCESSOR, **processor_kwargs})
    prepared = qprep.preprocess_video(path, spec, audio=False, **settings)
    processor = Qwen2VLVideoProcessor(**{**OMNI_PREPROCESSOR, **processor_kwargs})
    expected = reference_pixels(path, prepared.metadata.frame_indices, processor)
    assert torch.equal(prepared.video_grid_thw, expected["video_grid_thw"])
    assert torch.equal(prepared.pixel_values_videos, expected["pixel_values_videos"])


def test_pixels_equal_the_processor_with_the_per_frame_pixel_cap(videos):
    path = videos("settings.mp4", width=352, height=288, fps=30, seconds=4, bframes=3)
    config = {**OMNI_PREPROCESSOR, "cap_pixels_per_frame": True, "max_video_tokens": 2000}
    prepared = qprep.preprocess_video(path, config, audio=False, fps=4.0)
    processor = Qwen2VLVideoProcessor(**{k: v for k, v in config.items() if "feature" not in k})
    assert prepared.spec.cap_pixels_per_frame
    expected = reference_pixels(path, prepared.metadata.frame_indices, processor)
    assert torch.equal(prepared.video_grid_thw, expected["video_grid_thw"])
    assert torch.equal(prepared.pixel_values_videos, expected["pixel_values_videos"])


def test_fixed_size_equals_qwen_vl_utils_resize_then_processor(videos):
    """The seed recipe's 224×224: qwen-vl-utils resizes, then the processor leaves the size as is."""
    path = videos("settings.mp4", width=352, height=288, fps=30, seconds=4, bframes=3)
    prepared = qprep.preprocess_video(path, OMNI_PREPROCESSOR, audio=False, num_frames=10, size=(224, 224))
    frames, _ = plain_decode(path)
    chosen = torch.from_numpy(np.stack([frames[i] for i in prepared.metadata.frame_indices])).permute(0, 3, 1, 2)
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    resized = F.resize(chosen, [224, 224], interpolation=InterpolationMode.BICUBIC, antialias=True)
    processor = Qwen2VLVideoProcessor(**OMNI_PREPROCESSOR)
    expected = processor(videos=[resized], do_sample_frames=False, cap_pixels_per_frame=False, return_tensors="pt")
    assert prepared.video_grid_thw.tolist() == [[5, 16, 16]]
    assert torch.equal(prepared.pixel_values_videos, expected["pixel_values_videos"])


def test_rotation_is_applied_as_players_do(videos):
    """A video whose display matrix turns it 90° counter-clockwise shows the picture turned so."""
    from qprep.synth import VideoSpec, render_frame

    spec = VideoSpec(**VIDEO_MATRIX["rot90.mp4"])
    path = videos("rot90.mp4", **VIDEO_MATRIX["rot90.mp4"])
    prepared = qprep.preprocess_video(path, audio=False, size=(336, 168), num_frames=2)
    assert (prepared.metadata.width, prepared.metadata.height, prepared.metadata.rotation) == (168, 336, 90)
    picture = unpatchify(prepared.patches, prepared.video_grid_thw[0].tolist())[0].permute(1, 2, 0).float()
    original = render_frame(0, 0.0, spec).astype(np.float32)
    errors = {k: np.abs(np.rot90(original, k=k) - picture.numpy()).mean() for k in (1, 3)}
    assert errors[1] < 6 < errors[3], errors


def unpatchify(patches: torch.Tensor, grid: list[int], ps: int = 14, tps: int = 2, ms: int = 2) -> torch.Tensor:
    """[grid_t·grid_h·grid_w, 3·tps·ps·ps] → [frames, 3, H, W]: the processor's layout, undone."""
    t, h, w = grid
    blocks = patches.view(t, h // ms, w // ms, ms, ms, 3, tps, ps, ps).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    return blocks.reshape(t * tps, 3, h * ps, w * ps)


def omni_reference_features(waveform: np.ndarray):
    extractor = WhisperFeatureExtractor(**{k: OMNI_PREPROCESSOR[k] for k in (
        "feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value")})
    # Qwen2_5OmniProcessor._process_audio: sampling_rate 16000, attention mask, padding to max_length.
    return extractor([waveform], sampling_rate=16000, return_attention_mask=True, padding="max_length",
                     return_tensors="pt")


@pytest.mark.parametrize("window", [(None, None), (0.7, 2.9), (1.0, None)])
def test_audio_equals_the_omni_feature_extractor(videos, window):
    path = videos("speech.mp4", width=160, height=96, fps=25, seconds=4, audio_rate=44100, events=((1.0, 1.5),))
    start, end = window
    prepared = qprep.preprocess_video(path, OMNI_PREPROCESSOR, num_frames=4, video_start=start, video_end=end)
    waveform = plain_audio_decode(path, start, end)
    assert prepared.metadata.has_audio
    assert prepared.metadata.audio_seconds == pytest.approx(len(waveform) / 16000)
    expected = omni_reference_features(waveform)
    assert torch.equal(prepared.input_features, expected["input_features"])
    assert torch.equal(prepared.feature_attention_mask, expected["attention_mask"])
    assert prepared.mel_length == -(-len(waveform) // 160)  # the mask is sampled every hop
    assert prepared.mel_frames().shape == (128, prepared.mel_length)


def test_stereo_is_averaged_to_mono_as_librosa_does(videos):
    """Loudness is the channel mean's, not FFmpeg's 1/√2-per-channel downmix (3 dB louder)."""
    path = videos("speech.mp4", width=160, height=96, fps=25, seconds=4, audio_rate=44100, events=((1.0, 1.5),))
    prepared = qprep.preprocess_video(path, OMNI_PREPROCESSOR, num_frames=4)
    with av.open(str(path)) as container:
        native = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    assert native.shape[0] == 2
    ours = plain_audio_decode(path)
    assert prepared.metadata.audio_seconds == pytest.approx(len(ours) / 16000)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    assert rms(ours) == pytest.approx(rms(native.mean(axis=0)), rel=0.02)


def test_video_without_audio_is_recorded_not_an_error(videos):
    path = videos("30fps-noaudio.mp4", **VIDEO_MATRIX["30fps-noaudio.mp4"])
    prepared = qprep.preprocess_video(path, OMNI_PREPROCESSOR)
    assert prepared.input_features is None and prepared.feature_attention_mask is None
    assert not prepared.metadata.has_audio and prepared.metadata.audio_note == "no audio stream"


@pytest.mark.parametrize("name, spec", [
    ("mkv-vp9.mkv", VIDEO_MATRIX["mkv-vp9.mkv"]),
    ("60fps.mp4", VIDEO_MATRIX["60fps.mp4"]),
    ("speech-48k.mov", dict(width=160, height=96, fps=25, seconds=3, audio_rate=48000)),
])
def test_audio_track_equals_a_plain_decode_in_every_container(videos, name, spec):
    """From the track's very first packet: a container seek would drop Matroska's first audio packet."""
    path = videos(name, **spec)
    prepared = qprep.preprocess_video(path, OMNI_PREPROCESSOR, num_frames=4)
    expected = omni_reference_features(plain_audio_decode(path))
    assert torch.equal(prepared.input_features, expected["input_features"])
    assert torch.equal(prepared.feature_attention_mask, expected["attention_mask"])


@pytest.mark.parametrize("samples", [1, 159, 160, 161, 16000 * 7 + 13, 16000 * 299, 4_800_000 - 700, 4_800_000])
@pytest.mark.parametrize("signal", ["noise", "silence", "whisper-quiet"])
def test_log_mel_equals_the_extractor_padded_to_the_whole_window(samples, signal):
    """qprep computes the STFT only as far as the track reaches; the result must still be the
    processor's 300 s-padded features, bit for bit, padding frames included."""
    from qprep.pipeline.audio import log_mel
    from qprep.schemas.settings import AudioSpec

    rng = np.random.default_rng(samples)
    scale = {"noise": 0.1, "silence": 0.0, "whisper-quiet": 1e-7}[signal]
    waveform = (rng.standard_normal(samples) * scale).astype(np.float32)
    ours = log_mel(waveform, AudioSpec(), "window", "clip.mp4")
    expected = omni_reference_features(waveform)
    assert torch.equal(ours.input_features, expected["input_features"])
    assert torch.equal(ours.feature_attention_mask, expected["attention_mask"].to(torch.int32))


# Every channel count up to 7.1 as AAC (FFmpeg's encoder stops at 8), and more as PCM.
CHANNELS = [(count, f"ch{count}.mp4", {}) for count in range(1, 9)] + [
    (12, "ch12.mkv", dict(audio_codec="pcm_s16le")),
    (16, "ch16.mov", dict(audio_codec="pcm_f32le")),
]


@pytest.mark.parametrize("channels, name, codec", CHANNELS, ids=[name for _, name, _ in CHANNELS])
def test_any_channel_count_is_averaged_as_the_reference_does(videos, channels, name, codec):
    """Mono to 7.1 and beyond: the waveform is the reference's channel mean, bit for bit, and so are the features."""
    from qprep.pipeline.audio import decode_audio

    path = videos(name, width=64, height=48, fps=8, seconds=1, audio_channels=channels, **codec)
    with av.open(str(path)) as container:
        assert container.streams.audio[0].channels == channels
    expected = plain_audio_decode(path)
    waveform = decode_audio(str(path), load_model_spec(OMNI_PREPROCESSOR).audio)
    assert waveform.dtype == np.float32 and np.array_equal(waveform, expected)
    prepared = qprep.preprocess_video(path, OMNI_PREPROCESSOR, num_frames=4)
    features = omni_reference_features(expected)
    assert torch.equal(prepared.input_features, features["input_features"])
    assert torch.equal(prepared.feature_attention_mask, features["attention_mask"])


def test_a_7_1_track_is_prepared_in_a_process_that_survives(videos):
    """`qprep prepare` on 7.1 audio exits 0: reading the 8 planar channels as PyAV 18.1 offers them killed the
    process (SIGSEGV), which only a separate process can show without taking the test run with it."""
    import subprocess
    import sys

    path = videos("ch8.mp4", width=64, height=48, fps=8, seconds=1, audio_channels=8)
    done = subprocess.run([sys.executable, "-m", "qprep", "prepare", str(path), "--num-frames", "4", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"


@pytest.mark.skipif(av.__version__ != "18.1.0", reason="the fault is checked on the PyAV qprep is pinned to")
def test_pyav_counts_the_planes_of_a_7_1_frame_past_its_channels():
    """Why qprep reads packed samples: PyAV's `AudioFrame.planes` looks for a NULL pointer after a planar
    frame's channel pointers; with 8 channels there is none inside the frame's 8 data pointers, so it goes
    on reading the fields after them (counting is harmless; `to_ndarray` then reads those as sample data)."""
    planar = av.AudioFrame(format="fltp", layout="7.1", samples=16)
    assert len(planar.planes) > planar.layout.nb_channels
    assert len(av.AudioFrame(format="flt", layout="7.1", samples=16).planes) == 1
