"""Tiny checkpoints with random weights and the real structure, for the demo and the tests.

They are built with transformers' own model classes and saved with `save_pretrained`, so the files
have the real key layout (`thinker.visual.*`, `thinker.audio_tower.*`, `thinker.model.*`,
`talker.*`, `token2wav.*` for Omni; `visual.*`, `model.*` for Qwen2.5-VL; `model.visual.*`,
`model.language_model.*` for Qwen3-VL, whose vision tower has deepstack levels) and the real config
and preprocessor files. Only the widths, depths and the vocabulary are small.

They also carry what transformers' processors need offline: a byte-level BPE Qwen2 tokenizer with
Qwen's special tokens and ChatML chat template, and the full processor config, so that
`AutoProcessor.from_pretrained(dir)` works and the model runs on what it makes of raw video. Every
token id in the model configs is the tokenizer's id of that token (see `token_ids`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

KINDS = ("qwen2_5_omni", "qwen2_5_vl", "qwen3_vl")
DEMO_KIND = "qwen2_5_omni"  # what `qprep demo` trains: video with the audio inside it, the seed recipe's model


def _rope(head_dim: int) -> dict:
    # The multimodal rope splits half the head over (time, height, width); the releases use
    # 16/24/24 of 64.
    half = head_dim // 2
    return {"rope_type": "default", "rope_theta": 1_000_000.0,
            "mrope_section": [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]}


# Rows of the tiny text embedding. As in the real releases (151665 tokens, 152064 rows) the
# tokenizer uses only the first ids and the rest is padding; the size keeps the tiny checkpoints
# large enough to be split over several files at max_shard_size="4MB".
TEXT_VOCAB_SIZE = 8192

# ---------------------------------------------------------------------------------------------
# Tokenizer: Qwen's byte-level BPE, with a tiny vocabulary and Qwen's special tokens

# The 256 byte symbols, then merges spelling these words, so that the role names are single
# tokens as in Qwen's vocabulary ("Ġ" is the byte-level space).
_MERGED_WORDS = ("user", "system", "assistant", "You", "Ġare", "Ġa", "Ġhelpful", "Ġthe", "Ġvideo", "Ġin",
                 "Ġis", "Ġwhat", "Ġhappens")

# Qwen's added tokens in Qwen's order; the first follows the regular vocabulary (151643 in the real
# releases). The two families name the multimodal tokens differently.
_SPECIAL_TOKENS = {
    "qwen2_5_vl": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                   "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                   "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"),
    "qwen2_5_omni": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
                     "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>",
                     "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>"),
}
_SPECIAL_TOKENS["qwen3_vl"] = _SPECIAL_TOKENS["qwen2_5_vl"]  # the same first 14 added tokens in the releases
_PLAIN_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                       "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")  # added, but not special

# The tokenizer attributes the processors read (Qwen2_5OmniProcessor reads all of them; the VL
# processor falls back to "<|image_pad|>" / "<|video_pad|>", as with the real VL tokenizer, which
# defines none).
_TOKEN_ATTRIBUTES = {
    "qwen2_5_vl": {},
    "qwen3_vl": {},
    "qwen2_5_omni": {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
                     "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                     "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"},
}

# ChatML templates of the releases' form: a default system turn, one placeholder block per image /
# audio / video item (expanded by the processor), `add_generation_prompt`.
_CHAT_TEMPLATE = {
    "qwen2_5_vl": (
        "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
        "{% set image_count.value = image_count.value + 1 %}"
        "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
        "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "qwen2_5_omni": (
        "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
        "{% set video_count = namespace(value=0) %}"
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
        "{% set image_count.value = image_count.value + 1 %}"
        "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
        "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
        "{% set audio_count.value = audio_count.value + 1 %}"
        "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
        "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
        "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
        "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


# Qwen3-VL's template has no default system turn; a video is the same block as Qwen2.5-VL's.
_CHAT_TEMPLATE["qwen3_vl"] = _CHAT_TEMPLATE["qwen2_5_vl"].replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", "")


def _byte_symbols() -> list[str]:
    """The 256 byte-level symbols in GPT-2/Qwen order (printable bytes as themselves first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [chars[b] for b in printable + others]


def _bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The regular vocabulary (byte symbols, then merged pieces) and its merges."""
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    merges: list[tuple[str, str]] = []
    for word in _MERGED_WORDS:
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                merges.append((word[:end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)
    return vocab, merges


def token_ids(kind: str) -> dict[str, int]:
    """Every added token of the tiny `kind` tokenizer (and "user") with its id."""
    vocab, _ = _bpe()
    ids = {token: len(vocab) + i for i, token in enumerate(_SPECIAL_TOKENS[_check(kind)] + _PLAIN_ADDED_TOKENS)}
    return ids | {"user": vocab["user"]}


def _check(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {KINDS}")
    return kind


def tiny_tokenizer(kind: str):
    """Qwen2's tokenizer class over a tiny byte-level BPE with Qwen's special tokens and chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _bpe()
    ids = token_ids(_check(kind))
    # The added tokens are in the BPE vocabulary too, at their ids: the class adds its special
    # tokens in its own order, and adding keeps the id of a token the vocabulary already has.
    tokenizer = Qwen2Tokenizer(vocab=vocab | ids, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace",
                               model_max_length=32768, chat_template=_CHAT_TEMPLATE[kind],
                               **_TOKEN_ATTRIBUTES[kind])
    specials = _SPECIAL_TOKENS[kind]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials]
                         + [AddedToken(t, special=False, normalized=False) for t in _PLAIN_ADDED_TOKENS])
    tokenizer.add_special_tokens({"extra_special_tokens": [t for t in specials if t != "<|endoftext|>"]})
    got = dict(zip(ids, tokenizer.convert_tokens_to_ids(list(ids))))
    if got != ids or len(tokenizer) != len(vocab) + len(ids) - 1:
        raise AssertionError(f"tiny tokenizer ids {got} differ from {ids}")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Configs


