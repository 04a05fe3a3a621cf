"""The cache path's loss and logits equal transformers' full model on the raw video, exactly in fp32.

Reference: each family's full model (`Qwen2_5OmniForConditionalGeneration(...).thinker`,
`Qwen2_5_VLForConditionalGeneration`, `Qwen2VLForConditionalGeneration`, ...: tests/reference.py's
`FULL_MODELS`) loaded with `from_pretrained`, fed by the checkpoint's own `AutoProcessor` on plainly decoded
frames and audio (tests/reference.py). Cache path: qprep's tower outputs, the layout of
the family's `video_block`, and the language model alone (`qprep.train.model`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor
from transformers.video_utils import VideoMetadata

import qprep
from qprep.models.checkpoint import open_checkpoint
from qprep.models.families import PlaceholderIds, PromptLayout
from qprep.pipeline.towers import AudioInput, Towers, VideoInput
from qprep.schemas.manifest import ManifestRow
from qprep.schemas.settings import load_model_spec
from qprep.train.model import Batch, LanguageModel
from reference import full_model, kinds_and_layouts, plain_audio_decode, plain_decode

CLIP = dict(width=160, height=120, fps=25, seconds=3, events=((0.5, 1.0),))
CONVERSATION = [
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens in the video"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "You are a helpful video."}]},
]


def assistant_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Loss on the assistant's answer only (everything after the last `<|im_start|>assistant\\n`)."""
    labels = torch.full_like(input_ids, -100)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    positions = (input_ids[0] == start).nonzero().flatten().tolist()
    begin = positions[-1] + 3  # <|im_start|> assistant \n
    labels[0, begin:] = input_ids[0, begin:]
    return labels


def expand(input_ids: list[int], block: list[int], ids: PlaceholderIds) -> list[int]:
    at = input_ids.index(ids.video)
    assert input_ids[at - 1] == ids.vision_start and input_ids[at + 1] == ids.vision_end
    return input_ids[: at - 1] + block + input_ids[at + 2:]


