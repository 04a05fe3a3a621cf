"""The Qwen3-Omni checkpoint the benches build (bench/extract.py and bench/train.py, `--family qwen3_omni_moe`).

A reduced `qwen3_omni_moe` checkpoint: the full `Qwen3OmniMoeForConditionalGeneration` (thinker,
talker, code2wav) with transformers' real classes and key layout, built from
`qprep.models.tiny.tiny_config("qwen3_omni_moe")` and saved with `save_pretrained`; the tokenizer,
chat template, processor and feature-extractor files are those `make_tiny_model("qwen3_omni_moe")`
writes. `ensure_model` checks that `AutoProcessor` loads the directory offline and that qprep's
`Checkpoint.tokenizer()` finds a chat template (the tokenizer's own here, `chat_template.jinja`; the
release keeps it beside the processor, `chat_template.json`, where that lookup falls back to).

Its towers keep Qwen3-Omni-30B-A3B-Instruct's released widths, with fewer blocks and layers. Where
the numbers come from: transformers' config class defaults (5.24, configuration_qwen3_omni_moe.py),
checked against the thinker_config of Megatron-Bridge's Qwen3-Omni test
(tests/functional_tests/models/qwen_omni/test_qwen3_omni_moe_generation.py), a copy of the
release's config.json with some vision fields reduced:

* vision (`thinker_config.vision_config`): hidden 1152, 16 heads, MLP 4304, patch 16, temporal
  patch 2, merge 2, 2304 position embeddings, 27 blocks with deepstack levels at [8, 16, 24]: all
  `Qwen3OmniMoeVisionEncoderConfig` defaults. The Megatron-Bridge copy has depth 27, MLP 4304,
  patch 16, temporal patch 2 and merge 2 too (its hidden 288, 2 heads and levels [1, 2, 3] are
  reduced, and it leaves the position embeddings at the default). Here `vision_depth` blocks, the
  three levels at the released relative depths ([8, 16, 24] of 27 -> [2, 5, 8] of 9, [0, 1, 2] of 3).
* audio (`thinker_config.audio_config`): d_model 1280, 20 heads, FFN 5120, 128 mel bins, n_window
  50, n_window_infer 800, downsample_hidden_size 480, conv_chunksize 500, 32 layers: all
  `Qwen3OmniMoeAudioEncoderConfig` defaults, and all as in the Megatron-Bridge copy (not reduced
  there). Here `audio_layers` layers.
* output width: `out_hidden_size` (vision) and `output_dim` (audio) are 2048 in the release (both
  in the Megatron-Bridge copy; they must equal the thinker's text hidden size, 2048 in the 30B-A3B),
  where the config classes default both to 3584 (Qwen2.5-Omni-7B's width): the classes' defaults
  are not the release's here, and 2048 is what this module uses as released. Where a bench runs
  the language model (training) the merged tokens go into it, so there the output width is the
  language model's (`out_hidden` = `text_hidden`), as bench/qwen3vl.py does for Qwen3-VL;
  extraction never runs the language model and keeps 2048.

The thinker's language model is a small MoE (the release: 48 layers, hidden 2048, 32 heads, 4 KV
heads, head 128, 128 experts, top 8, expert width 768): `text_layers` layers of `text_hidden`, 8
experts, top 2, expert width 3/8 of the hidden (768 of 2048), tiny_config's heads (4 heads, 2 KV, head
`text_hidden` / 4). Its interleaved M-RoPE sections are rescaled to the head
(`interleaved_mrope_sections`: the release's [24, 20, 20] of a 128-dim head). The talker and
code2wav stay as small as tiny_config makes them (their `thinker_hidden_size` follows the text
hidden): extraction and training never read them.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

# Qwen3-Omni-30B-A3B-Instruct's config.json (thinker_config.vision_config, audio_config, text_config).
QWEN3_OMNI_30B = {
    "vision": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                   temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304, out_hidden_size=2048,
                   deepstack_visual_indexes=[8, 16, 24]),
    "audio": dict(encoder_layers=32, d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128,
                  output_dim=2048, n_window=50, n_window_infer=800, downsample_hidden_size=480, conv_chunksize=500),
    "text": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                 num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
}
RELEASED_DEPTH = QWEN3_OMNI_30B["vision"]["depth"]
RELEASED_OUT = QWEN3_OMNI_30B["vision"]["out_hidden_size"]
EXPERTS, EXPERTS_PER_TOKEN = 8, 2


def deepstack_indexes(depth: int) -> list[int]:
    """The released levels ([8, 16, 24] of 27 blocks) at the same relative depths of `depth` blocks."""
    return sorted({index * depth // RELEASED_DEPTH for index in QWEN3_OMNI_30B["vision"]["deepstack_visual_indexes"]})


def model_name(vision_depth: int, audio_layers: int, out_hidden: int, text_layers: int, text_hidden: int) -> str:
    return f"qwen3omni-v{vision_depth}x1152-a{audio_layers}x1280-o{out_hidden}-t{text_layers}x{text_hidden}"


def bench_config(vision_depth: int, audio_layers: int, out_hidden: int, text_hidden: int, text_layers: int):
    """tiny_config("qwen3_omni_moe") with the released tower widths at the given depths."""
    from transformers import Qwen3OmniMoeConfig

    from qprep.models.tiny import interleaved_mrope_sections, tiny_config

    config = tiny_config("qwen3_omni_moe", hidden=text_hidden).to_dict()
    thinker = config["thinker_config"]
    vision = {k: v for k, v in QWEN3_OMNI_30B["vision"].items() if k != "depth"}
    thinker["vision_config"].update(vision, depth=vision_depth, out_hidden_size=out_hidden,
                                    deepstack_visual_indexes=deepstack_indexes(vision_depth))
    thinker["audio_config"].update(QWEN3_OMNI_30B["audio"], encoder_layers=audio_layers, output_dim=out_hidden)
    text = thinker["text_config"]
    text.update(num_hidden_layers=text_layers, num_experts=EXPERTS, num_experts_per_tok=EXPERTS_PER_TOKEN,
                moe_intermediate_size=max(8, 3 * text_hidden // 8))
    text.pop("layer_types", None)  # rebuilt for the new depth
    pairs = text["head_dim"] // 2  # the release's proportions of the head's frequency pairs
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": interleaved_mrope_sections(pairs)}
    return Qwen3OmniMoeConfig(**config)


def ensure_model(workdir: Path, vision_depth: int, audio_layers: int, out_hidden: int, text_hidden: int,
                 text_layers: int, seed: int = 0) -> Path:
    """Build and save the bench checkpoint once (cached in `workdir`)."""
    import torch
    from checkpoints import finish_from_template
    from transformers import Qwen3OmniMoeForConditionalGeneration
    from transformers.utils import logging

    from qprep.models.tiny import make_tiny_model

    path = workdir / model_name(vision_depth, audio_layers, out_hidden, text_layers, text_hidden)
    if (path / "config.json").is_file():
        return path
    print(f"building {path.name} …", file=sys.stderr, flush=True)
    partial, template = workdir / ("partial-" + path.name), workdir / "qwen3omni-template"
    for directory in (partial, template):
        shutil.rmtree(directory, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    tiny = make_tiny_model("qwen3_omni_moe", template, hidden=text_hidden)
    config = bench_config(vision_depth, audio_layers, out_hidden, text_hidden, text_layers)
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # the token ids of transformers' default sub-configs, as in tiny.py
    logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # the talker's unused zero-width layers
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            model = Qwen3OmniMoeForConditionalGeneration(config)
        with torch.no_grad():  # left uninitialised by transformers 5.24 (see make_tiny_model)
            for name, param in model.talker.named_parameters():
                if ".mlp.experts." in name:
                    param.normal_(0.0, config.initializer_range)
        model.save_pretrained(partial)
        del model
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    return finish_from_template(tiny, partial, path, check=_has_chat_template)


def _has_chat_template(checkpoint: Path) -> None:
    from qprep.models.checkpoint import open_checkpoint

    if not open_checkpoint(checkpoint).tokenizer().chat_template:  # qprep's own lookup (processor's template)
        raise RuntimeError(f"{checkpoint}: no chat template reachable")
