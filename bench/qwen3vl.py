"""The Qwen3-VL checkpoint the benches build (bench/extract.py and bench/train.py, `--family qwen3_vl`).

A reduced Qwen3-VL whose vision tower keeps Qwen3-VL-8B's released width (transformers'
`Qwen3VLVisionConfig` defaults and the release's config.json: hidden 1152, MLP 4304, 16 heads,
patch 16, temporal patch 2, merge 2, 2304 position embeddings, out_hidden_size 4096 in the 8B)
with fewer blocks: `depth` blocks and the three deepstack levels at the released indexes scaled to
that depth ([8, 16, 24] of 27 → [2, 5, 8] of 9, [0, 1, 2] of 3), and a small language model. Built
from `qprep.models.tiny.tiny_config("qwen3_vl")` with transformers' real classes and key layout; the
tokenizer, chat template and processor files are those `make_tiny_model("qwen3_vl")` writes.

The text rope's M-RoPE sections are rescaled to the head (the release's [24, 20, 20] of a 128-dim
head; tiny_config's fixed [4, 2, 2] fits only its 16-dim head).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

# Qwen3-VL-8B-Instruct's config.json (vision_config and text_config).
QWEN3_VL_8B = {
    "vision": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                   deepstack_visual_indexes=[8, 16, 24], patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                   num_position_embeddings=2304),
    "text": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
RELEASED_DEPTH = QWEN3_VL_8B["vision"]["depth"]


def deepstack_indexes(depth: int) -> list[int]:
    """The released levels ([8, 16, 24] of 27 blocks) at the same relative depths of `depth` blocks."""
    return sorted({index * depth // RELEASED_DEPTH for index in QWEN3_VL_8B["vision"]["deepstack_visual_indexes"]})


def model_name(vision_depth: int, out_hidden: int, text_layers: int, text_hidden: int) -> str:
    return f"qwen3vl-v{vision_depth}x1152o{out_hidden}-t{text_layers}x{text_hidden}"


def bench_config(vision_depth: int, out_hidden: int, text_hidden: int, text_layers: int):
    """tiny_config("qwen3_vl") with the released vision width at `vision_depth` blocks."""
    from transformers import Qwen3VLConfig

    from qprep.models.tiny import interleaved_mrope_sections, tiny_config

    config = tiny_config("qwen3_vl", hidden=text_hidden).to_dict()
    vision = {k: v for k, v in QWEN3_VL_8B["vision"].items() if k != "depth"}
    config["vision_config"].update(vision, depth=vision_depth, out_hidden_size=out_hidden,
                                   deepstack_visual_indexes=deepstack_indexes(vision_depth))
    text = config["text_config"]
    text["num_hidden_layers"] = text_layers
    text.pop("layer_types", None)  # rebuilt for the new depth
    pairs = text["head_dim"] // 2  # the release's proportions of the head's frequency pairs
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": interleaved_mrope_sections(pairs)}
    return Qwen3VLConfig(**config)


def ensure_model(workdir: Path, vision_depth: int, out_hidden: int, text_hidden: int, text_layers: int,
                 seed: int = 0) -> Path:
    """Build and save the bench checkpoint once (cached in `workdir`)."""
    import torch
    from checkpoints import finish_from_template
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.utils import logging

    from qprep.models.tiny import make_tiny_model

    path = workdir / model_name(vision_depth, out_hidden, text_layers, text_hidden)
    if (path / "config.json").is_file():
        return path
    print(f"building {path.name} …", file=sys.stderr, flush=True)
    partial, template = workdir / ("partial-" + path.name), workdir / "qwen3vl-template"
    for directory in (partial, template):
        shutil.rmtree(directory, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    tiny = make_tiny_model("qwen3_vl", template, hidden=text_hidden)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        torch.manual_seed(seed)
        Qwen3VLForConditionalGeneration(bench_config(vision_depth, out_hidden, text_hidden, text_layers)
                                        ).save_pretrained(partial)
    finally:
        logging.set_verbosity(verbosity)
    return finish_from_template(tiny, partial, path)
