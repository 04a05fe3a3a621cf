"""Tiny checkpoints with random weights and the real structure, for the demo and the tests.

They are built with transformers' own model classes and saved with `save_pretrained`, so the files
have the real key layout (`thinker.visual.*`, `thinker.audio_tower.*`, `thinker.model.*`,
`talker.*`, `token2wav.*` for Omni; `visual.*`, `model.*` for Qwen2.5-VL and Qwen2-VL; `model.visual.*`,
`model.language_model.*`, `lm_head.*` for Qwen3-VL (dense and MoE, whose vision towers have
deepstack levels) and Qwen3.5 (dense and MoE, a hybrid Gated DeltaNet / full-attention text model
and a vision tower without deepstack); `thinker.visual.*`, `thinker.audio_tower.*`, `thinker.model.*`,
`thinker.lm_head.*`, `talker.*`, `code2wav.*` for Qwen3-Omni (a MoE thinker with a deepstack vision
tower and an audio tower), and the same without `thinker.` for its bare thinker, `qwen3_omni_moe_thinker`) and
the real config and preprocessor files. Only the widths, depths, expert counts and the vocabulary are
small.

They also carry what transformers' processors need offline: a byte-level BPE tokenizer (Qwen2's,
Qwen3.5's own for Qwen3.5) with Qwen's special tokens and the releases' chat template, and the full
processor config, so that `AutoProcessor.from_pretrained(dir)` works and the model runs on what it
makes of raw video. Every token id in the model configs is the tokenizer's id of that token (see
`token_ids`).

`layout="released"` rewrites a checkpoint into the hub repositories' file set, config keys and
weight key names (see `to_released_layout`); transformers' `from_pretrained` loads either.
"""

from __future__ import annotations

import warnings
from pathlib import Path

KINDS = ("qwen2_5_omni", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe",
         "qwen3_omni_moe", "qwen3_omni_moe_thinker")
QWEN3_KINDS = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # the Qwen3VLProcessor families
_QWEN3_5 = ("qwen3_5", "qwen3_5_moe")
# Qwen3-Omni (Qwen3OmniMoeProcessor): the full model (thinker, talker, code2wav), and its thinker alone
# as transformers' own `qwen3_omni_moe_thinker` model type (Qwen3OmniMoeThinkerForConditionalGeneration,
# mapped by AutoModel and AutoModelForImageTextToText), which is what qprep trains.
QWEN3_OMNI_KINDS = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")
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
# The Qwen3 families have the same first 14 added tokens (151643.. in Qwen3-VL, 248044.. in Qwen3.5:
# <|endoftext|> 248044, <|im_start|> 248045, <|im_end|> 248046, <|vision_start|> 248053,
# <|image_pad|> 248056, <|video_pad|> 248057 in the Qwen3.5 configs and tokenizer_config.json).
for _kind in QWEN3_KINDS:
    _SPECIAL_TOKENS[_kind] = _SPECIAL_TOKENS["qwen2_5_vl"]
_SPECIAL_TOKENS["qwen2_vl"] = _SPECIAL_TOKENS["qwen2_5_vl"]  # Qwen2.5-VL kept Qwen2-VL's tokenizer
_PLAIN_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                       "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")  # added, but not special
# Qwen3 adds these four after them (151665-151668 in Qwen3-VL; <think> is 248068 in Qwen3.5), also not
# special; Qwen3.5's thinking template writes <think> and </think>.
_QWEN3_PLAIN_ADDED_TOKENS = _PLAIN_ADDED_TOKENS + ("<tool_response>", "</tool_response>", "<think>", "</think>")
# Qwen3-Omni then adds seven special tokens: <|audio_start|> 151669, <|audio_end|> 151670, <tts_pad>
# 151671, <tts_text_bos> 151672, <tts_text_eod> 151673, <tts_text_bos_single> 151674, <|audio_pad|> 151675
# (the ids of the release's tokenizer_config.json as vllm-omni's qwen3_omni_moe model quotes them; the
# release's config.json has the same audio_start / audio_end / audio_token and tts_* ids).
_QWEN3_OMNI_SPECIAL_TOKENS = ("<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
                              "<tts_text_bos_single>", "<|audio_pad|>")
for _kind in QWEN3_OMNI_KINDS:
    _SPECIAL_TOKENS[_kind] = _SPECIAL_TOKENS["qwen2_5_vl"]


def _plain_added_tokens(kind: str) -> tuple[str, ...]:
    return _QWEN3_PLAIN_ADDED_TOKENS if kind in QWEN3_KINDS + QWEN3_OMNI_KINDS else _PLAIN_ADDED_TOKENS


def _special_tokens(kind: str) -> tuple[str, ...]:
    """Every special added token of the `kind` tokenizer, in id order."""
    return _SPECIAL_TOKENS[kind] + (_QWEN3_OMNI_SPECIAL_TOKENS if kind in QWEN3_OMNI_KINDS else ())


def _added_tokens(kind: str) -> tuple[str, ...]:
    """Every added token in id order: the first special ones, the plain ones, then (Qwen3-Omni) the
    audio and TTS ones."""
    tail = _QWEN3_OMNI_SPECIAL_TOKENS if kind in QWEN3_OMNI_KINDS else ()
    return _SPECIAL_TOKENS[kind] + _plain_added_tokens(kind) + tail