def true_metadata(path, frame_indices) -> VideoMetadata:
    """What transformers' own video loading reports for these frames: the stream's frame count and
    average rate, and the indices sampled."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = sum(1 for _ in container.decode(stream))
        fps = float(stream.average_rate)
    return VideoMetadata(total_num_frames=total, fps=fps, frames_indices=list(frame_indices))


def processor_inputs(model_dir, path, conversation, frame_indices, sample_fps, omni, metadata=None):
    """transformers' own processor on plainly decoded frames (and the whole audio track). `metadata`
    (default: the sampled frames at their sampling rate, which is what the Qwen2.5 processors read)."""
    processor = AutoProcessor.from_pretrained(model_dir)
    spec = load_model_spec(model_dir)
    frames, _ = plain_decode(path)
    chosen = np.stack([frames[i] for i in frame_indices])
    text = processor.apply_chat_template(conversation, tokenize=False)
    if metadata is None:
        metadata = VideoMetadata(total_num_frames=len(chosen), fps=sample_fps, frames_indices=list(range(len(chosen))))
    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    kwargs = dict(text=[text], videos=[chosen], video_metadata=[metadata], do_sample_frames=False, size=size,
                  return_tensors="pt")
    if omni:
        kwargs.update(audio=[plain_audio_decode(path)], load_audio_from_video=True, audio_from_video_indices=[0])
    if type(processor).__name__ == "Qwen3OmniMoeProcessor":
        kwargs["fps"] = sample_fps  # its only source of the video's time (video_second_per_grid)
    return processor, processor(**kwargs)


QWEN3 = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # time as text, positions per frame
QWEN3_OMNI = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")  # audio and video merged token by token in time
OMNI = ("qwen2_5_omni", *QWEN3_OMNI)
DEEPSTACK = ("qwen3_vl", "qwen3_vl_moe", *QWEN3_OMNI)
NO_TIME = ("qwen2_vl",)  # positions carry the temporal patch index alone, no second_per_grid


def placeholder_ids(tokenizer, kind) -> PlaceholderIds:
    """The placeholders as the model cards name them (not through qprep's family)."""
    get = tokenizer.convert_tokens_to_ids
    if kind == "qwen2_5_omni":
        return PlaceholderIds(get("<|vision_bos|>"), get("<|vision_eos|>"), get("<|VIDEO|>"), get("<|AUDIO|>"),
                              get("<|audio_bos|>"), get("<|audio_eos|>"))
    if kind in QWEN3_OMNI:
        return PlaceholderIds(get("<|vision_start|>"), get("<|vision_end|>"), get("<|video_pad|>"), get("<|audio_pad|>"),
                              get("<|audio_start|>"), get("<|audio_end|>"))
    return PlaceholderIds(get("<|vision_start|>"), get("<|vision_end|>"), get("<|video_pad|>"))


def _both_paths(tiny_model, videos, kind, layout, dtype: str = "float32", device: str = "cpu"):
    """The full model with its processor's inputs, and qprep's language model with its cached batch
    (`dtype`, `device`: both sides' weights and towers; bench/bf16.py runs them in bfloat16 on a GPU)."""
    model_dir = tiny_model(kind, layout)
    omni, qwen3 = kind in OMNI, kind in QWEN3
    path = videos("train-clip.mp4", **CLIP)
    spec = load_model_spec(model_dir)
    prepared = qprep.preprocess_video(path, model_dir, fps=2, audio=omni)
    towers = Towers(open_checkpoint(model_dir), spec, dtype=dtype, device=device)
    features = towers.video_features([VideoInput(prepared.patches, tuple(prepared.video_grid_thw[0].tolist()))])[0]

    # the reference: the processor on the raw frames (and audio), then the full model
    metadata = true_metadata(path, prepared.metadata.frame_indices) if qwen3 else None
    processor, inputs = processor_inputs(model_dir, path, CONVERSATION, prepared.metadata.frame_indices,
                                         prepared.metadata.sample_fps, omni, metadata)
    assert inputs["video_grid_thw"].tolist() == prepared.video_grid_thw.tolist()
    labels = assistant_labels(inputs["input_ids"], processor.tokenizer)
    full = full_model(model_dir, getattr(torch, dtype)).to(device)
    if omni:
        assert float(inputs["video_second_per_grid"][0]) == prepared.second_per_grid
    elif kind in NO_TIME:
        assert "second_per_grid_ts" not in inputs
    elif not qwen3:
        assert float(inputs["second_per_grid_ts"][0]) == prepared.second_per_grid
    model_kwargs = {"use_audio_in_video": True} if omni else {}  # as the Omni model card calls it
    if qwen3:
        model_kwargs["mm_token_type_ids"] = inputs.pop("mm_token_type_ids")

    # the cache path: no tower, no video
    tokenizer = processor.tokenizer
    ids = placeholder_ids(tokenizer, kind)
    audio_tokens = None
    if omni:
        audio_tokens = towers.encode_audio([AudioInput(prepared.mel_frames(),
                                                       tuple(prepared.feature_attention_mask.sum(-1).tolist()))])[0]
    family = open_checkpoint(model_dir).family
    layout = PromptLayout(family=family, ids=ids, config=full.config, merge_size=2, pad_id=0, turn_end_id=0,
                          tokenizer=tokenizer)
    text_ids = tokenizer(processor.apply_chat_template(CONVERSATION, tokenize=False))["input_ids"]
    row = ManifestRow(id="v", path="v.mp4", grid_thw=prepared.video_grid_thw[0].tolist(),
                      second_per_grid=prepared.second_per_grid, frame_times=list(prepared.metadata.frame_times),
                      audio_length=0 if audio_tokens is None else audio_tokens.shape[0])
    block = layout.video_block(row, start=text_ids.index(ids.vision_start))
    input_ids = torch.tensor([expand(text_ids, block, ids)])
    assert torch.equal(input_ids, inputs["input_ids"])
    assert (features.deepstack is not None) == (kind in DEEPSTACK)
    language_model = LanguageModel(open_checkpoint(model_dir), dtype=dtype, device=device).eval()
    batch = Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                  video_tokens=features.tokens, video_grid_thw=prepared.video_grid_thw,
                  second_per_grid=torch.tensor([prepared.second_per_grid], dtype=torch.float64),
                  audio_tokens=audio_tokens,
                  mel_lengths=torch.tensor([prepared.mel_length]) if audio_tokens is not None else None,
                  audio_in_video=audio_tokens is not None, deepstack=features.deepstack).to(device)
    return full, inputs.to(device), model_kwargs, labels.to(device), language_model, batch


