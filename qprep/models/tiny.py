"""Tiny checkpoints with random weights and the real structure, for the demo and the tests.

They are built with transformers' own model classes and saved with `save_pretrained`, so the files
have the real key layout (`thinker.visual.*`, `thinker.audio_tower.*`, `thinker.model.*`,
`talker.*`, `token2wav.*` for Omni; `visual.*`, `model.*` for VL) and the real config and
preprocessor files. Only the widths and depths are small.
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("qwen2_5_omni", "qwen2_5_vl")

_ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [1, 1, 2]}


def _text(hidden: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=hidden // 4, vocab_size=151936, rope_parameters=dict(_ROPE))


def _vision(hidden: int) -> dict:
    # window_size 112 = 4×4 merged tokens per window: windowed and full-attention blocks both run.
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden,
                fullatt_block_indexes=[1], window_size=112)


def _audio(hidden: int) -> dict:
    return dict(encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32, output_dim=hidden,
                num_mel_bins=128, n_window=100, max_source_positions=1500)


def tiny_config(kind: str, hidden: int = 64):
    """The transformers config of a tiny checkpoint of `kind` (see KINDS)."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5_VLConfig

    if kind == "qwen2_5_vl":
        return Qwen2_5_VLConfig(text_config=_text(hidden), vision_config=_vision(hidden))
    if kind == "qwen2_5_omni":
        talker = dict(_text(32), embedding_size=hidden, vocab_size=8448, num_hidden_layers=1)
        token2wav = dict(
            dit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16, emb_dim=16,
                            enc_emb_dim=16, enc_dim=16, enc_attention_channels=8, enc_se_channels=8, ff_mult=1),
            bigvgan_config=dict(upsample_initial_channel=32, resblock_kernel_sizes=[3],
                                resblock_dilation_sizes=[[1, 3, 5]]),
        )
        thinker = dict(text_config=_text(hidden), vision_config=_vision(hidden), audio_config=_audio(hidden))
        return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav)
    raise ValueError(f"unknown tiny model kind {kind!r}; choose from {KINDS}")


def make_tiny_model(kind: str, out: str | Path, *, seed: int = 0, hidden: int = 64,
                    max_shard_size: str | None = None) -> Path:
    """Build and save a tiny random `kind` checkpoint (weights, config, preprocessor configs).

    `max_shard_size` splits the weights over several files with an index, like the real releases.
    Returns the directory.
    """
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
    from transformers import Qwen2VLVideoProcessor, WhisperFeatureExtractor
    from transformers.utils import logging

    out = Path(out)
    model_class = Qwen2_5OmniForConditionalGeneration if kind == "qwen2_5_omni" else Qwen2_5_VLForConditionalGeneration
    config = tiny_config(kind, hidden)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the tiny vocabularies make transformers warn about token ids
    try:
        torch.manual_seed(seed)
        model = model_class(config)
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    # Pixel bounds small enough for fast tests, large enough for several merged tokens per frame.
    Qwen2VLVideoProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64).save_pretrained(out)
    if kind == "qwen2_5_omni":
        # The full Omni model's from_pretrained also loads the talker's speaker table.
        torch.save({"Chelsie": {"bos_token": 151872, "cond": torch.zeros(1, 192), "ref_mel": torch.zeros(1, 30, 80)}},
                   out / "spk_dict.pt")
        WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300,
                                n_fft=400).save_pretrained(out)
    return out