# The tokenizer attributes the processors read (Qwen2_5OmniProcessor and Qwen3OmniMoeProcessor read
# all of them, the latter with no fallback; the VL processor falls back to "<|image_pad|>" /
# "<|video_pad|>", as with the real VL tokenizer, which defines none).
_TOKEN_ATTRIBUTES = {
    "qwen2_5_vl": {},
    "qwen2_vl": {},
    **{kind: {} for kind in QWEN3_KINDS},
    "qwen2_5_omni": {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
                     "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                     "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"},
    **{kind: {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|audio_pad|>",
              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
              "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"}
       for kind in QWEN3_OMNI_KINDS},
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


# Qwen2.5-VL's template is Qwen2-VL's (Qwen/Qwen2-VL-7B-Instruct's chat_template.json), unchanged.
_CHAT_TEMPLATE["qwen2_vl"] = _CHAT_TEMPLATE["qwen2_5_vl"]
# Qwen3-VL's template has no default system turn; a video is the same block as Qwen2.5-VL's.
_CHAT_TEMPLATE["qwen3_vl"] = _CHAT_TEMPLATE["qwen2_5_vl"].replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", "")
_CHAT_TEMPLATE["qwen3_vl_moe"] = _CHAT_TEMPLATE["qwen3_vl"]
# Qwen3-Omni's is Qwen3-VL's with an audio block between the image and the video ones, in Qwen3's
# token names: <|vision_start|><|image_pad|><|vision_end|>, <|audio_start|><|audio_pad|><|audio_end|>,
# <|vision_start|><|video_pad|><|vision_end|>; the processor expands a video's block, with its sound
# track, to <|vision_start|><|audio_start|> (video and audio tokens in time order) <|audio_end|><|vision_end|>.
_CHAT_TEMPLATE["qwen3_omni_moe"] = (
    _CHAT_TEMPLATE["qwen2_5_omni"]
    .replace("{% if loop.first and message['role'] != 'system' %}"
             "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", "")
    .replace("<|vision_bos|><|IMAGE|><|vision_eos|>", "<|vision_start|><|image_pad|><|vision_end|>")
    .replace("<|audio_bos|><|AUDIO|><|audio_eos|>", "<|audio_start|><|audio_pad|><|audio_end|>")
    .replace("<|vision_bos|><|VIDEO|><|vision_eos|>", "<|vision_start|><|video_pad|><|vision_end|>"))
_CHAT_TEMPLATE["qwen3_omni_moe_thinker"] = _CHAT_TEMPLATE["qwen3_omni_moe"]

# Qwen3.5's released template (Qwen/Qwen3.5-27B's chat_template.jinja, also in its
# tokenizer_config.json), less its tool declarations and tool-call rendering: no default system turn;
# content trimmed; Qwen3-VL's video block; a thinking model, so an assistant turn after the last user
# query opens with "<think>\n{reasoning}\n</think>\n\n" (an empty block when it has no reasoning),
# earlier assistant turns are their content alone; the generation prompt opens the thinking block
# ("<think>\n"), or with enable_thinking=False is an empty one ("<think>\n\n</think>\n\n").
_CHAT_TEMPLATE["qwen3_5"] = r"""{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if messages[0].role == 'system' %}
    {%- set content = render_content(messages[0].content, false, true)|trim %}
    {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}
"""
_CHAT_TEMPLATE["qwen3_5_moe"] = _CHAT_TEMPLATE["qwen3_5"]


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


_ROLES = ("user", "system", "assistant")  # single tokens, as in Qwen's vocabulary


def token_ids(kind: str) -> dict[str, int]:
    """Every added token of the tiny `kind` tokenizer (and the role names) with its id."""
    vocab, _ = _bpe()
    ids = {token: len(vocab) + i for i, token in enumerate(_added_tokens(_check(kind)))}
    return ids | {role: vocab[role] for role in _ROLES}


def _check(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {KINDS}")
    return kind


def tiny_tokenizer(kind: str):
    """Qwen2's tokenizer class (Qwen3.5's own for Qwen3.5, the class transformers gives its model types)
    over a tiny byte-level BPE with Qwen's special tokens and chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer, Qwen3_5Tokenizer

    vocab, merges = _bpe()
    ids = token_ids(_check(kind))
    # The added tokens are in the BPE vocabulary too, at their ids: the class adds its special
    # tokens in its own order, and adding keeps the id of a token the vocabulary already has.
    tokenizer_class = Qwen3_5Tokenizer if kind in _QWEN3_5 else Qwen2Tokenizer
    added = {token: ids[token] for token in _added_tokens(kind)}
    tokenizer = tokenizer_class(vocab=vocab | added, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace",
                               model_max_length=32768, chat_template=_CHAT_TEMPLATE[kind],
                               **_TOKEN_ATTRIBUTES[kind])
    specials = _special_tokens(kind)
    tokenizer.add_tokens([AddedToken(t, special=t in specials, normalized=False) for t in added])
    tokenizer.add_special_tokens({"extra_special_tokens": [t for t in specials if t != "<|endoftext|>"]})
    got = dict(zip(ids, tokenizer.convert_tokens_to_ids(list(ids))))
    if got != ids or len(tokenizer) != len(vocab) + len(added):
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


def _qwen2_vl_vision(hidden: int) -> dict:
    # Qwen2-VL's tower names its widths differently: embed_dim inside, hidden_size the merged tokens'
    # (the language model's); every block attends over the whole frame group (no windows).
    return dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=4, hidden_size=hidden)


def _audio(hidden: int) -> dict:
    return dict(encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32, output_dim=hidden,
                num_mel_bins=128, n_window=100, max_source_positions=1500)


# A few experts with a small width (the releases: Qwen3-VL-30B-A3B 128 experts, top-8, width 768 of
# 2048; Qwen3.5-35B-A3B 256 experts, top-8, width 512 of 2048, plus one shared expert of 512). The
# widths are chosen so that no fused expert tensor is square: Qwen3-VL-MoE's release stores them
# transposed, and transformers transposes only what does not already have its parameter's shape.
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[],
            norm_topk_prob=True)


def _qwen3_5_text(kind: str, hidden: int, ids: dict) -> dict:
    """Qwen3.5's hybrid text model: a Gated DeltaNet layer then a gated full-attention layer (the
    releases: 3 linear to 1 full, full_attention_interval 4), partial M-RoPE over a quarter of the
    head. bos and eos are both <|endoftext|> and there is no pad id, as in the releases' text_config."""
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, vocab_size=TEXT_VOCAB_SIZE,
                layer_types=["linear_attention", "full_attention"],
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_conv_kernel_dim=4,
                # a quarter of 32 rotates: 8 dims, 4 frequency pairs over (t, h, w) as the releases' [11, 11, 10]
                rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"], pad_token_id=None)
    if kind == "qwen3_5_moe":  # every layer's MLP is sparse: no dense intermediate_size
        del text["intermediate_size"]
        text |= dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    return text


def interleaved_mrope_sections(pairs: int) -> list[int]:
    """(t, h, w) frequency pairs of Qwen3-VL's interleaved M-RoPE, as 24:20:20 (of 64) as the pairs allow."""
    side = 5 * pairs // 16
    return [pairs - 2 * side, side, side]


# Qwen3-Omni's M-RoPE time scale, in position ids per second of video and audio. The released
# config.json has 13 in both thinker_config and talker_config (Qwen/Qwen3-Omni-30B-A3B-Instruct: as
# transformers 5.7 prints the downloaded config in a model report, and in the configs Megatron-Bridge's
# and vllm-omni's Qwen3-Omni tests copy from it); Qwen3OmniMoeProcessor's default is 13.0 too, but
# the transformers config classes default to 25 (Qwen2.5-Omni's): a config without the key would give
# the thinker positions that disagree with the processor's audio-in-video layout.
QWEN3_OMNI_POSITION_ID_PER_SECONDS = 13


def _qwen3_omni_thinker(ids: dict, hidden: int) -> dict:
    """The thinker config: a MoE text model (the release: 48 layers, 128 experts, top-8, width 768 of
    2048, no shared expert), Qwen3-VL's vision tower with deepstack (27 blocks, levels at 8, 16, 24)
    and the audio tower (32 layers, d_model 1280, 128 mel bins, windows of n_window 50 × 2 frames)."""
    media = dict(audio_token_id=ids["<|audio_pad|>"], image_token_id=ids["<|image_pad|>"],
                 video_token_id=ids["<|video_pad|>"], audio_start_token_id=ids["<|audio_start|>"],
                 # not fields of the config class, but in the release's thinker_config; get_rope_index
                 # reads vision_start_token_id
                 audio_end_token_id=ids["<|audio_end|>"], vision_start_token_id=ids["<|vision_start|>"],
                 vision_end_token_id=ids["<|vision_end|>"])
    # the release's text_config has no bos, eos or pad id (the generation config has them)
    text = dict(_text(hidden), **_MOE, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                # interleaved M-RoPE over (t, h, w) in the releases' [24, 20, 20] of 64 proportions
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                 "mrope_section": interleaved_mrope_sections(hidden // 8), "interleaved": True,
                                 "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    # n_window 50 and n_window_infer 800 as released: the processor counts audio tokens with 13 per
    # full window of 100 frames, which holds only for n_window 50
    audio = dict(encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32, output_dim=hidden,
                 num_mel_bins=128, n_window=50, n_window_infer=800, downsample_hidden_size=16,
                 max_source_positions=1500)
    return dict(text_config=text, vision_config=vision, audio_config=audio, user_token_id=ids["user"],
                position_id_per_seconds=QWEN3_OMNI_POSITION_ID_PER_SECONDS, seconds_per_chunk=2, **media)


# The tiny codec: codes 0..63 (the release's codebook: 2048), and the talker's control codes above them
# in a 128-row codec embedding, as the release's 2148-2157 and speakers 2301-2303 of 3072.
_CODEBOOK = 64
_CODEC_IDS = dict(codec_pad_id=100, codec_bos_id=101, codec_eos_token_id=102, codec_nothink_id=107,
                  codec_think_bos_id=108, codec_think_eos_id=109)
_SPEAKERS = {"chelsie": 125, "ethan": 126, "aiden": 127}


def _qwen3_omni_config(ids: dict, hidden: int):
    """The full Qwen3-Omni config: the thinker, and the smallest talker (a MoE text model with a shared
    expert, a code predictor) and code2wav the config classes allow (one layer each, two code groups,
    one upsampling stage each way). qprep never loads the last two."""
    from transformers import Qwen3OmniMoeConfig

    thinker = _qwen3_omni_thinker(ids, hidden)
    talker_text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, vocab_size=128, num_experts=2, num_experts_per_tok=1,
                       moe_intermediate_size=16, shared_expert_intermediate_size=16, norm_topk_prob=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                        "mrope_section": interleaved_mrope_sections(8), "interleaved": True})
    code_predictor = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, vocab_size=_CODEBOOK, num_code_groups=2,
                          rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    media = {key: thinker[key] for key in ("audio_token_id", "image_token_id", "video_token_id",
                                           "audio_start_token_id", "audio_end_token_id", "vision_start_token_id")}
    talker = dict(text_config=talker_text, code_predictor_config=code_predictor, num_code_groups=2,
                  thinker_hidden_size=hidden,
                  # the thinker layer the talker reads (the release: 24 of 48)
                  accept_hidden_layer=1, spatial_merge_size=2, speaker_id=_SPEAKERS,
                  position_id_per_seconds=QWEN3_OMNI_POSITION_ID_PER_SECONDS, seconds_per_chunk=2,
                  **_CODEC_IDS, **media)
    code2wav = dict(codebook_size=_CODEBOOK, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, num_quantizers=2, upsample_rates=[2],
                    upsampling_ratios=[2], decoder_dim=32, sliding_window=8, max_position_embeddings=256,
                    rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    return Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav,
                              im_start_token_id=ids["<|im_start|>"], im_end_token_id=ids["<|im_end|>"],
                              tts_pad_token_id=ids["<tts_pad>"], tts_bos_token_id=ids["<tts_text_bos>"],
                              tts_eos_token_id=ids["<tts_text_eod>"], system_token_id=ids["system"],
                              user_token_id=ids["user"], assistant_token_id=ids["assistant"])


# Ids of the Omni talker's text markers and of the speaker's text bos: beyond the tokenizer,
# inside the embedding, as in the release (151859-151861 and 151872 of 152064 rows).
_TTS_TEXT_PAD, _TTS_TEXT_START, _TTS_TEXT_END = TEXT_VOCAB_SIZE - 16, TEXT_VOCAB_SIZE - 15, TEXT_VOCAB_SIZE - 14
_SPEAKER_BOS = TEXT_VOCAB_SIZE - 3


def tiny_config(kind: str, hidden: int = 64):
    """The transformers config of a tiny checkpoint of `kind` (see KINDS).

    Every token id in it is the id of that token in `tiny_tokenizer(kind)`.
    """
    import transformers

    ids = token_ids(_check(kind))
    if kind == "qwen3_omni_moe":
        return _qwen3_omni_config(ids, hidden)
    if kind == "qwen3_omni_moe_thinker":
        return transformers.Qwen3OmniMoeThinkerConfig(**_qwen3_omni_thinker(ids, hidden))
    if kind in QWEN3_KINDS:
        media = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        vision = dict(hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
        config_class = getattr(transformers, _CONFIG_CLASSES[kind])
        if kind in _QWEN3_5:
            # Qwen3.5's vision tower has no deepstack (the releases: 27 blocks, deepstack_visual_indexes []).
            return config_class(text_config=_qwen3_5_text(kind, hidden, ids), vision_config=dict(vision, depth=2),
                                **media)
        text = dict(_text(hidden, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                          pad_token_id=ids["<|endoftext|>"]),
                    # interleaved M-RoPE over (t, h, w) in the releases' proportions, [24, 20, 20] of 64
                    # frequency pairs ([4, 2, 2] of the 8 at hidden 64)
                    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                     "mrope_section": interleaved_mrope_sections(hidden // 8), "mrope_interleaved": True})
        if kind == "qwen3_vl_moe":
            text |= _MOE
        # three blocks, deepstack after the first two (the releases: 27 blocks, levels at 8, 16, 24)
        return config_class(text_config=text, vision_config=dict(vision, depth=3, deepstack_visual_indexes=[0, 1]),
                            **media)
    from transformers import Qwen2_5OmniConfig, Qwen2_5_VLConfig, Qwen2VLConfig

    if kind in ("qwen2_5_vl", "qwen2_vl"):
        text = _text(hidden, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                     pad_token_id=ids["<|endoftext|>"])
        config_class, vision = ((Qwen2_5_VLConfig, _vision(hidden)) if kind == "qwen2_5_vl"
                                else (Qwen2VLConfig, _qwen2_vl_vision(hidden)))
        return config_class(text_config=text, vision_config=vision,
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                            # as in the releases' config.json (not read by transformers 5.23)
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
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen3VLProcessor,
    )

    tokenizer = tiny_tokenizer(kind)
    pixels = _pixel_bounds()
    if kind in QWEN3_OMNI_KINDS:
        from transformers import Qwen3OmniMoeProcessor

        return Qwen3OmniMoeProcessor(image_processor=Qwen2VLImageProcessor(**_qwen3_omni_pixels()),
                                     video_processor=_video_processor(kind), feature_extractor=_feature_extractor(),
                                     tokenizer=tokenizer, chat_template=_CHAT_TEMPLATE[kind])
    if kind in QWEN3_KINDS:
        image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                      min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)
        return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=_video_processor(kind),
                                chat_template=_CHAT_TEMPLATE[kind])
    if kind in ("qwen2_5_vl", "qwen2_vl"):
        processor_class = Qwen2_5_VLProcessor if kind == "qwen2_5_vl" else Qwen2VLProcessor
        return processor_class(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                               video_processor=_video_processor(), chat_template=_CHAT_TEMPLATE[kind])
    return Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(**pixels), video_processor=_video_processor(),
                                feature_extractor=_feature_extractor(), tokenizer=tokenizer,
                                chat_template=_CHAT_TEMPLATE[kind])


def _pixel_bounds() -> dict:
    # Small enough for fast tests, large enough for several merged tokens per frame.
    return dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)


def _qwen3_omni_pixels() -> dict:
    # Qwen3-Omni's vision tower takes 16-pixel patches with mean and std 0.5 (as Qwen3-VL's), through
    # Qwen2-VL's image and video processor classes (AutoVideoProcessor maps qwen3_omni_moe to
    # Qwen2VLVideoProcessor, whose bounds are per frame).
    return dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)


