"""A sample is a conversation over any number of cached media: two videos in one sample, the same
video twice, a text-only sample, mixed in one padded batch and in one packed row.

Reference: transformers' full model on the processor's own batch of the same conversations, the
raw videos plainly decoded (tests/reference.py), every video of the batch in one processor call
as a user of the full model would make it. The cache path: `qprep train`'s own dataset and collate
on an extracted store. Same shapes on both sides, so the logits and the loss are compared bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor
from transformers.image_utils import load_image
from transformers.video_utils import VideoMetadata

from qprep.models.checkpoint import open_checkpoint
from qprep.schemas.settings import load_model_spec
from qprep.train.data import IGNORE, build_dataset, collate, collate_packed, load_records
from qprep.train.model import LanguageModel
from conftest import built_samples
from reference import full_model, plain_audio_decode, plain_decode
from test_train_parity import DEEPSTACK, OMNI, QWEN3, answer_labels, lora_gradients_both_ways, true_metadata

STORES = {"qwen2_5_omni": "omni_store", "qwen2_5_vl": "vl_train_store", "qwen2_vl": "qwen2_vl_store",
          "qwen3_omni_moe": "qwen3_omni_store"}
KINDS = ["qwen2_5_omni", "qwen2_5_vl", "qwen2_vl", *QWEN3, "qwen3_omni_moe"]  # every family, the MoE ones too
# Qwen3-Omni's processor pads the audio tracks of one call to the longest, and a shorter track then
# counts one more valid mel frame than alone (2 s: 201 against 200), so its audio tokens depend on its
# batch-mates. qprep featurizes each track alone, as a call with that track alone does; the reference
# batch for that family therefore holds tracks of one length only (b's).
SAME_LENGTH_AUDIO = {"qwen3_omni_moe": {"a": "b"}}

RECORDS = [
    {"id": "pair", "media": ["a", "b"], "conversations": [
        {"from": "human", "value": "Compare <video> with <video>."},
        {"from": "gpt", "value": "From 0 to 1, the first; from 1 to 2, the second."}]},
    {"id": "text", "media": [], "conversations": [
        {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]},
    {"id": "b", "conversations": [  # LongVALE's form: the record's id is its one video
        {"from": "human", "value": "<video> What happens?"}, {"from": "gpt", "value": "From 0 to 1, event b."}]},
    {"id": "again", "media": ["b", "b"], "conversations": [  # one mark for two: the unmarked one goes first
        {"from": "human", "value": "Is it the same as <video>?"}, {"from": "gpt", "value": "Yes."}]},
]
# The same conversations as the chat template's messages, for the processor
MESSAGES = {
    "pair": [{"type": "text", "text": "Compare"}, {"type": "video"}, {"type": "text", "text": "with"},
             {"type": "video"}, {"type": "text", "text": "."}],
    "text": [{"type": "text", "text": "What is two plus two?"}],
    "b": [{"type": "video"}, {"type": "text", "text": "What happens?"}],
    "again": [{"type": "video"}, {"type": "text", "text": "Is it the same as"}, {"type": "video"},
              {"type": "text", "text": "?"}],
}


def store_of(request, kind):
    if kind in STORES:
        return request.getfixturevalue(STORES[kind])
    return request.getfixturevalue("qwen3_store")(kind)


def records_for(kind) -> list[dict]:
    renamed = SAME_LENGTH_AUDIO.get(kind, {})
    return [{**r, "media": [renamed.get(m, m) for m in r["media"]]} if "media" in r else r for r in RECORDS]


def dataset_of(cache, model_dir, tmp_path, kind):
    checkpoint, layout, samples = built_samples(records_for(kind), cache, model_dir, tmp_path)
    return checkpoint, checkpoint.tokenizer(), layout, samples


def processor_batch(model_dir, cache, kind, names, answered: bool = True, records=None, contents=None,
                    folder=None):
    """The checkpoint's processor on the conversations `names` (of `records`, their user turns as
    `contents`; default this module's), padded as one batch, with every video plainly decoded at the
    frames the store sampled, every image read by transformers' `load_image`, and for Omni every
    audio slot (a video's own track, an audio file) plainly decoded whole, a window's cut to it, in
    placeholder order. The media files are under `folder` (default: videos/ beside the store). Not
    `answered`: the prompts up to the assistant's turn, opened (as one calls `generate`)."""
    records, contents = records or records_for(kind), contents or MESSAGES
    processor = AutoProcessor.from_pretrained(model_dir)
    spec = load_model_spec(model_dir)
    media = [medium for name in names for medium in _record(records, name).get("media", [name])]
    rows = [cache.row(medium) for medium in media]
    videos = [row for row in rows if row.kind == "video"]
    images = [row for row in rows if row.kind == "image"]
    folder = folder or cache.store.root.parent / "videos"
    answer = [{"role": "assistant", "content": [{"type": "text", "text": _answer(name, records)}]} for name in names]
    texts = [processor.apply_chat_template([{"role": "user", "content": contents[name]}] + answer[i:i + 1] * answered,
                                           tokenize=False, add_generation_prompt=not answered)
             for i, name in enumerate(names)]
    # right-padded, as qprep's batches (and the training stacks') are: the Omni processors pad left by default
    kwargs = dict(text=texts, padding=True, padding_side="right", return_tensors="pt")
    if images:
        kwargs["images"] = [load_image(str(folder / row.path)) for row in images]
    if videos:
        frames = [np.stack([plain_decode(folder / row.path)[0][i] for i in row.frame_indices]) for row in videos]
        if kind in QWEN3:  # the true metadata: the time stamps come from it
            metadata = [true_metadata(folder / row.path, row.frame_indices) for row in videos]
        else:
            metadata = [VideoMetadata(total_num_frames=len(f), fps=row.sample_fps, frames_indices=list(range(len(f))))
                        for f, row in zip(frames, videos)]
        # the frame size for videos alone (images keep their processor's own bounds)
        kwargs.update(videos=frames, video_metadata=metadata, do_sample_frames=False,
                      videos_kwargs={"size": {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}})
    omni = kind in OMNI and bool(videos) and all(row.audio_length for row in videos)
    heard = [row for row in rows if row.kind == "audio" or (omni and row.kind == "video")]
    if heard:
        kwargs["audio"] = [plain_audio_decode(folder / row.path, row.window_start, row.window_end) for row in heard]
    if omni:  # each audio slot's video, or None for an audio file
        video_index = iter(range(len(videos)))
        kwargs.update(load_audio_from_video=True,
                      audio_from_video_indices=[None if row.kind == "audio" else next(video_index) for row in heard])
    if type(processor).__name__ in ("Qwen2_5OmniProcessor", "Qwen3OmniMoeProcessor") and videos:
        # it takes one fps for all videos of a call (2.0 when none is given), not their metadata's
        assert len({row.sample_fps for row in videos}) == 1
        kwargs["fps"] = videos[0].sample_fps
    inputs = processor(**kwargs)
    if videos:
        assert inputs["video_grid_thw"].tolist() == [row.grid_thw for row in videos]
    if images:
        assert inputs["image_grid_thw"].tolist() == [row.grid_thw for row in images]
    model_kwargs = {"use_audio_in_video": True} if omni else {}
    if kind in QWEN3:
        model_kwargs["mm_token_type_ids"] = inputs.pop("mm_token_type_ids")
    if not answered:
        return inputs, model_kwargs, None
    labels = torch.cat([_row_labels(inputs["input_ids"][i:i + 1], inputs["attention_mask"][i:i + 1], processor)
                        for i in range(len(names))])
    return inputs, model_kwargs, labels


def _record(records, name) -> dict:
    return next(r for r in records if r.get("id") == name)


def _answer(name, records=RECORDS) -> str:
    return _record(records, name)["conversations"][1]["value"]


def _row_labels(ids, mask, processor):
    tokenizer = processor.tokenizer
    tokenizer.chat_template = tokenizer.chat_template or processor.chat_template
    length = int(mask.sum())
    labels = torch.full_like(ids, IGNORE)
    labels[:, :length] = answer_labels(ids[:, :length], tokenizer)
    return labels


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_mixing_two_videos_a_repeated_video_and_text_only_gives_the_full_models_logits_and_loss(
        request, kind, tmp_path):
    model_dir, cache = store_of(request, kind)
    checkpoint, tokenizer, layout, samples = dataset_of(cache, model_dir, tmp_path, kind)
    language_model = LanguageModel(checkpoint, dtype="float32").eval()
    full = full_model(model_dir)
    for names in (["pair", "text", "b"], ["again"], ["text"]):
        batch = collate([samples[name] for name in names], cache, layout)
        assert (batch.deepstack is None) == (kind not in DEEPSTACK or names == ["text"])
        reference = processor_batch(model_dir, cache, kind, names)
        assert_batch_as_the_full_model(language_model, full, batch, reference, names)


def assert_batch_as_the_full_model(language_model, full, batch, reference, names):
    """qprep's batch holds the processor's ids, mask and labels, and gives the full model's logits and
    loss on the processor's inputs, bit for bit (`reference`: `processor_batch`'s)."""
    inputs, model_kwargs, labels = reference
    assert torch.equal(batch.input_ids, inputs["input_ids"]), names
    assert torch.equal(batch.attention_mask, inputs["attention_mask"]) and torch.equal(batch.labels, labels)
    with torch.no_grad():
        expected = full(**inputs, labels=labels, **model_kwargs)
        loss, logits = language_model(batch)
    assert torch.equal(logits, expected.logits), names
    assert torch.equal(loss, expected.loss), names


@pytest.mark.parametrize("kind", ["qwen2_5_omni", "qwen3_vl", "qwen3_omni_moe"])
def test_a_packed_row_mixing_them_gives_each_sample_its_logits_alone(request, kind, tmp_path):
    """Tolerance as tests/test_train_packing.py states it: other matmul shapes, float32 rounding."""
    model_dir, cache = store_of(request, kind)
    checkpoint, _, layout, samples = dataset_of(cache, model_dir, tmp_path, kind)
    chosen = [samples[name] for name in ("pair", "text", "again", "b")]
    packed = assert_each_sample_of_a_packed_row_as_alone(checkpoint, cache, layout, chosen)
    assert packed.media_kinds == (("video", "video"), (), ("video", "video"), ("video",))


def assert_each_sample_of_a_packed_row_as_alone(checkpoint, cache, layout, chosen):
    """`chosen` packed in one row (per-sample attention) give each sample its logits alone within
    1e-5 (other matmul shapes: float32 rounding, tests/test_train_packing.py); returns the row."""
    model = LanguageModel(checkpoint).eval()
    per_sample = LanguageModel(checkpoint, packing=True).eval()
    packed = collate_packed(chosen, cache, layout)
    with torch.no_grad():
        _, logits = per_sample(packed)
        start = 0
        for sample in chosen:
            _, alone = model(collate([sample], cache, layout))
            n = len(sample.input_ids)
            gap = float((logits[0, start:start + n] - alone[0]).abs().max())
            assert gap < 1e-5, (sample.id, gap)
            start += n
    return packed


def test_media_marks_and_records_that_cannot_be_used_are_reported(omni_store, qwen3_omni_store, tmp_path):
    from qprep.train.data import messages

    two = messages([{"from": "human", "value": "A <video> then <video>"}, {"from": "gpt", "value": "x"}], media=2)
    assert [c.get("text", "VIDEO") for c in two[0]["content"]] == ["A", "VIDEO", "then", "VIDEO"]
    unmarked = messages([{"from": "human", "value": "which?"}, {"from": "gpt", "value": "x"}], media=2)
    assert [c.get("text", "VIDEO") for c in unmarked[0]["content"]] == ["VIDEO", "VIDEO", "which?"]
    text_only = messages([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], media=0)
    assert text_only[0]["content"] == [{"type": "text", "text": "hi"}]

    model_dir, cache = qwen3_omni_store
    records = [
        {"id": "too-many-marks", "media": ["a"], "conversations": [
            {"from": "human", "value": "<video> <video>"}, {"from": "gpt", "value": "x"}]},
        {"id": "missing", "media": ["a", "nowhere"], "conversations": [
            {"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]},
        {"id": "sound-and-silence", "media": ["a", "c"], "conversations": [  # c has no audio track
            {"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]},
        {"media": ["a"], "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    checkpoint = open_checkpoint(model_dir)
    tokenizer = checkpoint.tokenizer()
    dataset = build_dataset(load_records(tmp_path / "data.json"), cache, tokenizer,
                            checkpoint.family.prompt_layout(checkpoint, tokenizer))
    assert [s.id for s in dataset.samples] == ["#3"]
    reasons = {ids[0]: reason for reason, ids in dataset.skipped.items()}
    assert "2 <video>/<image>/<audio> marks for 1 media" in reasons["too-many-marks"]
    assert reasons["missing"] == "video not in the cache"
    assert "use_audio_in_video" in reasons["sound-and-silence"]


@pytest.mark.parametrize("kind", KINDS)
def test_lora_gradients_of_a_mixed_batch_equal_the_full_models_with_the_same_adapter(request, kind, tmp_path):
    model_dir, cache = store_of(request, kind)
    checkpoint, _, layout, samples = dataset_of(cache, model_dir, tmp_path, kind)
    names = ["pair", "text", "b"]
    batch = collate([samples[name] for name in names], cache, layout)
    inputs, model_kwargs, labels = processor_batch(model_dir, cache, kind, names)
    mine, reference = lora_gradients_both_ways(LanguageModel(checkpoint, dtype="float32").eval(), full_model(model_dir),
                                               batch, dict(inputs, labels=labels, **model_kwargs))
    for name, gradient in mine.items():
        assert torch.equal(gradient, reference[name]), name


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_omni_moe"])
def test_infer_answers_a_prompt_over_two_videos_as_generate_does_on_the_raw_videos(request, kind, tmp_path):
    """`qprep infer`'s prompt over two cached videos: its ids are the processor's, its greedy tokens and
    logits `generate`'s (the first step within the rounding bound of the last-row `lm_head`: the full
    model multiplies the whole prompt, tests/test_infer.py)."""
    from test_infer import assert_same_steps, generated, ours_with_logits

    from qprep.train.infer import Generator, choose_requests

    model_dir, cache = store_of(request, kind)
    checkpoint, tokenizer, layout, _ = dataset_of(cache, model_dir, tmp_path, kind)
    asked, skipped = choose_requests(cache, data=tmp_path / "data.json", layout=layout)
    assert not skipped
    pair = next(r for r in asked if r.id == "pair")
    assert pair.media == tuple(records_for(kind)[0]["media"])
    generator = Generator(checkpoint, tokenizer, cache)
    inputs, model_kwargs, _ = processor_batch(model_dir, cache, kind, ["pair"], answered=False)
    assert generator.prompt_ids(pair) == inputs["input_ids"][0].tolist()
    ours = ours_with_logits(generator, pair)
    theirs = generated(full_model(model_dir), inputs, generator.stop, **model_kwargs)
    assert_same_steps(ours, theirs, "pair", whole_prompt_head=True)


@pytest.mark.parametrize("packing", [False, True])
def test_qprep_train_runs_on_a_file_mixing_several_videos_text_only_and_audio_in_one_run(
        qwen3_omni_store, packing, tmp_path):
    """`train` end to end on the mixed records: every sample is trained (audio and text-only ones are
    batched or packed apart where the model needs it, never left out), and the loss is finite."""
    from qprep.schemas.training import LoraSettings, TrainSettings
    from qprep.train.loop import train

    model_dir, cache = qwen3_omni_store
    (tmp_path / "data.json").write_text(json.dumps(records_for("qwen3_omni_moe")))
    said: list[str] = []
    settings = TrainSettings(epochs=1, batch_size=1 if packing else 2, grad_accum=1, workers=0, packing=packing,
                             max_length=4096 if packing else None, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    train(cache.store.root, tmp_path / "data.json", model_dir, tmp_path / "run", settings, progress=False,
          echo=said.append)
    assert any(line.startswith("4 samples") for line in said), said
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses and all(np.isfinite(losses))