def _text(hidden: int, vocab_size: int = TEXT_VOCAB_SIZE, **ids) -> dict:
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=hidden // 4, vocab_size=vocab_size, rope_parameters=_rope(hidden // 4),
                **ids)


def _vision(hidden: int) -> dict:
    # window_size 112 = 4×4 merged tokens per window: windowed and full-attention blocks both run.
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden,
                fullatt_block_indexes=[1], window_size=112)


def _audio(hidden: int) -> dict:
    return dict(encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32, output_dim=hidden,
                num_mel_bins=128, n_window=100, max_source_positions=1500)


# Ids of the Omni talker's text markers and of the speaker's text bos: beyond the tokenizer,
# inside the embedding, as in the release (151859-151861 and 151872 of 152064 rows).
_TTS_TEXT_PAD, _TTS_TEXT_START, _TTS_TEXT_END = TEXT_VOCAB_SIZE - 16, TEXT_VOCAB_SIZE - 15, TEXT_VOCAB_SIZE - 14
_SPEAKER_BOS = TEXT_VOCAB_SIZE - 3


def tiny_config(kind: str, hidden: int = 64):
    """The transformers config of a tiny checkpoint of `kind` (see KINDS).

    Every token id in it is the id of that token in `tiny_tokenizer(kind)`.
    """
    from transformers import Qwen2_5OmniConfig, Qwen2_5_VLConfig, Qwen3VLConfig

    ids = token_ids(_check(kind))
    if kind == "qwen3_vl":
        text = dict(_text(hidden, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                          pad_token_id=ids["<|endoftext|>"]),
                    # interleaved M-RoPE over (t, h, w), as the releases' [24, 20, 20] of 64
                    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                     "mrope_section": [4, 2, 2], "mrope_interleaved": True})
        # three blocks, deepstack after the first two (the releases: 27 blocks, levels at 8, 16, 24)
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                             video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                             vision_end_token_id=ids["<|vision_end|>"])
    if kind == "qwen2_5_vl":
        text = _text(hidden, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                     pad_token_id=ids["<|endoftext|>"])
        return Qwen2_5_VLConfig(text_config=text, vision_config=_vision(hidden),
                                image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                vision_start_token_id=ids["<|vision_start|>"],
                                vision_end_token_id=ids["<|vision_end|>"],
                                # as in the release's config.json (not read by transformers 5.23)
                                vision_token_id=ids["<|vision_pad|>"])
    # Omni: the multimodal ids appear in the thinker and (for its position ids) the talker config.
    media = dict(audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"],
                 video_token_index=ids["<|VIDEO|>"], audio_start_token_id=ids["<|audio_bos|>"],
                 audio_end_token_id=ids["<|audio_eos|>"])
    # The thinker config class declares no vision_start/end ids, but get_rope_index reads
    # vision_start_token_id from it: the release's thinker_config carries both, and so does this one.
    vision = dict(vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"])
    special = dict(bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    talker = dict(_text(32), embedding_size=hidden, vocab_size=8448, num_hidden_layers=1, **media, **vision,
                  tts_text_pad_token_id=_TTS_TEXT_PAD, tts_text_start_token_id=_TTS_TEXT_START,
                  tts_text_end_token_id=_TTS_TEXT_END)
    token2wav = dict(
        dit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16, emb_dim=16,
                        enc_emb_dim=16, enc_dim=16, enc_attention_channels=8, enc_se_channels=8, ff_mult=1),
        bigvgan_config=dict(upsample_initial_channel=32, resblock_kernel_sizes=[3],
                            resblock_dilation_sizes=[[1, 3, 5]]),
    )
    thinker = dict(text_config=_text(hidden, **special), vision_config=_vision(hidden), audio_config=_audio(hidden),
                   user_token_id=ids["user"], **media, **vision, **special)
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav)