def _video_processor(kind: str = "qwen2_5_vl"):
    from transformers import Qwen2VLVideoProcessor, Qwen3VLVideoProcessor

    if kind in QWEN3_OMNI_KINDS:
        return Qwen2VLVideoProcessor(**_qwen3_omni_pixels())
    if kind in QWEN3_KINDS:
        # Qwen3-VL's `longest_edge` is a pixel budget over all of a video's frames, not per frame.
        return Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 4 * 64})
    return Qwen2VLVideoProcessor(**_pixel_bounds())


def _feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300, n_fft=400)


LAYOUTS = ("save_pretrained", "released")
# kind -> the transformers class of the full model (and of its config)
MODEL_CLASSES = {"qwen2_5_omni": "Qwen2_5OmniForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration",
                 "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
                 "qwen3_5": "Qwen3_5ForConditionalGeneration",
                 "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
                 "qwen3_omni_moe": "Qwen3OmniMoeForConditionalGeneration",
                 "qwen3_omni_moe_thinker": "Qwen3OmniMoeThinkerForConditionalGeneration"}
_MODEL_CLASSES = MODEL_CLASSES
_CONFIG_CLASSES = {"qwen3_vl": "Qwen3VLConfig", "qwen3_vl_moe": "Qwen3VLMoeConfig", "qwen3_5": "Qwen3_5Config",
                   "qwen3_5_moe": "Qwen3_5MoeConfig"}


