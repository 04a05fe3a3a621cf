"""Audio files (wav, flac, mp3, ...) as store entries and in samples, for the families with an audio
tower (Qwen2.5-Omni, Qwen3-Omni).

Reference: plain PyAV decoding of the whole file (tests/reference.py), then the checkpoint's own
processor (`AutoProcessor`) and full model (its thinker, `get_audio_features`), called directly. The
cache path: `qprep extract --media` and `qprep train`'s own dataset and collate. Same shapes on both
sides, so features, tokens, logits, loss and LoRA gradients are compared bit for bit (fp32).
"""

from __future__ import annotations

import json
import wave

import av
import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from conftest import LOCAL_EXTRACT, built_samples
from qprep import open_cache
from qprep.extraction.run import ExtractOptions, extract
from qprep.pipeline.audio import read_audio_file
from qprep.schemas.settings import MEDIA_KINDS, VideoSettings, load_model_spec
from qprep.synth import VideoSpec, make_video
from qprep.train.data import collate
from qprep.train.model import LanguageModel
from reference import full_model, plain_audio_decode
import test_train_media
from test_train_media import assert_batch_as_the_full_model
from test_train_parity import lora_gradients_both_ways

FAMILIES = ["qwen2_5_omni", "qwen3_omni_moe"]
AUDIO = ["talks/x.wav", "talks/y.flac", "talks/z.mp3", "talks/u.ogg", "talks/v.m4a"]  # the ids `--media` gives them (with the extension)