def tiny_processor(kind: str):
    """The transformers processor of a tiny `kind` checkpoint: tokenizer, image and video processors
    (and, for Omni, the Whisper feature extractor), with the chat template."""
    from transformers import Qwen2_5_VLProcessor, Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen3VLProcessor

    tokenizer = tiny_tokenizer(kind)
    pixels = _pixel_bounds()
    if kind == "qwen3_vl":
        image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                      min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)
        return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=_video_processor(kind),
                                chat_template=_CHAT_TEMPLATE[kind])
    if kind == "qwen2_5_vl":
        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                                   video_processor=_video_processor(), chat_template=_CHAT_TEMPLATE[kind])
    return Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(**pixels), video_processor=_video_processor(),
                                feature_extractor=_feature_extractor(), tokenizer=tokenizer,
                                chat_template=_CHAT_TEMPLATE[kind])


def _pixel_bounds() -> dict:
    # Small enough for fast tests, large enough for several merged tokens per frame.
    return dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)


def _video_processor(kind: str = "qwen2_5_vl"):
    from transformers import Qwen2VLVideoProcessor, Qwen3VLVideoProcessor

    if kind == "qwen3_vl":
        # Qwen3-VL's `longest_edge` is a pixel budget over all of a video's frames, not per frame.
        return Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 4 * 64})
    return Qwen2VLVideoProcessor(**_pixel_bounds())


def _feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300, n_fft=400)


LAYOUTS = ("save_pretrained", "released")
_MODEL_CLASSES = {"qwen2_5_omni": "Qwen2_5OmniForConditionalGeneration",
                  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                  "qwen3_vl": "Qwen3VLForConditionalGeneration"}


