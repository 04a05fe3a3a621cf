"""The tiny checkpoints are complete enough to run transformers' own processor and full model on raw
video (and, for the Omni models, its sound track) offline: tokenizer, chat template, processor configs
and token ids that agree with the model configs. No Ray."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from qprep.models.checkpoint import in_own_memory
from qprep.models.tiny import (
    MODEL_CLASSES,
    QWEN3_KINDS,
    QWEN3_OMNI_KINDS,
    RELEASED_FILES,
    make_tiny_model,
    token_ids,
)
from reference import full_model

QWEN3_5 = ("qwen3_5", "qwen3_5_moe")
MOE = ("qwen3_vl_moe", "qwen3_5_moe")
OMNI = ("qwen2_5_omni",) + QWEN3_OMNI_KINDS  # video with its sound track
VL_VIDEO = ("Qwen3VLProcessor", "<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")
# kind -> (processor class, video block of the chat template, video token)
KINDS = {
    "qwen2_5_omni": ("Qwen2_5OmniProcessor", "<|vision_bos|><|VIDEO|><|vision_eos|>", "<|VIDEO|>"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>"),
    "qwen2_vl": ("Qwen2VLProcessor", "<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>"),
} | {kind: VL_VIDEO for kind in QWEN3_KINDS} | {
    kind: ("Qwen3OmniMoeProcessor", "<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")
    for kind in QWEN3_OMNI_KINDS}
# kind -> the tokenizer class transformers gives it (its own for the qwen3_5 model types)
TOKENIZER_CLASS = {kind: "Qwen3_5Tokenizer" if kind in QWEN3_5 else "Qwen2Tokenizer" for kind in KINDS}
# kind -> the tiny bounds of (video processor, image processor); Qwen3-VL's video bound is per video
PIXELS = {kind: [(28 * 28 * 4, 28 * 28 * 64)] * 2 for kind in ("qwen2_5_omni", "qwen2_5_vl", "qwen2_vl")} | {
    kind: [(32 * 32 * 4, 32 * 32 * 4 * 64), (32 * 32 * 4, 32 * 32 * 64)] for kind in QWEN3_KINDS} | {
    kind: [(32 * 32 * 4, 32 * 32 * 64)] * 2 for kind in QWEN3_OMNI_KINDS}  # Qwen2VLVideoProcessor: per frame
# kind -> the system turn its chat template opens with when the conversation has none
DEFAULT_SYSTEM = {kind: "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  for kind in ("qwen2_5_omni", "qwen2_5_vl", "qwen2_vl")} | {
    kind: "" for kind in QWEN3_KINDS + QWEN3_OMNI_KINDS}
# kind -> what the template writes between "<|im_start|>assistant\n" and the answer: Qwen3.5 thinks,
# and a final answer without reasoning gets an empty thinking block
THINKING = {kind: "<think>\n\n</think>\n\n" if kind in QWEN3_5 else "" for kind in KINDS}
# kind -> the (bos, eos, pad) tokens of its text config, as in the releases' configs
TEXT_IDS = {kind: ("<|endoftext|>", "<|im_end|>", "<|endoftext|>") for kind in KINDS} | {
    "qwen2_5_omni": ("<|im_start|>", "<|im_end|>", "<|endoftext|>")} | {
    kind: ("<|endoftext|>", "<|endoftext|>", None) for kind in QWEN3_5} | {
    kind: (None, None, None) for kind in QWEN3_OMNI_KINDS}  # Qwen3-Omni's text_config has none
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
    if kind in QWEN3_OMNI_KINDS:
        # transformers 5.24: Qwen3OmniMoeProcessor takes a video's frame rate from its `fps` argument
        # (1.0 without it), not from video metadata; fps alone does not sample frames here.
        return processor(text=[text], videos=[video], audio=[sound], load_audio_from_video=True,
                         audio_from_video_indices=[0], fps=2.0, return_tensors="pt")
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
    assert type(tokenizer).__name__ == TOKENIZER_CLASS[kind]
    assert type(AutoTokenizer.from_pretrained(path)).__name__ == TOKENIZER_CLASS[kind]
    ids = token_ids(kind)
    assert dict(zip(ids, tokenizer.convert_tokens_to_ids(list(ids)))) == ids
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.encode("user\n") == [ids["user"], tokenizer.convert_tokens_to_ids("Ċ")]
    text = processor.apply_chat_template(conversation(), tokenize=False)
    assert tokenizer.decode(tokenizer.encode(text)) == text

    config = AutoConfig.from_pretrained(path)
    if kind in QWEN3_OMNI_KINDS:
        thinker = config.thinker_config if kind == "qwen3_omni_moe" else config
        for attribute, token in [("image_token", "<|image_pad|>"), ("video_token", "<|video_pad|>"),
                                 ("audio_token", "<|audio_pad|>"), ("vision_bos_token", "<|vision_start|>"),
                                 ("vision_eos_token", "<|vision_end|>"), ("audio_bos_token", "<|audio_start|>"),
                                 ("audio_eos_token", "<|audio_end|>")]:
            assert getattr(processor, attribute) == token
        assert (processor.video_token_id, processor.audio_token_id, processor.image_token_id) == (
            thinker.video_token_id, thinker.audio_token_id, thinker.image_token_id) == (
            ids["<|video_pad|>"], ids["<|audio_pad|>"], ids["<|image_pad|>"])
        subs = [thinker] + ([config.talker_config] if kind == "qwen3_omni_moe" else [])
        for sub in subs:
            assert (sub.vision_start_token_id, sub.audio_start_token_id, sub.audio_end_token_id) == (
                ids["<|vision_start|>"], ids["<|audio_start|>"], ids["<|audio_end|>"])
            assert (sub.video_token_id, sub.image_token_id, sub.audio_token_id) == (
                ids["<|video_pad|>"], ids["<|image_pad|>"], ids["<|audio_pad|>"])
            # the release's 13, the processor's default too (not the config classes' 25)
            assert sub.position_id_per_seconds == processor.position_id_per_seconds == 13
        assert thinker.vision_end_token_id == ids["<|vision_end|>"] and thinker.user_token_id == ids["user"]
        assert processor.n_window == thinker.audio_config.n_window == 50
        if kind == "qwen3_omni_moe":
            assert (config.im_start_token_id, config.im_end_token_id, config.system_token_id, config.user_token_id,
                    config.assistant_token_id) == tuple(ids[t] for t in ("<|im_start|>", "<|im_end|>", "system",
                                                                          "user", "assistant"))
            assert (config.tts_pad_token_id, config.tts_bos_token_id, config.tts_eos_token_id) == (
                ids["<tts_pad>"], ids["<tts_text_bos>"], ids["<tts_text_eod>"])
            talker = config.talker_config
            codec = [talker.codec_pad_id, talker.codec_bos_id, talker.codec_eos_token_id, talker.codec_nothink_id,
                     talker.codec_think_bos_id, talker.codec_think_eos_id, *talker.speaker_id.values()]
            # control codes above the codebook, inside the codec embedding
            assert config.code2wav_config.codebook_size <= min(codec) and max(codec) < talker.text_config.vocab_size
            assert talker.thinker_hidden_size == thinker.text_config.hidden_size
        assert processor.feature_extractor.feature_size == thinker.audio_config.num_mel_bins == 128
        text_config = thinker.text_config
    elif kind != "qwen2_5_omni":
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
    assert (text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id) == tuple(
        ids.get(token) for token in TEXT_IDS[kind])
    assert len(tokenizer) <= text_config.vocab_size
    if kind in QWEN3_KINDS + QWEN3_OMNI_KINDS:  # Qwen3's four plain added tokens after Qwen2.5's, <think> among them
        tail = 7 if kind in QWEN3_OMNI_KINDS else 0
        assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer) - tail - 4, len(tokenizer) - tail))) == [
            "<tool_response>", "</tool_response>", "<think>", "</think>"]
        assert tokenizer.encode("<think>\n") == [ids["<think>"], tokenizer.convert_tokens_to_ids("Ċ")]
    if kind in QWEN3_OMNI_KINDS:  # then Qwen3-Omni's audio and TTS tokens, special (151669-151675)
        omni = ["<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
                "<tts_text_bos_single>", "<|audio_pad|>"]
        assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer) - 7, len(tokenizer)))) == omni
        assert set(omni) <= set(tokenizer.all_special_tokens)
        assert tokenizer.encode("<|audio_start|><|audio_pad|>") == [ids["<|audio_start|>"], ids["<|audio_pad|>"]]

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
                    f"<|im_start|>assistant\n{THINKING[kind]}{ANSWER}<|im_end|>\n")
    # Qwen3.5's generation prompt opens a thinking block unless thinking is off
    no_thinking = {"enable_thinking": False} if kind in QWEN3_5 else {}
    prompt = processor.apply_chat_template(conversation()[:1], tokenize=False, add_generation_prompt=True,
                                           **no_thinking)
    assert prompt == text[: text.index(ANSWER)]
    if kind in QWEN3_5:
        thinking = processor.apply_chat_template(conversation()[:1], tokenize=False, add_generation_prompt=True)
        assert thinking == text[: text.index("<think>")] + "<think>\n"
        # reasoning in the content becomes the thinking block
        reasoned = conversation()
        reasoned[1]["content"][0]["text"] = f"<think>\nStripes.\n</think>\n\n{ANSWER}"
        assert processor.apply_chat_template(reasoned, tokenize=False).endswith(
            f"<|im_start|>assistant\n<think>\nStripes.\n</think>\n\n{ANSWER}<|im_end|>\n")
    with_system = [{"role": "system", "content": "Be brief."}] + conversation()
    assert processor.apply_chat_template(with_system, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    if kind in QWEN3_OMNI_KINDS:  # an audio item (a sound file on its own) has a block of its own
        heard = [{"role": "user", "content": [{"type": "audio", "audio": "sound.wav"},
                                              {"type": "text", "text": "Hm?"}]}]
        assert processor.apply_chat_template(heard, tokenize=False) == (
            "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>Hm?<|im_end|>\n")


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
    if kind in QWEN3_OMNI_KINDS:
        # Qwen3OmniMoeProcessor resizes videos to its own class default of 128..768 × 32² pixels, whatever
        # the saved video processor says: 56×84 becomes 320×448 here, in 16-pixel patches.
        assert grid[0].tolist() == [2, 20, 28]
    elif kind == "qwen2_5_vl":
        assert grid[0].tolist() == [2, 4, 6]  # the tiny bounds keep 56×84
        assert inputs["second_per_grid_ts"].tolist() == [1.0]  # 2 frames at 2 fps
    elif kind == "qwen2_vl":
        assert grid[0].tolist() == [2, 4, 6]
        assert "second_per_grid_ts" not in inputs  # no time reaches Qwen2-VL's positions
    elif kind in QWEN3_KINDS:
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
    if kind in QWEN3_OMNI_KINDS:
        with torch.no_grad():
            audio = model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"],
                                             return_dict=True).last_hidden_state
        audio_id = tokenizer.convert_tokens_to_ids("<|audio_pad|>")
        # 1.5 s: 150 frames, 13 tokens for the first window of 100 and 7 for the 50 left
        assert int((ids == audio_id).sum()) == audio.shape[0] == 20
        assert inputs["video_second_per_grid"].tolist() == [1.0]  # 2 frames at 2 fps
        # the block: video and audio tokens in time order, 13 position ids a second: the first frame
        # pair's 140 tokens (time 0), audio 0-12, the second pair's (time 13), audio 13-19
        start = int(torch.nonzero(ids == tokenizer.convert_tokens_to_ids("<|vision_start|>"))[0])
        block = tokenizer.convert_ids_to_tokens(ids[start:start + 2 + 280 + 20 + 2].tolist())
        assert block == (["<|vision_start|>", "<|audio_start|>"] + ["<|video_pad|>"] * 140 + ["<|audio_pad|>"] * 13
                         + ["<|video_pad|>"] * 140 + ["<|audio_pad|>"] * 7 + ["<|audio_end|>", "<|vision_end|>"])
        _, sound = clip()
        deprecated = processor(text=[processor.apply_chat_template(conversation(), tokenize=False)], videos=[clip()[0]],
                               audio=[sound], use_audio_in_video=True, audio_from_video_indices=[0], fps=2.0,
                               return_tensors="pt")
        assert torch.equal(deprecated["input_ids"], inputs["input_ids"])
        extra["use_audio_in_video"] = True
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], None, grid, inputs["attention_mask"], True,
            inputs["feature_attention_mask"].sum(-1), inputs["video_second_per_grid"])
        # the model's time scale is the processor's: frame pairs at 0 and 13, audio tokens one a position
        first = start + 2
        assert sorted(set(positions[0, 0][ids == video_id].tolist())) == [first, first + 13]
        assert positions[0, 0][ids == audio_id].tolist() == list(range(first, first + 20))
    elif kind == "qwen2_5_omni":
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


@pytest.mark.parametrize("kind", QWEN3_KINDS)
def test_the_qwen3_families_have_the_releases_structure(model_dir, kind):
    """Deepstack in Qwen3-VL's vision tower and not in Qwen3.5's; a few routed experts (and Qwen3.5's
    shared expert) in the MoE kinds; both Gated DeltaNet and full-attention layers in Qwen3.5."""
    model = full_model(model_dir(kind))
    config, language = model.config, model.model.language_model
    assert bool(getattr(config.vision_config, "deepstack_visual_indexes", None)) == (kind not in QWEN3_5)
    assert hasattr(model.model.visual, "deepstack_merger_list") == (kind not in QWEN3_5)
    for layer in language.layers:
        mlp = layer.mlp
        if kind in MOE:
            text = config.text_config
            assert (text.num_experts, text.num_experts_per_tok) == (4, 2)
            # transformers 5 holds them fused: (experts, 2 × width, hidden), (experts, hidden, width)
            width, hidden = text.moe_intermediate_size, text.hidden_size
            assert tuple(mlp.experts.gate_up_proj.shape) == (4, 2 * width, hidden) and 2 * width != hidden
            assert tuple(mlp.experts.down_proj.shape) == (4, hidden, width)
            assert hasattr(mlp, "shared_expert") == (kind == "qwen3_5_moe")
        else:
            assert hasattr(mlp, "gate_proj")
    if kind in QWEN3_5:
        assert config.text_config.layer_types == ["linear_attention", "full_attention"]
        assert hasattr(language.layers[0], "linear_attn") and hasattr(language.layers[1], "self_attn")


# ---------------------------------------------------------------------------------------------
# The released layouts of the Qwen3 families

RELEASES = [(kind, "fused") for kind in QWEN3_KINDS] + [("qwen3_5_moe", "per_expert")]


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory):
    made: dict[tuple, object] = {}

    def get(kind: str, experts: str = "fused", layout: str = "released"):
        if (kind, experts, layout) not in made:
            made[kind, experts, layout] = make_tiny_model(
                kind, tmp_path_factory.mktemp(f"{kind}-{layout}-{experts}"), max_shard_size="4MB", layout=layout,
                **({"experts": experts} if layout == "released" else {}))
        return made[kind, experts, layout]

    return get


def checkpoint_keys(path) -> dict[str, tuple[str, tuple]]:
    """Every weight in the checkpoint's safetensors files: name -> (file, shape)."""
    from safetensors import safe_open

    found = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            found |= {key: (file.name, tuple(f.get_slice(key).get_shape())) for key in f.keys()}  # noqa: SIM118
    return found


