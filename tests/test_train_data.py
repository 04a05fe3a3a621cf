"""Training samples from LongVALE-style records and a store: placement, labels, what is left out,
and a padded batch that gives each sample the loss it has alone."""

from __future__ import annotations

import json

import torch
from transformers import AutoTokenizer

from qprep.models.checkpoint import open_checkpoint
from qprep.train.data import IGNORE, build_dataset, collate, load_records, messages, tokenize
from qprep.train.model import LanguageModel


def prompt_layout(model_dir, tokenizer):
    checkpoint = open_checkpoint(model_dir)
    return checkpoint.family.prompt_layout(checkpoint, tokenizer)


def test_the_video_goes_where_marked_or_first():
    marked = messages([{"from": "human", "value": "Look: <video> what happens?"}, {"from": "gpt", "value": "x"}])
    assert [c.get("text", "VIDEO") for c in marked[0]["content"]] == ["Look:", "VIDEO", "what happens?"]
    unmarked = messages([{"from": "human", "value": "what happens?"}, {"from": "gpt", "value": "x"}])
    assert [c.get("text", "VIDEO") for c in unmarked[0]["content"]] == ["VIDEO", "what happens?"]


def test_labels_cover_the_assistant_turns_only(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("qwen2_5_vl"))
    conversation = messages([
        {"from": "human", "value": "<video> what is it"}, {"from": "gpt", "value": "a video"},
        {"from": "human", "value": "and then"}, {"from": "gpt", "value": "the end"},
    ])
    ids, labels = tokenize(conversation, tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])
    assert trained == "a video<|im_end|>the end<|im_end|>"
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))


def test_records_whose_video_is_missing_or_failed_are_reported_not_trained(omni_store, tmp_path):
    model_dir, cache = omni_store
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = tmp_path / "train.json"
    data.write_text(json.dumps([
        {"id": video_id, "conversations": [{"from": "human", "value": "<video> what happens"},
                                           {"from": "gpt", "value": "You are a helpful video."}]}
        for video_id in ("a", "b", "broken", "nowhere")
    ]))
    layout = prompt_layout(model_dir, tokenizer)
    dataset = build_dataset(load_records(data), cache, tokenizer, layout)
    assert [s.id for s in dataset.samples] == ["a", "b"]
    assert dataset.skipped == {"video failed extraction": ["broken"], "video not in the cache": ["nowhere"]}
    short = build_dataset(load_records(data), cache, tokenizer, layout, max_length=len(dataset.samples[0].input_ids))
    assert [s.id for s in short.samples] == ["a"]
    assert short.skipped[f"longer than --max-length {len(dataset.samples[0].input_ids)}"] == ["b"]

    # a padded batch of both gives each sample its own loss
    model = LanguageModel(open_checkpoint(model_dir)).eval()
    with torch.no_grad():
        _, both = model(collate(dataset.samples, cache, layout))
        for row, sample in enumerate(dataset.samples):
            _, alone = model(collate([sample], cache, layout))
            length = len(sample.input_ids)
            torch.testing.assert_close(both[row, :length], alone[0], rtol=1e-5, atol=1e-5)


def test_cutting_to_max_length_cuts_text_only_and_never_a_video_block(omni_store, tmp_path):
    model_dir, cache = omni_store
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    layout = prompt_layout(model_dir, tokenizer)
    ids = layout.ids
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": "b", "conversations": [
        {"from": "human", "value": "<video> what happens"},
        {"from": "gpt", "value": "a long answer " * 20}]}]))
    build = lambda **kw: build_dataset(load_records(data), cache, tokenizer, layout, **kw)
    whole = build().samples[0]
    block_end = whole.input_ids.index(ids.vision_end) + 1
    first_label = next(i for i, label in enumerate(whole.labels) if label != IGNORE)

    cut = build(max_length=first_label + 5, cut=True)
    assert cut.cut == ["b"] and cut.samples[0].input_ids == whole.input_ids[:first_label + 5]
    assert cut.samples[0].labels == whole.labels[:first_label + 5]
    assert "cut 1 to --max-length" in cut.report()
    inside_video = build(max_length=block_end - 1, cut=True)
    assert inside_video.samples == [] and list(inside_video.skipped) == [
        f"its video alone reaches past --max-length {block_end - 1}"]
    no_answer = build(max_length=first_label, cut=True)
    assert no_answer.samples == [] and list(no_answer.skipped) == [f"no answer token within --max-length {first_label}"]
