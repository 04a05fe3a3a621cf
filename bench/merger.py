"""What training the merger costs, at the released widths, on the CPU.

For Qwen2.5-VL-7B and Qwen3-VL-8B (vision width, merged width, deepstack levels and decoder layer
shapes as released): the bytes per merged visual token of a store at each level, and the time of one
training step's parts for a sample of `--tokens` merged visual tokens and `--text` text tokens:

* the mergers on the cached input, forward only (frozen: `--train-merger none`);
* the mergers forward and backward into their parameters (`--train-merger full`);
* one decoder layer of the language model, its weights frozen, forward and backward through its
  activations (what a LoRA step runs in every layer), times the released layer count: the step both
  runs share.

Built with the families' own transformers classes (`Merger` on the vision class, the text class
with one layer) and random weights: the time depends on the shapes, not the values. The full
language model at these widths does not fit a small CPU run, hence one layer times the count.

    python bench/merger.py --tokens 256 --text 64
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import torch

RELEASED = {
    # vision width, merged width (= text hidden), text layers, intermediate, heads, kv heads, deepstack levels
    "qwen2_5_vl (7B)": dict(family="qwen2_5_vl", vision=1280, hidden=3584, layers=28, intermediate=18944, heads=28,
                            kv=4, deepstack=0, mrope=[16, 24, 24]),
    "qwen3_vl (8B)": dict(family="qwen3_vl", vision=1152, hidden=4096, layers=36, intermediate=12288, heads=32,
                          kv=8, deepstack=3, mrope=[24, 20, 20]),
}


def configs(spec: dict):
    from qprep.models.tiny import tiny_config

    config = tiny_config(spec["family"])
    vision = config.vision_config
    vision.hidden_size, vision.depth = spec["vision"], max(spec["deepstack"], 1)
    vision.out_hidden_size = spec["hidden"]
    vision.intermediate_size = 4 * spec["vision"]
    if spec["deepstack"]:
        vision.deepstack_visual_indexes = list(range(spec["deepstack"]))
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = spec["hidden"], spec["intermediate"], 1
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = spec["heads"], spec["kv"], 128
    text.rope_parameters = {**text.rope_parameters, "mrope_section": spec["mrope"]}
    return config


def mergers(spec: dict, config):
    from qprep.models.families import FAMILIES

    family = FAMILIES[spec["family"]]
    with torch.device("meta"):
        visual = getattr(importlib.import_module(family.module), family.vision_class)._from_config(config.vision_config)
    parts = torch.nn.ModuleList([visual.merger, *(getattr(visual, "deepstack_merger_list", None) or [])])
    parts.to_empty(device="cpu")
    return parts.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)


def decoder_layer(spec: dict, config):
    from qprep.models.families import FAMILIES

    family = FAMILIES[spec["family"]]
    text = getattr(importlib.import_module(family.module), family.text_class)._from_config(config.text_config)
    return text.requires_grad_(False)  # frozen base (LoRA's adapters are a rounding error of its cost)


def timed(step, repeats: int) -> float:
    step()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def bench(name: str, spec: dict, tokens: int, text_tokens: int, repeats: int) -> dict:
    config = configs(spec)
    parts = mergers(spec, config)
    inputs = [torch.randn(tokens * 4, spec["vision"]) for _ in parts]

    def frozen():
        with torch.no_grad():
            for merger, x in zip(parts, inputs):
                merger(x)

    def trained():
        loss = sum(merger(x).float().sum() for merger, x in zip(parts, inputs))
        loss.backward()

    model = decoder_layer(spec, config)
    length = tokens + text_tokens
    embeds = torch.randn(1, length, spec["hidden"], requires_grad=True)
    positions = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)

    def layer():
        model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state.sum().backward()

    merger_frozen, merger_trained = timed(frozen, repeats), timed(trained, repeats)
    step = timed(layer, 1) * spec["layers"]
    levels = 1 + spec["deepstack"]
    return {"model": name, "bytes_per_token": {"merged": spec["hidden"] * 2 * levels,
                                               "merger-input": 4 * spec["vision"] * 2 * levels},
            "merger_frozen_s": round(merger_frozen, 4), "merger_trained_s": round(merger_trained, 4),
            "language_model_step_s": round(step, 2),
            "trained_vs_frozen_step": round((step + merger_trained) / (step + merger_frozen), 4),
            "trained_vs_merged_store_step": round((step + merger_trained) / step, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="merged visual tokens per sample")
    parser.add_argument("--text", type=int, default=64, help="text tokens per sample")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    for name, spec in RELEASED.items():
        print(json.dumps(bench(name, spec, args.tokens, args.text, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