CASES = kinds_and_layouts(["qwen2_5_omni", "qwen2_5_vl", "qwen2_vl", *QWEN3]) + kinds_and_layouts(["qwen3_omni_moe"]) + [
    ("qwen3_omni_moe_thinker", "save_pretrained")]


@pytest.mark.parametrize(("kind", "layout"), CASES)
def test_cache_path_loss_and_logits_equal_the_full_model_on_raw_video(tiny_model, videos, kind, layout):
    full, inputs, model_kwargs, labels, language_model, batch = _both_paths(tiny_model, videos, kind, layout)
    with torch.no_grad():
        expected = full(**inputs, labels=labels, **model_kwargs)
        loss, logits = language_model(batch)
    assert torch.equal(logits, expected.logits)
    assert torch.equal(loss, expected.loss)


def _gradients_both_ways(tiny_model, videos, kind, layout, targets=None):
    full, inputs, model_kwargs, labels, language_model, batch = _both_paths(tiny_model, videos, kind, layout)
    mine, reference = lora_gradients_both_ways(language_model, full, batch, dict(inputs, labels=labels, **model_kwargs),
                                               targets)
    return language_model, mine, reference


def lora_gradients_both_ways(language_model, full, batch, full_inputs: dict, targets=None):
    """LoRA gradients of the same adapter on qprep's language model (cached tokens, `batch`) and on
    transformers' full model (raw media through its processor, `full_inputs` with the labels), peft's
    own config for the latter: (qprep's, the full model's), by parameter name."""
    ours, theirs = same_adapter_both_ways(language_model, full, targets)
    ours(batch)[0].backward()
    # Without a generation cache, as the training stacks call it (LLaMA-Factory and ms-swift set
    # use_cache=False to train). With one, Qwen3.5's Gated DeltaNet layers also keep their states and
    # the gradient of in_proj_qkv comes out an ulp apart (measured: 2e-10 of 3e-2).
    theirs(**full_inputs, use_cache=False).loss.backward()
    return lora_gradients(ours, theirs)


def same_adapter_both_ways(language_model, full, targets=None):
    """(qprep's LoRA model, the full model's peft model) with the same adapter: qprep's `apply_lora`
    on `language_model`, its B matrices made non-zero (so that A gets gradients too), and peft's own
    config on `full`, loaded with qprep's adapter weights."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from qprep.train.lora import LoraSettings, apply_lora

    settings = LoraSettings(r=4, alpha=8, dropout=0.0, targets=targets)
    ours = apply_lora(language_model, settings)
    generator = torch.Generator().manual_seed(0)
    for name, parameter in ours.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.02
    modules, parameters = settings.split_targets(language_model.family.lora_targets)
    theirs = get_peft_model(full, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=settings.target_regex(language_model.family.lora_targets),
                                             target_parameters=list(parameters) or None,
                                             exclude_modules=settings.tower_regex()))
    set_peft_model_state_dict(theirs, get_peft_model_state_dict(ours))
    return ours, theirs


def lora_gradients(ours, theirs):
    """The trainable parameters' gradients of both models, by name: (qprep's, the full model's)."""
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    reference = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == reference.keys() and mine
    return mine, reference


@pytest.mark.parametrize(("kind", "layout"), CASES)
def test_lora_gradients_equal_the_full_model_with_the_same_adapter(tiny_model, videos, kind, layout):
    """The same adapter on transformers' full model (raw video through its processor) and on qprep's
    language model (cached tokens): the LoRA gradients are the same, exactly in fp32."""
    language_model, mine, reference = _gradients_both_ways(tiny_model, videos, kind, layout)
    layers = language_model.config.get_text_config().num_hidden_layers
    adapted = {name.split(".layers.")[1].split(".")[0] for name in mine}
    assert adapted == {str(i) for i in range(layers)}  # every layer has adapters (both kinds, for Qwen3.5)
    for name, gradient in mine.items():
        assert torch.equal(gradient, reference[name]), name