def make_tiny_model(kind: str, out: str | Path, *, seed: int = 0, hidden: int = 64,
                    max_shard_size: str | None = None, layout: str = "save_pretrained",
                    experts: str = "fused") -> Path:
    """Build and save a tiny random `kind` checkpoint (weights, config, tokenizer, processor configs).

    The directory loads offline with `from_pretrained` of the model class and of `AutoProcessor`
    (tokenizer with Qwen's special tokens and chat template; image and video processors; for Omni
    the feature extractor). `max_shard_size` splits the weights over several files with an index,
    like the real releases. `layout` "save_pretrained" is what transformers 5 writes; "released" is
    the file set, config keys and weight key names of the hub repositories (see
    `to_released_layout`; `experts` picks a Qwen3.5-MoE release's expert storage there). Returns the
    directory.
    """
    _check_layout(_check(kind), layout, experts)
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
        if kind == "qwen3_omni_moe":
            # transformers 5.24 initialises the thinker's routed experts but leaves the talker's
            # (Qwen3OmniMoeTalkerTextExperts, torch.empty) as whatever memory they got: two builds
            # with the same seed would differ there.
            with torch.no_grad():
                for name, param in model.talker.named_parameters():
                    if ".mlp.experts." in name:
                        param.normal_(0.0, config.initializer_range)
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
    if kind in ("qwen2_5_omni",) + QWEN3_OMNI_KINDS:
        _feature_extractor().save_pretrained(out)
    if layout == "released":
        to_released_layout(kind, out, experts=experts)
    return out


