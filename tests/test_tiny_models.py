"""The tiny checkpoints are complete enough to run transformers' own processor and full model on raw
video (and, for Omni, its sound track) offline: tokenizer, chat template, processor configs and
token ids that agree with the model configs. No Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qprep.models.tiny import make_tiny_model, token_ids
from reference import full_model

# kind -> (processor class, video block of the chat template, video token)
KINDS = {
    "qwen2_5_omni": ("Qwen2_5OmniProcessor", "<|vision_bos|><|VIDEO|><|vision_eos|>", "<|VIDEO|>"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>"),
    "qwen3_vl": ("Qwen3VLProcessor", "<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>"),
}
# kind -> the tiny bounds of (video processor, image processor); Qwen3-VL's video bound is per video
PIXELS = {kind: [(28 * 28 * 4, 28 * 28 * 64)] * 2 for kind in ("qwen2_5_omni", "qwen2_5_vl")} | {
    "qwen3_vl": [(32 * 32 * 4, 32 * 32 * 4 * 64), (32 * 32 * 4, 32 * 32 * 64)]}
# kind -> the system turn its chat template opens with when the conversation has none
DEFAULT_SYSTEM = {kind: "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  for kind in ("qwen2_5_omni", "qwen2_5_vl")} | {"qwen3_vl": ""}
ANSWER = "A test pattern moves."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    made: dict[str, object] = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = make_tiny_model(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return get


def conversation():
    return [
        {"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                     {"type": "text", "text": "What happens in the video?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
    ]


def clip():
    """4 frames of 56×84 RGB and 1.5 s of 16 kHz sound."""
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8),
            (0.1 * rng.standard_normal(24_000)).astype(np.float32))


def processed(processor, kind: str):
    text = processor.apply_chat_template(conversation(), tokenize=False)
    video, sound = clip()
    if kind == "qwen2_5_omni":
        # transformers 5.23: audio decoded by the caller for a video's sound track needs
        # `audio_from_video_indices` (which video each audio comes from); `use_audio_in_video` is the
        # deprecated name of `load_audio_from_video`.
        return processor(text=[text], videos=[video], audio=[sound], load_audio_from_video=True,
                         audio_from_video_indices=[0], return_tensors="pt")
    # transformers 5.23: with raw frames and no metadata, the VL processors take 24 fps (their `fps`
    # argument does not change that unless it samples frames): the frame rate comes as metadata.
    return processor(text=[text], videos=[video], video_metadata=[{"fps": 2.0, "total_num_frames": len(video)}],
                     return_tensors="pt")


@pytest.mark.parametrize("kind", KINDS)
def test_the_processor_loads_with_the_tokenizer_the_configs_name(model_dir, kind):
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    path = model_dir(kind)
    processor = AutoProcessor.from_pretrained(path)
    assert type(processor).__name__ == KINDS[kind][0]
    tokenizer = processor.tokenizer
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(AutoTokenizer.from_pretrained(path)).__name__ == "Qwen2Tokenizer"
    ids = token_ids(kind)
    assert dict(zip(ids, tokenizer.convert_tokens_to_ids(list(ids)))) == ids
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.encode("user\n") == [ids["user"], tokenizer.convert_tokens_to_ids("Ċ")]
    text = processor.apply_chat_template(conversation(), tokenize=False)
    assert tokenizer.decode(tokenizer.encode(text)) == text

    config = AutoConfig.from_pretrained(path)
    if kind != "qwen2_5_omni":
        assert processor.video_token_id == config.video_token_id == ids["<|video_pad|>"]
        assert processor.image_token_id == config.image_token_id == ids["<|image_pad|>"]
        assert (config.vision_start_token_id, config.vision_end_token_id) == (ids["<|vision_start|>"],
                                                                              ids["<|vision_end|>"])
        text_config = config.text_config
    else:
        thinker, talker = config.thinker_config, config.talker_config
        for attribute, token in [("image_token", "<|IMAGE|>"), ("video_token", "<|VIDEO|>"),
                                 ("audio_token", "<|AUDIO|>"), ("vision_bos_token", "<|vision_bos|>"),
                                 ("vision_eos_token", "<|vision_eos|>"), ("audio_bos_token", "<|audio_bos|>"),
                                 ("audio_eos_token", "<|audio_eos|>")]:
            assert getattr(processor, attribute) == token
        for sub in (thinker, talker):
            assert (sub.video_token_id, sub.image_token_id, sub.audio_token_id) == (
                ids["<|VIDEO|>"], ids["<|IMAGE|>"], ids["<|AUDIO|>"])
            assert (sub.vision_start_token_id, sub.vision_end_token_id) == (ids["<|vision_bos|>"],
                                                                            ids["<|vision_eos|>"])
            assert (sub.audio_start_token_id, sub.audio_end_token_id) == (ids["<|audio_bos|>"],
                                                                          ids["<|audio_eos|>"])
        assert (processor.video_token_id, processor.audio_token_id) == (thinker.video_token_id,
                                                                        thinker.audio_token_id)
        assert thinker.user_token_id == ids["user"]
        text_config = thinker.text_config
        assert max(talker.tts_text_pad_token_id, talker.tts_text_start_token_id,
                   talker.tts_text_end_token_id) < text_config.vocab_size
        assert torch.load(path / "spk_dict.pt")["Chelsie"]["bos_token"] < text_config.vocab_size
        assert processor.feature_extractor.feature_size == 128
    bos = "<|im_start|>" if kind == "qwen2_5_omni" else "<|endoftext|>"  # as in the releases' configs
    assert (text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id) == (
        ids[bos], ids["<|im_end|>"], ids["<|endoftext|>"])
    assert len(tokenizer) <= text_config.vocab_size

    # the pixel bounds of the tiny checkpoints, for the standalone and the processor's processors
    standalone = type(processor.video_processor).from_pretrained(path)
    for video_processor, bounds in zip((standalone, processor.video_processor, processor.image_processor),
                                       PIXELS[kind][:1] * 2 + PIXELS[kind][1:]):
        assert (video_processor.size.shortest_edge, video_processor.size.longest_edge) == bounds


@pytest.mark.parametrize("kind", KINDS)
def test_the_chat_template_renders_qwens_chatml_with_the_video_block(model_dir, kind):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir(kind))
    block = KINDS[kind][1]
    text = processor.apply_chat_template(conversation(), tokenize=False)
    assert text == (f"{DEFAULT_SYSTEM[kind]}<|im_start|>user\n{block}What happens in the video?<|im_end|>\n"
                    f"<|im_start|>assistant\n{ANSWER}<|im_end|>\n")
    prompt = processor.apply_chat_template(conversation()[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == text[: text.index(ANSWER)]
    with_system = [{"role": "system", "content": "Be brief."}] + conversation()
    assert processor.apply_chat_template(with_system, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


@pytest.mark.parametrize("kind", KINDS)
def test_the_full_model_trains_on_what_the_processor_makes_of_raw_video(model_dir, kind):
    from transformers import AutoProcessor

    path = model_dir(kind)
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    inputs = processed(processor, kind)
    ids = inputs["input_ids"][0]
    video_id = tokenizer.convert_tokens_to_ids(KINDS[kind][2])
    grid = inputs["video_grid_thw"]
    assert grid[0, 0] == 2  # 4 frames, 2 per temporal patch
    if kind == "qwen2_5_vl":
        assert grid[0].tolist() == [2, 4, 6]  # the tiny bounds keep 56×84
        assert inputs["second_per_grid_ts"].tolist() == [1.0]  # 2 frames at 2 fps
    elif kind == "qwen3_vl":
        assert grid[0].tolist() == [2, 4, 6]  # 56×84 rounds to 64×96, patch 16
        # time is text: each temporal patch opens with the mean time of its two frames (0.25 s, 1.25 s)
        rendered = tokenizer.decode(ids)
        assert "<0.2 seconds><|vision_start|><|video_pad|>" in rendered and "<1.2 seconds>" in rendered
    else:
        # Qwen2_5OmniProcessor resizes videos to its own class default of 128..768 × 28² pixels, whatever
        # the saved video processor says: 56×84 becomes 280×392 here.
        assert grid[0].tolist() == [2, 20, 28]
    assert int((ids == video_id).sum()) == int(grid.prod()) // 4

    model = full_model(path)
    extra = {}
    if kind == "qwen2_5_omni":
        # the sound track: placeholders as many as the audio tower's outputs, inside the video block,
        # <|vision_bos|><|audio_bos|> (video and audio chunks) <|audio_eos|><|vision_eos|>
        with torch.no_grad():
            audio = model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"],
                                             return_dict=True).last_hidden_state
        audio_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
        assert int((ids == audio_id).sum()) == audio.shape[0] == 37  # 1.5 s: 150 frames -> 37
        expected = ["<|vision_bos|>", "<|audio_bos|>", "<|VIDEO|>"]
        first = int(torch.nonzero(ids == video_id)[0]) - 2
        assert tokenizer.convert_ids_to_tokens(ids[first:first + 3].tolist()) == expected
        last = int(torch.nonzero(ids == audio_id)[-1])
        assert tokenizer.convert_ids_to_tokens(ids[last + 1:last + 3].tolist()) == ["<|audio_eos|>", "<|vision_eos|>"]
        assert inputs["video_second_per_grid"].tolist() == [1.0]
        _, sound = clip()
        deprecated = processor(text=[processor.apply_chat_template(conversation(), tokenize=False)], videos=[clip()[0]],
                               audio=[sound], use_audio_in_video=True, audio_from_video_indices=[0],
                               return_tensors="pt")
        assert torch.equal(deprecated["input_ids"], inputs["input_ids"])
        extra["use_audio_in_video"] = True
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], None, grid, inputs["attention_mask"], True,
            inputs["feature_attention_mask"].sum(-1), inputs["video_second_per_grid"])
    elif kind == "qwen2_5_vl":
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=grid,
            second_per_grid_ts=inputs["second_per_grid_ts"], attention_mask=inputs["attention_mask"])
    else:
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=grid,
            attention_mask=inputs["attention_mask"])
    # 3D positions: the video tokens span grid_t time steps, and the text after them continues past them
    temporal = positions[0, 0][ids == video_id]
    assert len(set(temporal.tolist())) == int(grid[0, 0])
    assert positions[0, 0, -1] < len(ids) - 1

    with torch.no_grad():
        out = model(**inputs, **extra, labels=inputs["input_ids"])
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(out.loss) and out.loss > 0