@pytest.mark.parametrize(("kind", "layout"), kinds_and_layouts(["qwen3_vl_moe", "qwen3_5_moe", "qwen3_omni_moe"]))
def test_moe_experts_adapted_on_request_get_the_full_models_gradients(tiny_model, videos, kind, layout):
    """`experts` in the targets: peft's `target_parameters` on the fused 3-D expert weights."""
    _, mine, reference = _gradients_both_ways(tiny_model, videos, kind, layout,
                                              targets=("q_proj", "k_proj", "v_proj", "o_proj", "experts"))
    assert any("experts" in name for name in mine)
    for name, gradient in mine.items():
        assert gradient.abs().sum() > 0, name
        assert torch.equal(gradient, reference[name]), name


@pytest.mark.parametrize("kind", ["qwen2_5_omni", *QWEN3, "qwen3_omni_moe"])
def test_training_batches_read_from_an_extracted_store_give_the_full_models_loss_on_the_raw_videos(
        omni_store, qwen3_store, qwen3_omni_store, kind, tmp_path):
    """End to end: videos extracted into a store, a LongVALE-style data file, `qprep train`'s
    own dataset, loader and collate; against the full model on each raw video through its processor
    (Qwen3-VL: given the true video metadata, the time stamps in the prompt and the deepstack levels)."""
    import json

    from qprep.train.data import build_dataset, load_records
    from qprep.train.loader import batch_stream, plan

    stores = {"qwen2_5_omni": omni_store, "qwen3_omni_moe": qwen3_omni_store}
    model_dir, cache = stores[kind] if kind in stores else qwen3_store(kind)
    questions = {"a": "<video>\nWhat happens, and when?", "b": "Describe it. <video>"}
    if kind == "qwen3_omni_moe":
        questions["c"] = "<video> And this one, which has no sound?"  # its batch holds no audio
    records = [{"id": video_id, "conversations": [{"from": "human", "value": question},
                                                  {"from": "gpt", "value": f"From 0 to 1, event {video_id}."}]}
               for video_id, question in questions.items()]
    (tmp_path / "data.json").write_text(json.dumps(records))
    checkpoint = open_checkpoint(model_dir)
    tokenizer = checkpoint.tokenizer()
    layout = checkpoint.family.prompt_layout(checkpoint, tokenizer)
    dataset = build_dataset(load_records(tmp_path / "data.json"), cache, tokenizer, layout)
    planned = plan(dataset.samples, seed=0, batch_size=1, epochs=1)
    batches = {dataset.samples[p.samples[0]].id: batch
               for p, batch in batch_stream(planned, dataset.samples, cache, layout, workers=1)}
    language_model = LanguageModel(open_checkpoint(model_dir), dtype="float32").eval()
    full = full_model(model_dir)
    videos = cache.store.root.parent / "videos"
    for video_id, question in questions.items():
        row = cache.row(video_id)
        before, _, after = question.partition("<video>")
        conversation = [
            {"role": "user", "content": [c for c in ({"type": "text", "text": before.strip()}, {"type": "video"},
                                                     {"type": "text", "text": after.strip()}) if c.get("text", 1)]},
            {"role": "assistant", "content": [{"type": "text", "text": f"From 0 to 1, event {video_id}."}]}]
        path = videos / row.path
        omni = kind in OMNI and bool(row.audio_length)
        metadata = true_metadata(path, row.frame_indices) if kind in QWEN3 else None
        _, inputs = processor_inputs(model_dir, path, conversation, row.frame_indices, row.sample_fps,
                                     omni=omni, metadata=metadata)
        labels = answer_labels(inputs["input_ids"], tokenizer)
        batch = batches[video_id]
        assert torch.equal(batch.input_ids, inputs["input_ids"]) and torch.equal(batch.labels, labels)
        assert (batch.deepstack is None) == (kind not in DEEPSTACK)
        assert (batch.audio_tokens is None) == (not omni)
        with torch.no_grad():
            expected = full(**inputs, labels=labels, **({"use_audio_in_video": True} if omni else {}))
            loss, logits = language_model(batch)
        assert torch.equal(logits, expected.logits) and torch.equal(loss, expected.loss), video_id


