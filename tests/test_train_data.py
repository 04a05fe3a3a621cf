"""Training samples from LongVALE-style records and a store: placement, labels, what is left out,
and a padded batch that gives each sample the loss it has alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from qprep.models.checkpoint import open_checkpoint
from qprep.schemas.layout import PlaceholderIds
from qprep.train.data import IGNORE, build_dataset, collate, load_records, messages, tokenize
from qprep.train.model import LanguageModel


def omni_ids(tokenizer) -> PlaceholderIds:
    get = tokenizer.convert_tokens_to_ids
    return PlaceholderIds(get("<|vision_bos|>"), get("<|vision_eos|>"), get("<|VIDEO|>"), get("<|AUDIO|>"),
                          get("<|audio_bos|>"), get("<|audio_eos|>"))


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
    ids, labels = tokenize(conversation, tokenizer)
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
    dataset = build_dataset(load_records(data), cache, tokenizer, omni_ids(tokenizer), merge_size=2, audio=True)
    assert [s.id for s in dataset.samples] == ["a", "b"]
    assert dataset.skipped == {"video failed extraction": ["broken"], "video not in the cache": ["nowhere"]}
    short = build_dataset(load_records(data), cache, tokenizer, omni_ids(tokenizer), merge_size=2, audio=True,
                          max_length=len(dataset.samples[0].input_ids))
    assert [s.id for s in short.samples] == ["a"]
    assert short.skipped[f"longer than --max-length {len(dataset.samples[0].input_ids)}"] == ["b"]

    # a padded batch of both gives each sample its own loss
    model = LanguageModel(open_checkpoint(model_dir)).eval()
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        _, both = model(collate(dataset.samples, cache, pad_id, audio=True))
        for row, sample in enumerate(dataset.samples):
            _, alone = model(collate([sample], cache, pad_id, audio=True))
            length = len(sample.input_ids)
            torch.testing.assert_close(both[row, :length], alone[0], rtol=1e-5, atol=1e-5)
