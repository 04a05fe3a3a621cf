"""Images in samples: an image and a video in one sample, two images, an image alone and a text-only
sample, in one padded batch and in one packed row, from a store `extract --media` filled.

Reference: transformers' full model on the processor's own batch (images read by `load_image`,
videos plainly decoded; tests/test_train_media.py's `processor_batch`). Same shapes on both sides,
so the logits, the loss and every LoRA gradient are compared bit for bit.
"""

from __future__ import annotations


import pytest
import torch

from qprep.train.data import collate
from qprep.train.model import LanguageModel
from conftest import built_samples
from reference import full_model
from test_train_media import (
    DEEPSTACK,
    assert_batch_as_the_full_model,
    assert_each_sample_of_a_packed_row_as_alone,
    processor_batch,
)
from test_train_parity import lora_gradients_both_ways

FAMILIES = ["qwen2_5_omni", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "qwen3_omni_moe"]

RECORDS = [
    {"id": "image-and-video", "media": ["photos/cat", "a"], "conversations": [
        {"from": "human", "value": "Is <image> a frame of <video>?"}, {"from": "gpt", "value": "No, it is a cat."}]},
    {"id": "two-images", "media": ["photos/cat", "photos/turned"], "conversations": [
        {"from": "human", "value": "Compare <image> with <image>."},
        {"from": "gpt", "value": "The second is turned."}]},
    {"id": "text", "media": [], "conversations": [
        {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]},
    {"id": "image", "media": ["photos/turned"], "conversations": [  # unmarked: at the start of the turn
        {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A turned photo."}]},
]
CONTENTS = {
    "image-and-video": [{"type": "text", "text": "Is"}, {"type": "image"}, {"type": "text", "text": "a frame of"},
                        {"type": "video"}, {"type": "text", "text": "?"}],
    "two-images": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"},
                   {"type": "image"}, {"type": "text", "text": "."}],
    "text": [{"type": "text", "text": "What is two plus two?"}],
    "image": [{"type": "image"}, {"type": "text", "text": "Describe it."}],
}


def samples_of(media_store, kind, tmp_path):
    model_dir, cache = media_store(kind)
    return (model_dir, cache, *built_samples(RECORDS, cache, model_dir, tmp_path))


def reference_batch(model_dir, cache, kind, names, answered=True):
    return processor_batch(model_dir, cache, kind, names, answered, records=RECORDS, contents=CONTENTS)


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_batch_mixing_images_videos_and_text_gives_the_full_models_logits_and_loss(media_store, kind, tmp_path):
    model_dir, cache, checkpoint, layout, samples = samples_of(media_store, kind, tmp_path)
    language_model = LanguageModel(checkpoint, dtype="float32").eval()
    full = full_model(model_dir)
    for names in (["image-and-video", "text", "two-images"], ["image"]):
        batch = collate([samples[name] for name in names], cache, layout)
        assert (batch.deepstack is None) == (kind not in DEEPSTACK)
        assert_batch_as_the_full_model(language_model, full, batch, reference_batch(model_dir, cache, kind, names),
                                       names)


@pytest.mark.parametrize("kind", FAMILIES)
def test_lora_gradients_of_a_batch_with_images_equal_the_full_models(media_store, kind, tmp_path):
    model_dir, cache, checkpoint, layout, samples = samples_of(media_store, kind, tmp_path)
    names = ["image-and-video", "two-images", "text"]
    batch = collate([samples[name] for name in names], cache, layout)
    inputs, model_kwargs, labels = reference_batch(model_dir, cache, kind, names)
    mine, reference = lora_gradients_both_ways(LanguageModel(checkpoint, dtype="float32").eval(), full_model(model_dir),
                                               batch, dict(inputs, labels=labels, **model_kwargs))
    for name, gradient in mine.items():
        assert torch.equal(gradient, reference[name]), name


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl", "qwen3_omni_moe"])
def test_a_packed_row_with_images_gives_each_sample_its_logits_alone(media_store, kind, tmp_path):
    """Tolerance as tests/test_train_packing.py states it: other matmul shapes, float32 rounding."""
    model_dir, cache, checkpoint, layout, samples = samples_of(media_store, kind, tmp_path)
    chosen = [samples[name] for name in ("two-images", "text", "image-and-video", "image")]
    packed = assert_each_sample_of_a_packed_row_as_alone(checkpoint, cache, layout, chosen)
    assert packed.media_kinds == (("image", "image"), (), ("image", "video"), ("image",))


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_infer_answers_about_an_image_and_a_video_as_generate_does(media_store, kind, tmp_path):
    from test_infer import assert_same_steps, generated, ours_with_logits

    from qprep.train.infer import Generator, choose_requests

    model_dir, cache, checkpoint, layout, _ = samples_of(media_store, kind, tmp_path)
    asked, skipped = choose_requests(cache, data=tmp_path / "data.json", layout=layout)
    assert not skipped
    request = next(r for r in asked if r.id == "image-and-video")
    generator = Generator(checkpoint, checkpoint.tokenizer(), cache)
    inputs, model_kwargs, _ = reference_batch(model_dir, cache, kind, ["image-and-video"], answered=False)
    assert generator.prompt_ids(request) == inputs["input_ids"][0].tolist()
    assert_same_steps(ours_with_logits(generator, request),
                      generated(full_model(model_dir), inputs, generator.stop, **model_kwargs), request.id,
                      whole_prompt_head=True)