def make_tiny_model(kind: str, out: str | Path, *, seed: int = 0, hidden: int = 64,
                    max_shard_size: str | None = None, layout: str = "save_pretrained") -> Path:
    """Build and save a tiny random `kind` checkpoint (weights, config, tokenizer, processor configs).

    The directory loads offline with `from_pretrained` of the model class and of `AutoProcessor`
    (tokenizer with Qwen's special tokens and chat template; image and video processors; for Omni
    the feature extractor). `max_shard_size` splits the weights over several files with an index,
    like the real releases. `layout` "save_pretrained" is what transformers 5 writes; "released" is
    the file set and config keys of the hub repositories (see `to_released_layout`). Returns the
    directory.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if layout == "released" and kind not in _RELEASED_PROCESSOR_CLASS:
        raise ValueError(f"no released layout is written for {kind} yet; use layout='save_pretrained'")
    import torch
    import transformers
    from transformers.utils import logging

    out = Path(out)
    model_class = getattr(transformers, _MODEL_CLASSES[_check(kind)])
    config = tiny_config(kind, hidden)
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # transformers warns about the token ids of its default sub-configs
    logging.disable_progress_bar()  # a bar for writing a one-file checkpoint in a fraction of a second
    try:
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # the talker's unused zero-width layers, initialised all the same
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            model = model_class(config)
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out, **kwargs)
        # processor_config.json (image / video processor, feature extractor), tokenizer.json,
        # tokenizer_config.json and chat_template.jinja
        tiny_processor(kind).save_pretrained(out)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    # The standalone files too, as in the releases (and as qprep read them before processor_config.json).
    _video_processor(kind).save_pretrained(out)
    if kind == "qwen2_5_omni":
        # The full Omni model's from_pretrained also loads the talker's speaker table.
        torch.save({"Chelsie": {"bos_token": _SPEAKER_BOS, "cond": torch.zeros(1, 192),
                                "ref_mel": torch.zeros(1, 30, 80)}}, out / "spk_dict.pt")
        _feature_extractor().save_pretrained(out)
    if layout == "released":
        to_released_layout(kind, out)
    return out


# The released repositories' preprocessor_config.json: the image processor's bounds (which the Omni
# processor does not apply to video), and for Omni the Whisper settings in the same file.
_RELEASED_IMAGE_PROCESSOR = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                                 merge_size=2, image_processor_type="Qwen2VLImageProcessor")
_RELEASED_WHISPER = dict(chunk_length=300, dither=0.0, feature_extractor_type="WhisperFeatureExtractor",
                         feature_size=128, hop_length=160, n_fft=400, n_samples=4800000, nb_max_frames=30000,
                         padding_side="right", padding_value=0.0, return_attention_mask=True, sampling_rate=16000)
_RELEASED_PROCESSOR_CLASS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_5_omni": "Qwen2_5OmniProcessor"}


def to_released_layout(kind: str, out: Path) -> None:
    """Rewrite a saved tiny checkpoint into the layout of the hub releases (Qwen2.5-VL-7B-Instruct,
    Qwen2.5-Omni-7B): one combined `preprocessor_config.json` and no `processor_config.json` or
    `video_preprocessor_config.json`; `chat_template.json`; `vocab.json` + `merges.txt` beside
    `tokenizer.json`; `config.json` with the releases' keys (`torch_dtype`, `rope_theta` +
    `rope_scaling`, and for VL the text settings at the top level rather than in `text_config`).
    Weight key names are already the hub's (`visual.*`, `model.*` / `thinker.*`)."""
    import json

    from qprep.schemas.settings import CLIP_MEAN, CLIP_STD

    config = json.loads((out / "config.json").read_text())
    if kind == "qwen2_5_vl":
        text = config.pop("text_config")
        config = {**{k: v for k, v in text.items() if k not in ("model_type", "layer_types")}, **config}
    # the releases' rope_scaling: {"type": "mrope", ...} for VL, {"type": "default", "rope_type": "default", ...} for Omni
    rope_type = "mrope" if kind == "qwen2_5_vl" else "default"
    (out / "config.json").write_text(json.dumps(_legacy_keys(config, rope_type), indent=2))
    preprocessor = {**_RELEASED_IMAGE_PROCESSOR, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                    "processor_class": _RELEASED_PROCESSOR_CLASS[kind]}
    if kind == "qwen2_5_omni":
        preprocessor.update(_RELEASED_WHISPER)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    for name in ("processor_config.json", "video_preprocessor_config.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": _CHAT_TEMPLATE[kind]}, indent=2))
    vocab, merges = _bpe()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _legacy_keys(config, rope_type: str):
    """transformers 5's `dtype` and `rope_parameters`, spelled as the releases spell them."""
    if isinstance(config, list):
        return [_legacy_keys(item, rope_type) for item in config]
    if not isinstance(config, dict):
        return config
    out = {}
    for key, value in config.items():
        if key == "dtype":
            out["torch_dtype"] = value
        elif key == "rope_parameters" and isinstance(value, dict):
            out["rope_theta"] = value.get("rope_theta")
            legacy = {k: v for k, v in value.items() if k != "rope_theta"}
            out["rope_scaling"] = {**legacy, "type": rope_type} if "mrope_section" in legacy else legacy
        else:
            out[key] = _legacy_keys(value, rope_type)
    return out