RECORDS = [
    # the case: a video with its own sound and a separate audio file, as LLaMA-Factory marks them
    {"id": "both", "media": ["b", "talks/x.wav"], "conversations": [
        {"from": "human", "value": "<video><audio>Is the sound of the clip the same as the recording?"},
        {"from": "gpt", "value": "Both hold a tone."}]},
    {"id": "alone", "media": ["talks/x.wav"], "conversations": [  # unmarked: placed first, as the readers do
        {"from": "human", "value": "What do you hear?"}, {"from": "gpt", "value": "A tone and some noise."}]},
    {"id": "text", "media": [], "conversations": [
        {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]},
]
CONTENTS = {  # the same user turns as the chat template's messages, for the processor
    "both": [{"type": "video"}, {"type": "audio"},
             {"type": "text", "text": "Is the sound of the clip the same as the recording?"}],
    "alone": [{"type": "audio"}, {"type": "text", "text": "What do you hear?"}],
    "text": [{"type": "text", "text": "What is two plus two?"}],
}


def write_audio(path, waveform: np.ndarray, rate: int, codec: str) -> None:
    """`waveform` ([channels, samples] float32) encoded by PyAV."""
    layout = "mono" if waveform.shape[0] == 1 else "stereo"
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        # FFmpeg's own Vorbis encoder is marked experimental (this PyAV has no libvorbis)
        options = {"strict": "experimental"} if codec == "vorbis" else {}
        stream = container.add_stream(codec, rate=rate, layout=layout, options=options)
        step = stream.codec_context.frame_size or 1024
        for start in range(0, waveform.shape[1], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(waveform[:, start:start + step]), format="fltp",
                                               layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def tone(samples: int, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A 440 Hz sine plus noise, [channels, samples] float32 (each channel its own noise)."""
    rng = np.random.default_rng(seed)
    sine = 0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / rate)
    return (sine + 0.05 * rng.standard_normal((channels, samples))).astype(np.float32)


def make_media(folder) -> None:
    """Video b (2 s, with sound); x.wav (16 kHz mono PCM, as long as b's track: Qwen3-Omni's processor
    pads the tracks of one call to the longest, which moves a shorter track's last mel frame); y.flac
    (44.1 kHz stereo: resampled and mixed down); z.mp3 (1.5 s); u.ogg (Vorbis, 22.05 kHz stereo); v.m4a
    (AAC in MP4, 44.1 kHz stereo, as phones record); broken.mp3, not audio at all, and
    cut.flac, y.flac cut short (a copy that stopped)."""
    make_video(folder / "b.mp4", VideoSpec(width=96, height=128, fps=30, seconds=2))
    track = len(plain_audio_decode(folder / "b.mp4"))
    write_audio(folder / "talks" / "x.wav", tone(track, 16000), 16000, "pcm_s16le")
    write_audio(folder / "talks" / "y.flac", tone(66150, 44100, channels=2, seed=1), 44100, "flac")
    write_audio(folder / "talks" / "z.mp3", tone(24000, 16000, seed=2), 16000, "libmp3lame")
    write_audio(folder / "talks" / "u.ogg", tone(26460, 22050, channels=2, seed=3), 22050, "vorbis")
    write_audio(folder / "talks" / "v.m4a", tone(52920, 44100, channels=2, seed=4), 44100, "aac")
    (folder / "broken.mp3").write_bytes(b"this is not an audio file\n" * 40)
    (folder / "cut.flac").write_bytes((folder / "talks" / "y.flac").read_bytes()[:20000])


def extract_media(folder, store, model_dir):
    return extract(folder, store, model_dir, VideoSettings(fps=2, kinds=MEDIA_KINDS), dtype="float32", shards=2,
                   options=ExtractOptions(**LOCAL_EXTRACT))


@pytest.fixture(scope="module")
def audio_store(tiny_model, tmp_path_factory):
    """`audio_store(kind)` → (model dir, media folder, open cache, the first run's summary) of a float32
    store of the released tiny checkpoint, extracted with `--media`. Built once per kind."""
    made = {}

    def get(kind):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"{kind}-audio")
            make_media(root / "media")
            model_dir = str(tiny_model(kind, "released"))
            summary = extract_media(root / "media", root / "store.zarr", model_dir)
            made[kind] = model_dir, root / "media", open_cache(root / "store.zarr"), summary
        return made[kind]

    return get


# ---- the store --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", FAMILIES)
def test_an_audio_files_features_are_the_processors_and_its_tokens_the_full_models(audio_store, kind):
    model_dir, folder, cache, _ = audio_store(kind)
    processor = AutoProcessor.from_pretrained(model_dir)
    spec = load_model_spec(model_dir)
    thinker = full_model(model_dir)
    for entry in AUDIO:
        waveform = plain_audio_decode(folder / entry)
        ours = read_audio_file(str(folder / entry), spec.audio, VideoSettings())
        assert np.array_equal(ours.waveform, waveform), entry
        inputs = processor(text=[processor.audio_token], audio=[waveform], return_tensors="pt")
        assert torch.equal(ours.input_features, inputs["input_features"]), entry
        assert torch.equal(ours.feature_attention_mask.long(), inputs["feature_attention_mask"].long()), entry
        with torch.no_grad():
            expected = thinker.get_audio_features(inputs["input_features"],
                                                  feature_attention_mask=inputs["feature_attention_mask"])
        cached = cache[entry]
        assert cached.kind == "audio" and cached.video_tokens.shape[0] == 0 and cached.grid_thw == ()
        assert torch.equal(cached.audio_tokens, expected.last_hidden_state), entry
        row = cache.row(entry)
        assert row.audio_length == int(inputs["input_ids"][0].eq(processor.audio_token_id).sum())
        assert row.mel_length == int(inputs["feature_attention_mask"].sum()) and row.audio_windows == 1


def test_a_16_khz_wav_is_read_sample_for_sample_as_librosa_reads_it(audio_store):
    """No resampling at the model's rate: the PCM samples over 32768, what soundfile (librosa's reader,
    transformers' `load_audio`) returns."""
    _, folder, _, _ = audio_store("qwen2_5_omni")
    with wave.open(str(folder / "talks" / "x.wav")) as file:
        assert (file.getframerate(), file.getnchannels(), file.getsampwidth()) == (16000, 1, 2)
        pcm = np.frombuffer(file.readframes(file.getnframes()), dtype="<i2")
    ours = read_audio_file(str(folder / "talks" / "x.wav"), load_model_spec(None).audio, VideoSettings())
    assert np.array_equal(ours.waveform, (pcm / 32768.0).astype(np.float32))


def test_extract_media_takes_audio_files_once_and_lists_a_broken_one(audio_store, tiny_model, tmp_path):
    model_dir, folder, cache, summary = audio_store("qwen2_5_omni")
    assert (summary.extracted, summary.failed) == (6, 2)
    assert sorted(path for path, _ in summary.to_dict()["failures"]) == ["broken.mp3", "cut.flac"]
    for entry, cause in (("broken.mp3", "not an audio file FFmpeg can read"),
                         ("cut.flac", "the audio track cannot be decoded")):
        row = cache.row(entry)
        assert (row.kind, row.status) == ("audio", "failed") and row.error.startswith(cause), row.error
    assert cache.store.attrs["schema_version"] == 5
    assert cache.row("b").kind == "video" and cache.row("b").audio_length > 0

    clean = tmp_path / "clean"  # a folder of audio alone, through the CLI: the second run finds nothing to do
    for entry in AUDIO[:2]:
        (clean / entry).parent.mkdir(parents=True, exist_ok=True)
        (clean / entry).write_bytes((folder / entry).read_bytes())
    first, again = (cli_extract_media(clean, tmp_path / "clean.zarr", model_dir) for _ in range(2))
    assert (first["extracted"], first["failed"]) == (2, 0)
    assert (again["extracted"], again["up_to_date"], again["shards_written"]) == (0, 2, 0)
    assert open_cache(tmp_path / "clean.zarr").ids() == AUDIO[:2]


def cli_extract_media(folder, store, model_dir) -> dict:
    from click.testing import CliRunner

    from qprep.cli import main

    result = CliRunner().invoke(main, ["extract", "--media", str(folder), "--out", str(store), "--model", model_dir,
                                       "--fps", "2", "--dtype", "float32", "--shards", "2", "--executor", "local",
                                       "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_status_counts_audio_files(audio_store):
    from qprep.store.status import format_status, store_status

    _, folder, cache, _ = audio_store("qwen2_5_omni")
    report = store_status(cache.store.root, videos=folder)
    assert report["kinds"] == {"audio": len(AUDIO), "video": 1}
    assert f"{len(AUDIO)} audio files, 1 video" in format_status(report)
    assert report["videos"]["pending"] == 2  # the broken files, retried by the next run


def test_a_model_without_an_audio_tower_lists_audio_files_naming_the_file_and_the_model(tiny_model, tmp_path):
    make_video(tmp_path / "media" / "a.mp4", VideoSpec(width=112, height=84, fps=25, seconds=2, audio=False))
    write_audio(tmp_path / "media" / "x.wav", tone(16000, 16000), 16000, "pcm_s16le")
    model_dir = str(tiny_model("qwen2_5_vl"))
    summary = extract_media(tmp_path / "media", tmp_path / "store.zarr", model_dir)
    assert summary.extracted == 1
    assert summary.skipped == [("x.wav", f"an audio file, and model {model_dir} has no audio tower to encode it")]
    videos_alone = extract(tmp_path / "media", tmp_path / "videos.zarr", model_dir, VideoSettings(fps=2),
                           dtype="float32", shards=2, options=ExtractOptions(**LOCAL_EXTRACT))
    assert (videos_alone.extracted, videos_alone.skipped) == (1, [])  # --videos looks for no audio


def test_a_media_store_made_before_audio_files_lists_them_and_keeps_its_fingerprint(audio_store, tmp_path):
    model_dir, folder, _, _ = audio_store("qwen2_5_omni")
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "x.wav").write_bytes((folder / "talks" / "x.wav").read_bytes())
    store = tmp_path / "store.zarr"
    extract(tmp_path / "media", store, model_dir, VideoSettings(fps=2, kinds=("video", "image")), dtype="float32",
            shards=2, options=ExtractOptions(**LOCAL_EXTRACT))
    summary = extract_media(tmp_path / "media", store, model_dir)
    assert (summary.extracted, summary.failed) == (0, 0)
    assert summary.skipped == [("x.wav", f"an audio file, and {store} was extracted without audio files "
                                         "(--rebuild takes them)")]
    assert open_cache(store).store.attrs["schema_version"] == 3


# ---- samples ----------------------------------------------------------------------------------------

def samples_of(cache, model_dir, tmp_path):
    return built_samples(RECORDS, cache, model_dir, tmp_path)


def processor_batch(model_dir, folder, cache, kind, names, answered: bool = True):
    """`test_train_media.processor_batch` of this module's conversations over the media in `folder`."""
    return test_train_media.processor_batch(model_dir, cache, kind, names, answered, records=RECORDS,
                                            contents=CONTENTS, folder=folder)


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_video_with_its_sound_and_an_audio_file_and_an_audio_file_alone_give_the_full_models_logits_and_loss(
        audio_store, kind, tmp_path):
    model_dir, folder, cache, _ = audio_store(kind)
    checkpoint, layout, samples = samples_of(cache, model_dir, tmp_path)
    assert samples["both"].has_audio and not samples["alone"].has_audio
    language_model = LanguageModel(checkpoint, dtype="float32").eval()
    full = full_model(model_dir)
    for names in (["both"], ["alone", "text"], ["both", "alone", "text"]):
        batch = collate([samples[name] for name in names], cache, layout)
        assert batch.audio_in_video == ("both" in names)
        assert_batch_as_the_full_model(language_model, full, batch,
                                       processor_batch(model_dir, folder, cache, kind, names), names)


def test_lora_gradients_of_audio_samples_equal_the_full_models_with_the_same_adapter(audio_store, tmp_path):
    model_dir, folder, cache, _ = audio_store("qwen2_5_omni")
    checkpoint, layout, samples = samples_of(cache, model_dir, tmp_path)
    names = ["both", "alone"]
    batch = collate([samples[name] for name in names], cache, layout)
    inputs, model_kwargs, labels = processor_batch(model_dir, folder, cache, "qwen2_5_omni", names)
    mine, reference = lora_gradients_both_ways(LanguageModel(checkpoint, dtype="float32").eval(),
                                               full_model(model_dir), batch,
                                               dict(inputs, labels=labels, **model_kwargs))
    assert mine
    for name, gradient in mine.items():
        assert torch.equal(gradient, reference[name]), name


def test_qprep_train_runs_on_a_llamafactory_file_with_audios(audio_store, tmp_path):
    """LLaMA-Factory's form (`audios`, `<audio>` tags, paths under the media folder): every record is
    trained and the loss is finite."""
    from qprep.datasets import DataFile
    from qprep.schemas.training import LoraSettings, TrainSettings
    from qprep.train.loop import train

    model_dir, folder, cache, _ = audio_store("qwen2_5_omni")
    records = [{"messages": [{"role": "user", "content": "<audio>What do you hear?"},
                             {"role": "assistant", "content": "A tone."}], "audios": [entry]} for entry in AUDIO]
    records.append({"messages": [{"role": "user", "content": "<video><audio>And here?"},
                                 {"role": "assistant", "content": "A tone, twice."}],
                    "videos": ["b.mp4"], "audios": ["talks/x.wav"]})
    data = folder / "audio_train.json"
    data.write_text(json.dumps(records))
    said: list[str] = []
    settings = TrainSettings(epochs=1, batch_size=2, grad_accum=1, workers=0,
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    train(cache.store.root, DataFile(data), model_dir, tmp_path / "run", settings, progress=False, echo=said.append)
    assert any(line.startswith(f"{len(AUDIO) + 1} samples") for line in said), said
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses and all(np.isfinite(losses))


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_packed_row_of_audio_samples_gives_each_sample_its_logits_alone(audio_store, kind, tmp_path):
    """Tolerance as tests/test_train_packing.py states it: other matmul shapes, float32 rounding."""
    from test_train_media import assert_each_sample_of_a_packed_row_as_alone

    model_dir, _, cache, _ = audio_store(kind)
    checkpoint, layout, samples = samples_of(cache, model_dir, tmp_path)
    chosen = [samples[name] for name in ("alone", "both", "text", "alone")]
    packed = assert_each_sample_of_a_packed_row_as_alone(checkpoint, cache, layout, chosen)
    assert packed.media_kinds == (("audio",), ("video", "audio"), (), ("audio",)) and packed.audio_in_video


def test_verify_recomputes_audio_files_with_the_processor_and_the_full_model(audio_store):
    from qprep.audit.verify import verify

    _, folder, cache, _ = audio_store("qwen3_omni_moe")
    checked = verify(cache.store.root, ids=AUDIO, videos=folder, progress=False)
    assert [result.id for result in checked.results] == AUDIO
    for result in checked.results:
        assert result.ok, [(c.name, c.detail) for c in result.failed()]
        assert {"mel_length", "audio_tokens"} <= {c.name for c in result.checks}


@pytest.mark.parametrize("kind", FAMILIES)
def test_infer_answers_an_audio_prompt_as_generate_does_on_the_raw_media(audio_store, kind, tmp_path):
    """`qprep infer`'s prompts over an audio file (with a video, and alone): the processor's ids, and
    `generate`'s greedy tokens and logits (the first step within the rounding bound of the last-row
    `lm_head`: the full model multiplies the whole prompt, tests/test_infer.py)."""
    from test_infer import assert_same_steps, generated, ours_with_logits

    from qprep.train.infer import Generator, choose_requests

    model_dir, folder, cache, _ = audio_store(kind)
    checkpoint, layout, _ = samples_of(cache, model_dir, tmp_path)
    asked, skipped = choose_requests(cache, data=tmp_path / "data.json", layout=layout)
    assert not skipped
    generator = Generator(checkpoint, checkpoint.tokenizer(), cache)
    full = full_model(model_dir)
    for request in (r for r in asked if r.id in ("both", "alone")):
        inputs, model_kwargs, _ = processor_batch(model_dir, folder, cache, kind, [request.id], answered=False)
        assert generator.prompt_ids(request) == inputs["input_ids"][0].tolist()
        theirs = generated(full, inputs, generator.stop, **model_kwargs)
        assert_same_steps(ours_with_logits(generator, request), theirs, request.id, whole_prompt_head=True)
