"""One `--packing` step over every kind of sample, against the full model on each sample alone.

The samples: an image and a video, two videos, text only, a window of a video, and for Omni a video
with its own sound and an audio file; one store `extract --data` filled from the records. qprep's
side is `qprep train --packing`'s: the rows `first_fit_packs` makes of them (Omni: the samples whose
videos are heard in one row, the text-only one in a row of its own kind), collated by
`collate_packed`, each row's loss as `SupervisedObjective` takes it (token-weighted: the step's
summed cross-entropy over its label tokens) and backward through the same LoRA adapter.

Reference: transformers' full model with peft's adapter on the processor's batch of each sample
alone (tests/test_train_media.py's `processor_batch`: raw media plainly decoded), its loss summed
as the Trainer sums an accumulated step (`num_items_in_batch`: the step's label tokens).

Tolerance. A packed row runs the language model's matmuls on other shapes than each sample alone
(attention, per sample, is the very call each sample gets alone: tests/test_train_packing.py), and
the adapter's gradients sum over a whole row's tokens in one matmul where the reference adds one
sample's sum to the next: float32 rounding of sums over up to a row's length (here 415 tokens, and
1,967 and 43). Held: each logit within 1e-5 of the largest logit (tests/test_train_packing.py's
bound), the step's loss within 1e-6 relative, each LoRA gradient within 1e-5 of its largest
magnitude. Higham's bound for a K-term float32 sum, γ_K·Σ|terms| with γ_K = K·u/(1 − K·u) and
u = 2⁻²⁴ (§3.1), is 1.2e-4 at K = 1,967: a worst case that roundings of either sign do not
approach (they grow as √K·u, 2.6e-6 at that K). Measured on this machine (AVX-512): logits 0
(Qwen3-VL) and 2.4e-7 of 0.84 (Qwen2.5-Omni), the loss 1.6e-7 relative, gradients 1.0e-6 of their
largest. Attention leaking across the row's samples moves their logits by 0.6 of 0.84.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import LOCAL_EXTRACT, built_samples, make_image
from qprep import open_cache
from qprep.datasets import DataFile
from qprep.extraction.run import ExtractOptions, extract
from qprep.schemas.settings import VideoSettings
from qprep.schemas.training import TrainSettings
from qprep.synth import VideoSpec, make_video
from qprep.train.data import IGNORE, collate_packed
from qprep.train.loader import first_fit_packs, plan_packed
from qprep.train.model import LanguageModel
from qprep.train.objectives.sft import SupervisedObjective
from reference import full_model
from test_audio_files import tone, write_audio
from test_train_media import processor_batch
from test_train_parity import lora_gradients, same_adapter_both_ways

LOGITS, LOSS, GRADIENTS = 1e-5, 1e-6, 1e-5  # the tolerances the module's docstring derives

RECORDS = [
    {"id": "image-and-video", "media": ["photos/cat", "a"], "conversations": [
        {"from": "human", "value": "Is <image> a frame of <video>?"}, {"from": "gpt", "value": "No, it is a cat."}]},
    {"id": "two-videos", "media": ["a", "b"], "conversations": [
        {"from": "human", "value": "Compare <video> with <video>."},
        {"from": "gpt", "value": "From 0 to 1, the first; from 1 to 2, the second."}]},
    {"id": "text", "media": [], "conversations": [
        {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]},
    {"id": "window", "media": ["a#t=0.5,1.5"], "conversations": [
        {"from": "human", "value": "<video> What happens?"}, {"from": "gpt", "value": "From 0.5 to 1.5, event a."}]},
]
HEARD = {"id": "video-and-audio-file", "media": ["b", "talks/x.wav"], "conversations": [
    {"from": "human", "value": "<video><audio>Is the sound of the clip the same as the recording?"},
    {"from": "gpt", "value": "Both hold a tone."}]}
CONTENTS = {  # the same user turns as the chat template's messages, for the processor
    "image-and-video": [{"type": "text", "text": "Is"}, {"type": "image"}, {"type": "text", "text": "a frame of"},
                        {"type": "video"}, {"type": "text", "text": "?"}],
    "two-videos": [{"type": "text", "text": "Compare"}, {"type": "video"}, {"type": "text", "text": "with"},
                   {"type": "video"}, {"type": "text", "text": "."}],
    "text": [{"type": "text", "text": "What is two plus two?"}],
    "window": [{"type": "video"}, {"type": "text", "text": "What happens?"}],
    "video-and-audio-file": [{"type": "video"}, {"type": "audio"},
                             {"type": "text", "text": "Is the sound of the clip the same as the recording?"}],
}
# kind → the rows `first_fit_packs` makes: one kind per row (with or without heard videos)
ROWS = {"qwen3_vl": [{"image-and-video", "two-videos", "text", "window"}],
        "qwen2_5_omni": [{"image-and-video", "two-videos", "window", "video-and-audio-file"}, {"text"}]}


def mixed_store(kind, tiny_model, root):
    """(model dir, open cache, records) of a float32 store `extract --data` filled from the records of
    `kind` (Omni: with the audio file's), the media in root/videos (where `processor_batch` looks)."""
    records = RECORDS + [HEARD] * (kind == "qwen2_5_omni")
    media = root / "videos"
    make_video(media / "a.mp4", VideoSpec(width=112, height=84, fps=25, seconds=2))
    make_video(media / "b.mp4", VideoSpec(width=96, height=128, fps=25, seconds=2))
    make_image(media / "photos" / "cat.jpg", 200, 150, seed=1, quality=90)
    write_audio(media / "talks" / "x.wav", tone(24000, 16000), 16000, "pcm_s16le")
    (media / "data.json").write_text(json.dumps(records))
    model_dir = str(tiny_model(kind))
    extract(DataFile(media / "data.json"), root / "store.zarr", model_dir, VideoSettings(fps=2), dtype="float32",
            shards=1, options=ExtractOptions(**LOCAL_EXTRACT))
    return model_dir, open_cache(root / "store.zarr"), records


def packed_step(model, samples, cache, layout):
    """One optimizer step of `qprep train --packing` over `samples` (forward and backward of each
    row first_fit_packs makes of them, one row per batch): (the step's loss, each sample's logits in
    its row, as the forward that gave the loss computed them, each row's sample ids and batch)."""
    length = sum(len(s.input_ids) for s in samples)
    objective = SupervisedObjective(TrainSettings(packing=True, max_length=length))
    objective.samples = samples
    planned = plan_packed(first_fit_packs(samples, seed=0, max_length=length), seed=0, packs_per_batch=1, epochs=1)
    shares = objective.start_step(planned, model, world=None, iteration=0)
    seen = []
    hook = model.get_base_model().lm_head.register_forward_hook(lambda _, __, out: seen.append(out.detach()))
    step_loss, logits, rows = 0.0, {}, []
    for position, share in zip(planned, shares):
        row = [samples[i] for i in position.samples]
        batch = collate_packed(row, cache, layout)
        loss = objective.loss(model, batch, position, share, whole=True)  # one part, one process
        loss.backward()
        step_loss += float(loss.detach())
        logits.update({sample.id: piece for sample, piece in zip(row, seen.pop()[0].split(batch.sample_lengths))})
        rows.append(({sample.id for sample in row}, batch))
    hook.remove()
    return step_loss, logits, rows


def full_step(full, model_dir, cache, kind, names, records, packed_ids):
    """The full model's step over the samples `names`, each alone on the processor's batch, its loss
    summed over the step's label tokens as the Trainer accumulates it: (the loss, each sample's logits).
    Each sample's ids must be the packed row's (`packed_ids`)."""
    batches = {name: processor_batch(model_dir, cache, kind, [name], records=records, contents=CONTENTS)
               for name in names}
    label_tokens = sum(int((labels[:, 1:] != IGNORE).sum()) for _, _, labels in batches.values())
    step_loss, logits = 0.0, {}
    for name, (inputs, model_kwargs, labels) in batches.items():
        assert torch.equal(inputs["input_ids"][0], packed_ids[name]), name
        out = full(**inputs, labels=labels, **model_kwargs, num_items_in_batch=label_tokens, use_cache=False)
        out.loss.backward()
        step_loss += float(out.loss.detach())
        logits[name] = out.logits[0].detach()
    return step_loss, logits


@pytest.mark.parametrize("kind", ["qwen3_vl", "qwen2_5_omni"])
def test_a_packed_step_mixing_every_kind_of_sample_gives_the_full_models_logits_loss_and_lora_gradients(
        kind, tiny_model, tmp_path):
    model_dir, cache, records = mixed_store(kind, tiny_model, tmp_path)
    checkpoint, layout, by_id = built_samples(records, cache, model_dir, tmp_path)
    samples = list(by_id.values())
    torch.manual_seed(0)  # peft's initial A matrices: the same adapter each run
    ours, theirs = same_adapter_both_ways(LanguageModel(checkpoint, dtype="float32", packing=True).eval(),
                                          full_model(model_dir))
    packed_loss, packed_logits, rows = packed_step(ours, samples, cache, layout)
    assert sorted((ids for ids, _ in rows), key=len) == sorted(ROWS[kind], key=len)
    media_row = next(batch for ids, batch in rows if "window" in ids)
    if kind == "qwen3_vl":
        assert media_row.deepstack is not None
    else:  # the videos' own tracks (a, a and b, the window, b) and the audio file: 6 heard
        assert media_row.audio_in_video and len(media_row.mel_lengths) == 6
    packed_ids = {s.id: torch.tensor(s.input_ids) for s in samples}
    full_loss, full_logits = full_step(theirs, model_dir, cache, kind, list(by_id), records, packed_ids)

    gaps = {name: float((packed_logits[name] - full_logits[name]).abs().max()) for name in by_id}
    largest = max(float(logits.abs().max()) for logits in full_logits.values())
    assert max(gaps.values()) <= LOGITS * largest, (gaps, largest)
    assert packed_loss == pytest.approx(full_loss, rel=LOSS, abs=0)
    mine, reference = lora_gradients(ours, theirs)
    assert all(float(reference[name].abs().max()) > 0 for name in mine)  # every adapter weight learns from the step
    relative = {name: float((mine[name] - reference[name]).abs().max() / reference[name].abs().max())
                for name in mine}
    assert max(relative.values()) <= GRADIENTS, max(relative.items(), key=lambda item: item[1])
    print(f"{kind}: rows of {[batch.input_ids.shape[1] for _, batch in rows]} tokens; logits "
          f"{max(gaps.values()):.2e} of {largest:.2e}, loss {abs(packed_loss - full_loss):.2e} of {full_loss:.4f}, "
          f"gradients {max(relative.values()):.2e} of their largest")