def _check_layout(kind: str, layout: str, experts: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if experts != "fused" and layout != "released":
        raise ValueError("`experts` chooses between the releases' expert layouts; pass layout='released'")
    if experts != "fused" and kind != "qwen3_5_moe":
        raise ValueError(f"only the Qwen3.5-MoE releases store experts either way, not {kind}")
    if layout == "released" and kind == "qwen3_omni_moe_thinker":
        raise ValueError("no release has the bare thinker's layout (model_type qwen3_omni_moe_thinker); "
                         "make a released qwen3_omni_moe checkpoint and read its thinker.* weights")


# The released repositories' preprocessor_config.json: the image processor's bounds (which the Omni
# processor does not apply to video), and for Omni the Whisper settings in the same file.
_RELEASED_IMAGE_PROCESSOR = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                                 merge_size=2, image_processor_type="Qwen2VLImageProcessor")
_RELEASED_WHISPER = dict(chunk_length=300, dither=0.0, feature_extractor_type="WhisperFeatureExtractor",
                         feature_size=128, hop_length=160, n_fft=400, n_samples=4800000, nb_max_frames=30000,
                         padding_side="right", padding_value=0.0, return_attention_mask=True, sampling_rate=16000)
_RELEASED_PROCESSOR_CLASS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor",
                             "qwen2_5_omni": "Qwen2_5OmniProcessor"}


def to_released_layout(kind: str, out: Path, *, experts: str = "fused") -> None:
    """Rewrite a saved tiny checkpoint into the layout of the hub releases.

    Qwen2-VL-7B-Instruct, Qwen2.5-VL-7B-Instruct, Qwen2.5-Omni-7B: one combined
    `preprocessor_config.json` and no `processor_config.json` or `video_preprocessor_config.json`;
    `chat_template.json`; `vocab.json` + `merges.txt` beside `tokenizer.json`; `config.json` with the
    releases' keys (`torch_dtype`, `rope_theta` + `rope_scaling`, for VL the text settings at the top
    level rather than in `text_config`, for Qwen2-VL its vision_config's own keys, see
    `_released_qwen2_vl_vision`). Weight key names are already the hub's (`visual.*`, `model.*` /
    `thinker.*`).

    Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE: see `_to_released_qwen3` (and `RELEASED_FILES`).
    `experts` ("fused" or "per_expert") is how a Qwen3.5-MoE release stores its routed experts:
    fused 3D tensors as Qwen3.5-35B-A3B, or one tensor per expert and projection as Qwen3.5-397B-A17B.

    Qwen3-Omni-30B-A3B-Instruct: see `_to_released_qwen3_omni`. The bare thinker has no released
    layout: `qwen3_omni_moe_thinker` is a model type of transformers' own (what
    `Qwen3OmniMoeThinkerForConditionalGeneration.save_pretrained` writes), not of a hub repository.
    """
    import json

    from qprep.schemas.settings import CLIP_MEAN, CLIP_STD

    _check_layout(kind, "released", experts)
    if kind in QWEN3_KINDS:
        _to_released_qwen3(kind, Path(out), experts)
        return
    out = Path(out)
    if kind == "qwen3_omni_moe":
        _to_released_qwen3_omni(out)
        return

    config = json.loads((out / "config.json").read_text())
    if kind in ("qwen2_5_vl", "qwen2_vl"):
        text = config.pop("text_config")
        config = {**{k: v for k, v in text.items() if k not in ("model_type", "layer_types")}, **config}
    if kind == "qwen2_vl":
        config["vision_config"] = _released_qwen2_vl_vision(config["vision_config"])
    # the releases' rope_scaling: {"type": "mrope", ...} for VL, {"type": "default", "rope_type": "default", ...} for Omni
    rope_type = "mrope" if kind in ("qwen2_5_vl", "qwen2_vl") else "default"
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


def _released_qwen2_vl_vision(vision: dict) -> dict:
    """Qwen2-VL's vision_config as the releases wrote it (transformers 4.41, Qwen/Qwen2-VL-7B-Instruct):
    no model_type or hidden_act (quick_gelu, the class default), `in_chans` for `in_channels`, and the
    patch size twice, as `patch_size` and `spatial_patch_size`."""
    keys = ("depth", "embed_dim", "mlp_ratio", "num_heads", "hidden_size", "patch_size", "spatial_merge_size",
            "temporal_patch_size")
    return {**{key: vision[key] for key in keys}, "in_chans": vision["in_channels"],
            "spatial_patch_size": vision["patch_size"]}


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


# ---------------------------------------------------------------------------------------------
# Released layouts of the Qwen3 families
#
# Qwen/Qwen3-VL-8B-Instruct (and -30B-A3B-Instruct): config.json, generation_config.json,
# chat_template.json, preprocessor_config.json, video_preprocessor_config.json, tokenizer.json,
# tokenizer_config.json, vocab.json, merges.txt, model-0000K-of-0000N.safetensors +
# model.safetensors.index.json; no processor_config.json. Qwen/Qwen3.5-* (seen for 0.8B, 27B and
# 35B-A3B): the same but chat_template.jinja for chat_template.json, and the weights in
# model.safetensors-0000K-of-0000N.safetensors with an index even for one file (0.8B:
# model.safetensors-00001-of-00001.safetensors; 35B-A3B: ...-00014-of-00014). generation_config.json
# is kept as save_pretrained writes it.