@pytest.mark.parametrize(("kind", "experts"), RELEASES)
def test_a_released_layout_loads_as_its_save_pretrained_twin(released_dir, kind, experts):
    """transformers' conversion mapping takes the released names (transposed Qwen3-VL-MoE experts,
    per-expert Qwen3.5-MoE experts) to the model's, and ignores Qwen3.5's multi-token-prediction head:
    every tensor is the save_pretrained one's, and so are the logits on the same processor inputs. The
    released processor files make the same inputs of the clip."""
    import transformers
    from transformers import AutoProcessor

    released, saved = released_dir(kind, experts), released_dir(kind, layout="save_pretrained")
    model_class = getattr(transformers, MODEL_CLASSES[kind])
    model, info = model_class.from_pretrained(released, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    twin = model_class.from_pretrained(saved, dtype=torch.float32)
    ours, theirs = model.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys()
    assert [key for key in ours if not torch.equal(ours[key], theirs[key])] == []

    processor, released_processor = AutoProcessor.from_pretrained(saved), AutoProcessor.from_pretrained(released)
    assert type(released_processor).__name__ == "Qwen3VLProcessor"
    assert type(released_processor.tokenizer).__name__ == TOKENIZER_CLASS[kind]
    assert released_processor.apply_chat_template(conversation(), tokenize=False) == processor.apply_chat_template(
        conversation(), tokenize=False)
    inputs = processed(processor, kind)
    released_inputs = processed(released_processor, kind)
    assert inputs.keys() == released_inputs.keys()
    assert all(torch.equal(inputs[key], released_inputs[key]) for key in inputs)
    # from_pretrained maps each file's tensors at their offsets there (a [1, 64] gate sat at 24 and 48 mod
    # 64 in the two files); the CPU matmul rounds by alignment, so compare with the weights re-placed
    with torch.no_grad():
        logits = in_own_memory(model).eval()(**inputs).logits
        assert torch.equal(logits, in_own_memory(twin).eval()(**inputs).logits)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("kind", "experts"), RELEASES)