def answer_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """What the assistant says after the chat template's generation prompt (`<|im_start|>assistant\n`,
    and Qwen3.5's `<think>\n`), up to and including its closing <|im_end|>; -100 elsewhere."""
    labels = torch.full_like(input_ids, -100)
    ids = input_ids[0].tolist()
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    opened = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(opened, add_special_tokens=False)["input_ids"]
    prompt = prompt[len(prompt) - prompt[::-1].index(start) - 1:]  # from the last <|im_start|>
    at = len(ids) - ids[::-1].index(start) - 1
    assert ids[at:at + len(prompt)] == prompt
    begin = at + len(prompt)
    end = ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), begin) + 1
    labels[0, begin:end] = input_ids[0, begin:end]
    return labels


def test_the_deepstack_levels_matter(tiny_model, videos):
    """Without them the cache path is not the model: the logits move (so the parity above tests them)."""
    import dataclasses

    full, inputs, model_kwargs, labels, language_model, batch = _both_paths(tiny_model, videos, "qwen3_vl",
                                                                            "save_pretrained")
    with torch.no_grad():
        _, logits = language_model(batch)
        _, without = language_model(dataclasses.replace(batch, deepstack=None))
    moved = float((logits - without).abs().max())
    print(f"dropping the deepstack levels moves the logits by up to {moved:.3f}")
    assert moved > 0.05


@pytest.mark.parametrize("kind", ["qwen2_5_omni", "qwen3_vl", "qwen3_omni_moe"])
def test_the_validation_loss_is_the_full_models_loss_on_the_raw_video_with_the_trained_adapter(
        omni_store, qwen3_store, qwen3_omni_store, kind, tmp_path):
    """`train --eval-data` with one held-out record: the loss it reports at the run's end equals the
    full model's on that record's raw video through its processor, with the final adapter (peft)."""
    import json

    from peft import PeftModel

    from qprep.schemas.training import LoraSettings, TrainSettings
    from qprep.train.loop import train

    stores = {"qwen2_5_omni": omni_store, "qwen3_omni_moe": qwen3_omni_store}
    model_dir, cache = stores[kind] if kind in stores else qwen3_store(kind)
    answer = "From 0 to 1, event a."
    records = [{"id": video_id, "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                                  {"from": "gpt", "value": f"From 0 to 1, event {video_id}."}]}
               for video_id in ("a", "b")]
    (tmp_path / "train.json").write_text(json.dumps(records))
    (tmp_path / "val.json").write_text(json.dumps(records[:1]))
    settings = TrainSettings(epochs=2, lr=2e-2, grad_accum=1, workers=0, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    train(cache.store.root, tmp_path / "train.json", model_dir, tmp_path / "run", settings,
          eval_data=tmp_path / "val.json", progress=False, echo=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validations = [row for row in rows if "val_loss" in row]
    assert [row["epoch"] for row in validations] == [0, 1]  # at each epoch's end

    row = cache.row("a")
    path = cache.store.root.parent / "videos" / row.path
    omni = kind in OMNI and bool(row.audio_length)
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    metadata = true_metadata(path, row.frame_indices) if kind in QWEN3 else None
    processor, inputs = processor_inputs(model_dir, path, conversation, row.frame_indices, row.sample_fps,
                                         omni=omni, metadata=metadata)
    tokenizer = processor.tokenizer
    tokenizer.chat_template = tokenizer.chat_template or processor.chat_template  # Qwen3-Omni keeps it beside the processor
    labels = answer_labels(inputs["input_ids"], tokenizer)
    full = PeftModel.from_pretrained(full_model(model_dir), str(tmp_path / "run" / "adapter")).eval()
    with torch.no_grad():
        expected = full(**inputs, labels=labels, **({"use_audio_in_video": True} if omni else {})).loss
    assert validations[-1]["val_loss"] == float(expected)
    assert validations[0]["val_loss"] != validations[-1]["val_loss"]  # the adapter moved between them