RELEASED_FILES = {
    "qwen3_vl": ("chat_template.json", "config.json", "generation_config.json", "merges.txt",
                 "model.safetensors.index.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "video_preprocessor_config.json", "vocab.json"),
    "qwen3_5": ("chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
                "model.safetensors.index.json", "preprocessor_config.json", "tokenizer.json",
                "tokenizer_config.json", "video_preprocessor_config.json", "vocab.json"),
}
RELEASED_FILES["qwen3_vl_moe"] = RELEASED_FILES["qwen3_vl"]
RELEASED_FILES["qwen3_5_moe"] = RELEASED_FILES["qwen3_5"]

# preprocessor_config.json and video_preprocessor_config.json of the releases (the same in Qwen3-VL
# and Qwen3.5): pixel budgets 256²..4096² per image, 4096..25165824 over a video's frames.
_RELEASED_QWEN3_IMAGE_PROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}
_RELEASED_QWEN3_VIDEO_PROCESSOR = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor"}
# The transformers version each release's config.json names (Qwen3-Omni's not seen: taken to be
# Qwen3-VL's, the source build both needed in September 2025; transformers does not read it).
_RELEASED_TRANSFORMERS_VERSION = {"qwen3_vl": "4.57.0.dev0", "qwen3_vl_moe": "4.57.0.dev0", "qwen3_5": "4.57.1",
                                  "qwen3_5_moe": "4.57.1", "qwen3_omni_moe": "4.57.0.dev0"}
EXPERT_LAYOUTS = ("fused", "per_expert")


def released_weight_file(kind: str, index: int, count: int) -> str:
    """The name of the `index`-th (from 1) of `count` weight files in a `kind` release."""
    if kind in _QWEN3_5:
        return f"model.safetensors-{index:05d}-of-{count:05d}.safetensors"
    return "model.safetensors" if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"