def test_the_released_files_config_keys_and_weight_names_are_the_hubs(released_dir, kind, experts):
    released = released_dir(kind, experts)
    weights = checkpoint_keys(released)
    files = {path.name for path in released.iterdir()}
    weight_files = files - set(RELEASED_FILES[kind])
    assert set(RELEASED_FILES[kind]) <= files and "processor_config.json" not in files
    # Qwen3.5 names its files model.safetensors-0000K-of-0000N.safetensors, Qwen3-VL model-0000K-of-0000N
    name = (r"model\.safetensors-\d{5}-of-\d{5}\.safetensors" if kind in QWEN3_5
            else r"model-\d{5}-of-\d{5}\.safetensors")
    assert len(weight_files) > 1 and all(re.fullmatch(name, file) for file in weight_files)
    index = json.loads((released / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {key: file for key, (file, _) in weights.items()}
    assert index["metadata"]["total_size"] > 0

    config = json.loads((released / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert "dtype" not in config and "torch_dtype" not in config and text["dtype"] == "float32"
    assert vision["model_type"] == kind and "rope_parameters" not in vision
    if kind in QWEN3_5:
        assert config["transformers_version"] == "4.57.1" and config["language_model_only"] is False
        assert text["rope_parameters"]["partial_rotary_factor"] == text["partial_rotary_factor"] == 0.25
        assert "rope_scaling" not in text and "rope_theta" not in text
        assert text["layer_types"] == ["linear_attention", "full_attention"] and text["full_attention_interval"] == 2
        assert (text["mtp_num_hidden_layers"], text["attn_output_gate"], text["pad_token_id"]) == (1, True, None)
        assert vision["deepstack_visual_indexes"] == []
        assert (released / "chat_template.jinja").read_text() == json.loads(
            (released / "tokenizer_config.json").read_text())["chat_template"]
        assert json.loads((released / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
    else:
        assert config["transformers_version"] == "4.57.0.dev0"
        assert "rope_parameters" not in text and "pad_token_id" not in text
        assert text["rope_theta"] == 5_000_000.0
        assert text["rope_scaling"] == {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}
        assert vision["deepstack_visual_indexes"] == [0, 1]
        assert "chat_template" in json.loads((released / "chat_template.json").read_text())
    if kind in MOE:
        assert text["num_experts"] == 4 and "num_local_experts" not in text
    assert json.loads((released / "video_preprocessor_config.json").read_text())["size"] == {
        "longest_edge": 25165824, "shortest_edge": 4096}
    assert json.loads((released / "preprocessor_config.json").read_text())["size"] == {
        "longest_edge": 16777216, "shortest_edge": 65536}

    # weight names: model.visual.*, model.language_model.*, lm_head.weight (and Qwen3.5's mtp.*)
    prefixes = ("model.visual.", "model.language_model.", "lm_head.") + (("mtp.",) if kind in QWEN3_5 else ())
    assert all(key.startswith(prefixes) for key in weights)
    assert "lm_head.weight" in weights and "model.language_model.embed_tokens.weight" in weights
    assert any(key.startswith("model.visual.deepstack_merger_list.") for key in weights) == (kind not in QWEN3_5)
    layer = "model.language_model.layers.0.mlp."
    hidden, width = 64, 16
    if kind == "qwen3_vl_moe":  # fused and transposed: (experts, hidden, 2 × width), (experts, width, hidden)
        assert weights[layer + "experts.gate_up_proj"][1] == (4, hidden, 2 * width)
        assert weights[layer + "experts.down_proj"][1] == (4, width, hidden)
    elif kind == "qwen3_5_moe" and experts == "fused":  # fused as transformers 5 holds them
        assert weights[layer + "experts.gate_up_proj"][1] == (4, 2 * width, hidden)
        assert weights[layer + "experts.down_proj"][1] == (4, hidden, width)
        assert not any(re.search(r"\.layers\.\d+\.mlp\.experts\.\d", key)
                       for key in weights if key.startswith("model."))
    elif kind == "qwen3_5_moe":  # one tensor per expert and projection
        assert not any(key.endswith(("experts.gate_up_proj", "experts.down_proj")) for key in weights)
        assert {key for key in weights if key.startswith(layer + "experts.")} == {
            f"{layer}experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")}
        assert weights[layer + "experts.3.up_proj.weight"][1] == (width, hidden)
        assert weights[layer + "experts.3.down_proj.weight"][1] == (hidden, width)
    else:
        assert weights[layer + "gate_proj.weight"][1] == (2 * hidden, hidden)
    if kind in MOE:
        assert weights[layer + "gate.weight"][1] == (4, hidden)
    if kind == "qwen3_5_moe":
        assert weights[layer + "shared_expert_gate.weight"][1] == (1, hidden)
    # Qwen3.5's multi-token-prediction head, which transformers' classes do not have
    mtp = {key: shape for key, (_, shape) in weights.items() if key.startswith("mtp.")}
    if kind in QWEN3_5:
        assert mtp["mtp.fc.weight"] == (hidden, 2 * hidden)
        assert {"mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
                "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.input_layernorm.weight"} <= mtp.keys()
        # the gated attention: q_proj makes the query and its gate
        assert mtp["mtp.layers.0.self_attn.q_proj.weight"] == (2 * 4 * 32, hidden)
        if kind == "qwen3_5_moe":  # per expert in every release
            assert mtp["mtp.layers.0.mlp.experts.0.gate_proj.weight"] == (width, hidden)
            assert "mtp.layers.0.mlp.shared_expert.down_proj.weight" in mtp
    else:
        assert mtp == {}


def test_only_qwen3_5_moe_has_a_choice_of_expert_layouts(tmp_path):
    with pytest.raises(ValueError, match="Qwen3.5-MoE"):
        make_tiny_model("qwen3_vl_moe", tmp_path / "a", layout="released", experts="per_expert")
    with pytest.raises(ValueError, match="layout='released'"):
        make_tiny_model("qwen3_5_moe", tmp_path / "b", experts="per_expert")


# ---------------------------------------------------------------------------------------------
# Qwen3-Omni

def test_qwen3_omni_has_the_releases_structure(model_dir):
    """A MoE thinker (routed experts, fused in memory, no shared expert) with a deepstack vision tower
    and an audio tower; the full model also holds the talker (MoE with a shared expert) and code2wav.
    The bare thinker is transformers' own `qwen3_omni_moe_thinker` model type, and its weights are
    the full checkpoint's `thinker.*` ones without the prefix."""
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    full = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(model_dir("qwen3_omni_moe"))
    thinker, config = full.thinker, full.thinker.config
    assert len(thinker.model.visual.merger_list) == len(config.vision_config.deepstack_visual_indexes) == 2
    text = config.text_config
    assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (4, 2, 16)
    for layer in thinker.model.language_model.layers:
        assert tuple(layer.mlp.experts.gate_up_proj.shape) == (4, 2 * 16, 64)
        assert tuple(layer.mlp.experts.down_proj.shape) == (4, 64, 16)
        assert not hasattr(layer.mlp, "shared_expert")
    assert hasattr(thinker.model, "audio_tower") and hasattr(full.talker.model.layers[0].mlp, "shared_expert")
    assert hasattr(full, "code2wav")

    bare_dir = model_dir("qwen3_omni_moe_thinker")
    assert AutoConfig.from_pretrained(bare_dir).model_type == "qwen3_omni_moe_thinker"
    bare = AutoModelForImageTextToText.from_pretrained(bare_dir)
    assert type(bare).__name__ == MODEL_CLASSES["qwen3_omni_moe_thinker"]
    full_keys = checkpoint_keys(model_dir("qwen3_omni_moe"))
    assert set(checkpoint_keys(bare_dir)) == {k.removeprefix("thinker.") for k in full_keys if k.startswith("thinker.")}


def test_the_qwen3_omni_release_loads_as_its_save_pretrained_twin(released_dir):
    """Both layouts hold per-expert tensors, which transformers' conversion mapping fuses at load:
    every tensor is the save_pretrained one's, the processors make the same inputs of the clip and
    its sound track, and the thinker gives the same logits on them."""
    import transformers
    from transformers import AutoProcessor

    released, saved = released_dir("qwen3_omni_moe"), released_dir("qwen3_omni_moe", layout="save_pretrained")
    model_class = getattr(transformers, MODEL_CLASSES["qwen3_omni_moe"])
    model, info = model_class.from_pretrained(released, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    twin = model_class.from_pretrained(saved, dtype=torch.float32)
    ours, theirs = model.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys()
    assert [key for key in ours if not torch.equal(ours[key], theirs[key])] == []
    thinker_config, talker_config = model.config.thinker_config, model.config.talker_config
    assert thinker_config.position_id_per_seconds == talker_config.position_id_per_seconds == 13

    processor, released_processor = AutoProcessor.from_pretrained(saved), AutoProcessor.from_pretrained(released)
    assert type(released_processor).__name__ == "Qwen3OmniMoeProcessor"
    assert type(released_processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert released_processor.apply_chat_template(conversation(), tokenize=False) == processor.apply_chat_template(
        conversation(), tokenize=False)
    inputs = processed(processor, "qwen3_omni_moe")
    released_inputs = processed(released_processor, "qwen3_omni_moe")
    assert inputs.keys() == released_inputs.keys()
    assert all(torch.equal(inputs[key], released_inputs[key]) for key in inputs)
    with torch.no_grad():  # the weights re-placed, as in the Qwen3-VL and Qwen3.5 twins' test
        logits = in_own_memory(model.thinker).eval()(**inputs, use_audio_in_video=True).logits
        assert torch.equal(logits, in_own_memory(twin.thinker).eval()(**inputs, use_audio_in_video=True).logits)
    assert torch.isfinite(logits).all()


def test_the_qwen3_omni_release_files_config_keys_and_weight_names_are_the_hubs(released_dir, tmp_path):
    released = released_dir("qwen3_omni_moe")
    weights = checkpoint_keys(released)
    files = {path.name for path in released.iterdir()}
    assert set(RELEASED_FILES["qwen3_omni_moe"]) <= files
    assert not files & {"processor_config.json", "video_preprocessor_config.json", "chat_template.jinja", "spk_dict.pt"}
    weight_files = files - set(RELEASED_FILES["qwen3_omni_moe"]) - {"model.safetensors.index.json"}
    assert len(weight_files) > 1
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", file) for file in weight_files)
    index = json.loads((released / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {key: file for key, (file, _) in weights.items()}

    config = json.loads((released / "config.json").read_text())
    thinker, talker, code2wav = config["thinker_config"], config["talker_config"], config["code2wav_config"]
    assert config["model_type"] == "qwen3_omni_moe" and config["enable_audio_output"] is True
    assert config["transformers_version"] == "4.57.0.dev0" and thinker["dtype"] == config["dtype"] == "float32"
    assert thinker["position_id_per_seconds"] == talker["position_id_per_seconds"] == 13
    assert thinker["seconds_per_chunk"] == talker["seconds_per_chunk"] == 2
    text, vision = thinker["text_config"], thinker["vision_config"]
    assert "rope_parameters" not in text and text["rope_theta"] == 1_000_000.0
    assert text["rope_scaling"] == {"interleaved": True, "mrope_interleaved": True, "mrope_section": [4, 2, 2],
                                    "rope_type": "default", "type": "default"}
    assert text["use_qk_norm"] is True and text["shared_expert_intermediate_size"] == 0
    assert "rope_parameters" not in vision and vision["deepstack_visual_indexes"] == [0, 1]
    assert vision["apply_vit_abs_pos_embed"] is True and vision["spatial_patch_size"] == vision["patch_size"] == 16
    assert talker["model_type"] == "qwen3_omni_moe_talker"
    assert talker["text_config"]["num_experts"] == 2 and "num_local_experts" not in talker["text_config"]
    assert talker["text_config"]["rope_scaling"] == {"interleaved": True, "mrope_section": [4, 2, 2],
                                                     "rope_type": "default", "type": "default"}
    assert talker["code_predictor_config"]["rope_scaling"] is None
    assert code2wav["rope_theta"] == 10_000.0 and "rope_parameters" not in code2wav and "rope_scaling" not in code2wav
    preprocessor = json.loads((released / "preprocessor_config.json").read_text())
    assert preprocessor["processor_class"] == "Qwen3OmniMoeProcessor"
    assert preprocessor["feature_extractor_type"] == "WhisperFeatureExtractor" and preprocessor["feature_size"] == 128
    assert (preprocessor["patch_size"], preprocessor["min_pixels"], preprocessor["max_pixels"]) == (16, 3136, 12845056)
    assert "chat_template" in json.loads((released / "chat_template.json").read_text())

    # weight names: thinker.{visual,audio_tower,model,lm_head}.*, talker.*, code2wav.*; every routed expert
    # one tensor per expert and projection, in the thinker and the talker
    prefixes = ("thinker.visual.", "thinker.audio_tower.", "thinker.model.", "thinker.lm_head.", "talker.", "code2wav.")
    assert all(key.startswith(prefixes) for key in weights)
    assert {"thinker.lm_head.weight", "thinker.model.embed_tokens.weight",
            "thinker.visual.merger_list.1.ln_q.weight", "thinker.audio_tower.conv_out.weight"} <= weights.keys()
    assert not any(key.startswith("thinker.model.language_model.") for key in weights)
    assert not any(key.endswith(("experts.gate_up_proj", "experts.down_proj")) for key in weights)
    layer, hidden, width = "thinker.model.layers.0.mlp.", 64, 16
    assert {key for key in weights if key.startswith(layer)} == {f"{layer}gate.weight"} | {
        f"{layer}experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")}
    assert weights[layer + "experts.3.up_proj.weight"][1] == (width, hidden)
    assert weights[layer + "experts.3.down_proj.weight"][1] == (hidden, width)
    talker_layer = "talker.model.layers.0.mlp."
    assert {f"{talker_layer}experts.1.gate_proj.weight", f"{talker_layer}shared_expert.down_proj.weight",
            f"{talker_layer}shared_expert_gate.weight"} <= weights.keys()

    with pytest.raises(ValueError, match="qwen3_omni_moe_thinker"):
        make_tiny_model("qwen3_omni_moe_thinker", tmp_path / "bare", layout="released")


# Qwen/Qwen2-VL-7B-Instruct's files beside its weights (model-0000K-of-00005.safetensors + index)
QWEN2_VL_RELEASED_FILES = {"chat_template.json", "config.json", "generation_config.json", "merges.txt",
                           "model.safetensors.index.json", "preprocessor_config.json", "tokenizer.json",
                           "tokenizer_config.json", "vocab.json"}


def test_the_qwen2_vl_release_has_the_hubs_files_and_config_keys(released_dir):
    """Text settings at the top level with `rope_scaling` {"type": "mrope"}, the vision_config keys
    transformers 4.41 wrote (`in_chans`, `spatial_patch_size`, no model_type), one
    preprocessor_config.json with the image bounds, no video processor file; weights `visual.*`,
    `model.*`, `lm_head.*`."""
    released = released_dir("qwen2_vl")
    files = {path.name for path in released.iterdir()}
    weight_files = files - QWEN2_VL_RELEASED_FILES
    assert QWEN2_VL_RELEASED_FILES <= files and len(weight_files) > 1
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", file) for file in weight_files)
    config = json.loads((released / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and "text_config" not in config
    assert config["torch_dtype"] == "float32" and config["rope_theta"] == 1_000_000.0
    assert config["rope_scaling"]["type"] == "mrope" and config["rope_scaling"]["mrope_section"] == [2, 3, 3]
    assert config["vision_config"] == {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 4, "hidden_size": 64,
                                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                                       "in_chans": 3, "spatial_patch_size": 14}
    preprocessor = json.loads((released / "preprocessor_config.json").read_text())
    assert preprocessor["processor_class"] == "Qwen2VLProcessor"
    assert (preprocessor["patch_size"], preprocessor["merge_size"], preprocessor["min_pixels"],
            preprocessor["max_pixels"]) == (14, 2, 3136, 12845056)
    assert "chat_template" in json.loads((released / "chat_template.json").read_text())
    assert {key.split(".")[0] for key in checkpoint_keys(released)} == {"visual", "model", "lm_head"}


def test_the_qwen2_vl_release_loads_as_its_save_pretrained_twin(released_dir):
    """Every tensor and the logits on the same inputs are the save_pretrained twin's; the released
    processor is Qwen2VLProcessor with the same template, sizing video within the image bounds."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    released, saved = released_dir("qwen2_vl"), released_dir("qwen2_vl", layout="save_pretrained")
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(released, dtype=torch.float32,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    twin = Qwen2VLForConditionalGeneration.from_pretrained(saved, dtype=torch.float32)
    assert model.config.vision_config.in_channels == 3 and model.config.vision_config.hidden_act == "quick_gelu"
    ours, theirs = model.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)

    processor, released_processor = AutoProcessor.from_pretrained(saved), AutoProcessor.from_pretrained(released)
    assert type(released_processor).__name__ == "Qwen2VLProcessor"
    size = released_processor.video_processor.size
    assert (size.shortest_edge, size.longest_edge) == (3136, 12845056)
    assert released_processor.apply_chat_template(conversation(), tokenize=False) == processor.apply_chat_template(
        conversation(), tokenize=False)
    inputs = processed(processor, "qwen2_vl")
    assert processed(released_processor, "qwen2_vl")["video_grid_thw"].tolist() == [[2, 4, 6]]  # 56×84 as it is
    with torch.no_grad():
        logits = in_own_memory(model).eval()(**inputs).logits
        assert torch.equal(logits, in_own_memory(twin).eval()(**inputs).logits)
    assert torch.isfinite(logits).all()