def _to_released_qwen3(kind: str, out: Path, experts: str) -> None:
    """The Qwen3 families' release layout, written over a `save_pretrained` directory.

    Files: `RELEASED_FILES` plus the weight files; processor_config.json goes (the image and video
    processors are preprocessor_config.json and video_preprocessor_config.json with the releases'
    bounds), the chat template is chat_template.json (Qwen3-VL) or chat_template.jinja (Qwen3.5, also
    in tokenizer_config.json), vocab.json + merges.txt are written beside tokenizer.json.

    config.json (see `_released_qwen3_config`): as transformers 4.57 wrote it for the releases.

    Weights: the names transformers 5 gives them (`model.visual.*`, `model.language_model.*`,
    `lm_head.weight`) except that Qwen3-VL-MoE stores its fused experts transposed
    (`mlp.experts.gate_up_proj` (experts, hidden, 2 × width), `mlp.experts.down_proj` (experts,
    width, hidden)); a per-expert Qwen3.5-MoE release splits them into
    `mlp.experts.{e}.{gate,up,down}_proj.weight`; and Qwen3.5 releases carry a multi-token-prediction
    head, `mtp.*` (random here), that transformers' model classes do not have (they ignore it).
    """
    import json

    if experts not in EXPERT_LAYOUTS:
        raise ValueError(f"unknown expert layout {experts!r}; choose from {EXPERT_LAYOUTS}")
    if experts != "fused" and kind != "qwen3_5_moe":
        raise ValueError(f"only the Qwen3.5-MoE releases store experts either way, not {kind}")
    config = json.loads((out / "config.json").read_text())
    _rewrite_released_weights(kind, out, config["text_config"], experts)
    (out / "config.json").write_text(json.dumps(_released_qwen3_config(kind, config), indent=2, sort_keys=True))

    (out / "preprocessor_config.json").write_text(json.dumps(_RELEASED_QWEN3_IMAGE_PROCESSOR, indent=4))
    (out / "video_preprocessor_config.json").write_text(json.dumps(_RELEASED_QWEN3_VIDEO_PROCESSOR, indent=4))
    (out / "processor_config.json").unlink(missing_ok=True)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 262144
    if kind in _QWEN3_5:
        # The releases name Qwen2's class; transformers gives the qwen3_5 model types Qwen3_5Tokenizer
        # whatever the file says (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS).
        tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
        tokenizer_config["chat_template"] = _CHAT_TEMPLATE[kind]
        (out / "chat_template.jinja").write_text(_CHAT_TEMPLATE[kind])
    else:
        (out / "chat_template.jinja").unlink(missing_ok=True)
        (out / "chat_template.json").write_text(json.dumps({"chat_template": _CHAT_TEMPLATE[kind]}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    vocab, merges = _bpe()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _released_qwen3_config(kind: str, config: dict) -> dict:
    """config.json as the Qwen3 releases have it (written by transformers 4.57):

    - no top-level `dtype`; `text_config.dtype` instead;
    - Qwen3-VL: `text_config.rope_theta` + `text_config.rope_scaling` ({"mrope_interleaved",
      "mrope_section", "rope_type"}) for transformers 5's `rope_parameters`, no `pad_token_id`;
      Qwen3-VL-MoE: `num_experts` for `num_local_experts`;
    - Qwen3.5: `rope_parameters` as transformers 5 (with `partial_rotary_factor` in it and beside
      it), and the keys transformers does not read: `attn_output_gate`, `output_gate_type`,
      `full_attention_interval`, `mamba_ssm_dtype`, `mtp_num_hidden_layers`,
      `mtp_use_dedicated_embeddings`, top-level `language_model_only`; `vision_config` with
      `deepstack_visual_indexes: []`;
    - `vision_config.model_type` the model's own type ("qwen3_vl", "qwen3_5_moe", ...; transformers
      maps it to its vision type) and no `vision_config.rope_parameters`.
    """
    config = dict(config)
    dtype = config.pop("dtype", None)
    text = dict(config["text_config"])
    vision = dict(config["vision_config"])
    vision.pop("rope_parameters", None)
    vision["model_type"] = kind
    text.pop("dtype", None)
    text["dtype"] = dtype
    if kind in _QWEN3_5:
        rope = text["rope_parameters"]
        layer_types = text["layer_types"]
        interval = layer_types.index("full_attention") + 1
        text |= dict(attn_output_gate=True, output_gate_type="swish", full_attention_interval=interval,
                     mamba_ssm_dtype="float32", mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False,
                     partial_rotary_factor=rope["partial_rotary_factor"])
        vision["deepstack_visual_indexes"] = []
        config["language_model_only"] = False
    else:
        rope = text.pop("rope_parameters")
        text["rope_theta"] = rope["rope_theta"]
        text["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        text.pop("pad_token_id", None)
        text.pop("sliding_window", None)
        if "num_local_experts" in text:
            text["num_experts"] = text.pop("num_local_experts")
    config["text_config"] = text
    config["vision_config"] = vision
    config["transformers_version"] = _RELEASED_TRANSFORMERS_VERSION[kind]
    return config


def _rewrite_released_weights(kind: str, out: Path, text_config: dict, experts: str) -> None:
    """Rename (and for Qwen3.5 extend) the saved weights as the `kind` release stores them.

    transformers 5.24's `save_pretrained` writes the fused experts of Qwen3-VL-MoE as its modules
    hold them, and those of Qwen3.5-MoE one tensor per expert (it reverts the load-time fusion of
    its conversion mapping, `qwen2_moe`); either is first brought to the modules' fused layout here.
    """
    import json

    from safetensors.torch import load_file, save_file

    if kind == "qwen3_vl":
        return  # already the release's names and files
    index_path = out / "model.safetensors.index.json"
    if index_path.exists():
        names = list(dict.fromkeys(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    # every tensor with the file it is in, in file order
    placed = {key: (i, t) for i, name in enumerate(names) for key, t in load_file(out / name).items()}
    placed = _fused_experts(placed)
    released: dict = {}
    for key, (i, tensor) in placed.items():
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            if kind == "qwen3_vl_moe":
                # (experts, 2 × width, hidden) and (experts, hidden, width) in transformers 5
                released[key] = (i, tensor.transpose(1, 2).contiguous())
                continue
            if experts == "per_expert":
                released |= {k: (i, t) for k, t in _per_expert(key, tensor).items()}
                continue
        released[key] = (i, tensor)
    if kind in _QWEN3_5:
        released |= {k: (len(names) - 1, t) for k, t in _mtp_weights(placed, text_config).items()}
    for name in names:
        (out / name).unlink()
    shards = [{k: t for k, (i, t) in released.items() if i == n} for n in range(len(names))]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = released_weight_file(kind, i, len(shards))
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map |= {key: name for key in shard}
        total += sum(t.numel() * t.element_size() for t in shard.values())
    if len(shards) > 1 or kind in _QWEN3_5:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        index_path.write_text(json.dumps(index, indent=2))


def _fused_experts(placed: dict) -> dict:
    """`...mlp.experts.{e}.{gate,up,down}_proj.weight` (each placed in a file) fused as transformers
    5 loads them: `...mlp.experts.gate_up_proj` = the gates stacked, then the ups stacked, along dim
    1 (experts, 2 × width, hidden); `...mlp.experts.down_proj` stacked (experts, hidden, width). The
    fused tensor goes to the file of its first expert."""
    import re

    import torch

    pattern = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
    groups: dict = {}
    out = {}
    for key, value in placed.items():
        match = pattern.fullmatch(key)
        if match is None:
            out[key] = value
            continue
        prefix, expert, projection = match.group(1), int(match.group(2)), match.group(3)
        if prefix not in groups:
            groups[prefix] = {}
            out[f"{prefix}.gate_up_proj"] = out[f"{prefix}.down_proj"] = None  # keep the place in order
        groups[prefix][projection, expert] = value
    for prefix, parts in groups.items():
        count = 1 + max(e for _, e in parts)
        stack = {name: torch.stack([parts[name, e][1] for e in range(count)]) for name in ("gate_proj", "up_proj",
                                                                                          "down_proj")}
        file = parts["gate_proj", 0][0]
        out[f"{prefix}.gate_up_proj"] = (file, torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1))
        out[f"{prefix}.down_proj"] = (file, stack["down_proj"])
    return out


def _per_expert(key: str, tensor) -> dict:
    """Fused experts as one tensor per expert and projection (`...experts.{e}.gate_proj.weight`)."""
    prefix = key.rsplit(".", 1)[0]
    if key.endswith("gate_up_proj"):  # (experts, 2 × width, hidden): gate rows, then up rows
        gate, up = tensor.chunk(2, dim=1)
        return {f"{prefix}.{e}.{name}.weight": part[e].contiguous()
                for name, part in (("gate_proj", gate), ("up_proj", up)) for e in range(tensor.shape[0])}
    return {f"{prefix}.{e}.down_proj.weight": tensor[e].contiguous() for e in range(tensor.shape[0])}


def _mtp_weights(placed: dict, text_config: dict) -> dict:
    """A random multi-token-prediction head as the Qwen3.5 releases store it: `mtp.fc` (hidden,
    2 × hidden) over the normed embedding and hidden state, `mtp.pre_fc_norm_embedding`,
    `mtp.pre_fc_norm_hidden`, one full-attention decoder layer `mtp.layers.0.*` shaped as the text
    model's own (its MoE experts one tensor per expert, as in every Qwen3.5-MoE release), and
    `mtp.norm`."""
    import torch

    full = text_config["layer_types"].index("full_attention")
    layer = f"model.language_model.layers.{full}."
    hidden = text_config["hidden_size"]
    generator = torch.Generator().manual_seed(1234)
    shapes = {"mtp.fc.weight": (hidden, 2 * hidden), "mtp.pre_fc_norm_embedding.weight": (hidden,),
              "mtp.pre_fc_norm_hidden.weight": (hidden,), "mtp.norm.weight": (hidden,)}
    for key, (_, tensor) in placed.items():
        if not key.startswith(layer):
            continue
        name = "mtp.layers.0." + key[len(layer):]
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            shapes |= {k: tuple(v.shape) for k, v in _per_expert(name, tensor).items()}
        else:
            shapes[name] = tuple(tensor.shape)
    return {key: 0.02 * torch.randn(shape, generator=generator) for key, shape in sorted(shapes.items())}


# ---------------------------------------------------------------------------------------------
# Released layout of Qwen3-Omni
#
# Qwen/Qwen3-Omni-30B-A3B-Instruct holds thinker, talker and code2wav in one checkpoint,
# model-00001-of-00015.safetensors ... model-00015-of-00015.safetensors + model.safetensors.index.json
# (28,010 tensors; a model report of the downloaded directory lists every name and file), beside
# config.json and a combined preprocessor_config.json (Qwen2VLImageProcessor with 16-pixel patches
# and Whisper's settings, processor_class Qwen3OmniMoeProcessor). The other files are taken to be
# Qwen2.5-Omni-7B's (generation_config.json, chat_template.json, tokenizer.json, tokenizer_config.json,
# vocab.json, merges.txt; their list was not seen for this release), less its spk_dict.pt: Qwen3-Omni's
# speakers are talker_config.speaker_id. The weight names are the
# ones transformers 5's save_pretrained writes: `thinker.audio_tower.*`, `thinker.visual.*` (with the
# deepstack mergers `thinker.visual.merger_list.{i}.*`), `thinker.model.*` (the text model),
# `thinker.lm_head.weight`, `talker.*`, `code2wav.*`, and every routed expert one tensor per expert and
# projection (`thinker.model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`, as in the
# release), which transformers' conversion mapping (`qwen3_omni_moe` -> `qwen2_moe`) fuses at load
# and splits again at save.

RELEASED_FILES["qwen3_omni_moe"] = ("chat_template.json", "config.json", "generation_config.json", "merges.txt",
                                    "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                                    "vocab.json")
# preprocessor_config.json of the release, as a study of its fields lists them: the image bounds of
# Qwen2.5-Omni's (3136..12845056 pixels) with Qwen3-VL's patch 16 and mean and std 0.5, and Whisper's
# settings (128 mel bins at 16 kHz, hop 160, 300 s chunks).
_RELEASED_QWEN3_OMNI_PREPROCESSOR = dict(
    min_pixels=3136, max_pixels=12845056, patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
    image_std=[0.5] * 3, image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen3OmniMoeProcessor")


def _to_released_qwen3_omni(out: Path) -> None:
    """Qwen3-Omni's release layout, written over a `save_pretrained` directory: its config.json (see
    `_released_qwen3_omni_config`), the combined preprocessor_config.json (no processor_config.json,
    video_preprocessor_config.json or chat_template.jinja), chat_template.json, vocab.json +
    merges.txt. The weights stay as they are: save_pretrained already writes the release's names and
    per-expert tensors, in model-0000K-of-0000N.safetensors files when sharded."""
    import json

    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(_released_qwen3_omni_config(config), indent=2, sort_keys=True))
    preprocessor = {**_RELEASED_WHISPER, **_RELEASED_QWEN3_OMNI_PREPROCESSOR}
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    for name in ("processor_config.json", "video_preprocessor_config.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": _CHAT_TEMPLATE["qwen3_omni_moe"]}, indent=2))
    vocab, merges = _bpe()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _released_qwen3_omni_config(config: dict) -> dict:
    """config.json as the release has it (transformers 4.57's, the same nesting and token ids; as
    transformers 5.7 prints the downloaded file, and as the configs of Megatron-Bridge's Qwen3-Omni
    tests copy it):

    - `dtype` at the top and in thinker_config;
    - `rope_theta` + `rope_scaling` for transformers 5's `rope_parameters` (the thinker's text
      model: {"interleaved", "mrope_interleaved", "mrope_section", "rope_type", "type"}; the
      talker's: {"interleaved", "mrope_section", "rope_type", "type"}; the code predictor's
      `rope_scaling` null; code2wav `rope_theta` alone), no `vision_config.rope_parameters`;
    - talker_config `model_type` "qwen3_omni_moe_talker" (transformers 5's class has none) and its
      text_config's `num_experts` for `num_local_experts`;
    - keys transformers does not read: the thinker text model's `use_qk_norm`,
      `shared_expert_intermediate_size` 0, `use_sliding_window`; the vision tower's
      `apply_vit_abs_pos_embed`, `image_size`, `in_chans`, `spatial_patch_size`,
      `tokens_per_second`; code2wav's `codebook_dim`, `num_semantic_quantizers`,
      `semantic_codebook_size`, `vector_quantization_hidden_dimension`;
    - `position_id_per_seconds` 13 and `seconds_per_chunk` 2 in thinker_config and talker_config (as
      the tiny config has them already).
    """
    import copy

    config = copy.deepcopy(config)
    thinker, talker, code2wav = config["thinker_config"], config["talker_config"], config["code2wav_config"]
    thinker["dtype"] = config["dtype"]
    text, vision = thinker["text_config"], thinker["vision_config"]
    text |= dict(use_qk_norm=True, shared_expert_intermediate_size=0, use_sliding_window=False)
    vision.pop("rope_parameters", None)
    vision |= dict(apply_vit_abs_pos_embed=True, image_size=768, in_chans=vision["in_channels"],
                   spatial_patch_size=vision["patch_size"], tokens_per_second=2)
    talker["model_type"] = "qwen3_omni_moe_talker"
    talker_text = talker["text_config"]
    talker_text["num_experts"] = talker_text.pop("num_local_experts")
    talker_text["use_sliding_window"] = False
    code2wav |= dict(codebook_dim=512, num_semantic_quantizers=1, semantic_codebook_size=4096,
                     vector_quantization_hidden_dimension=512)
    for sub in (text, talker_text, talker["code_predictor_config"], code2wav):
        rope = sub.pop("rope_parameters")
        sub["rope_theta"] = rope.pop("rope_theta")
        if sub is not code2wav:
            sub["rope_scaling"] = {**rope, "type": rope["rope_type"]} if "mrope_section" in rope else None
    config["transformers_version"] = _RELEASED_TRANSFORMERS_VERSION["qwen3_omni_moe"]
    return config
