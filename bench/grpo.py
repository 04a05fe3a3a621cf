"""Benchmark: one GRPO step from the cache against the same step as the TRL-derived trainers run it
(Time-R1, TimeZero, VideoChat-R1), on this machine's CPU or its GPU (--device cuda: bfloat16 there).

What is compared, for --prompts prompts (one video each) and G = --generations completions per prompt:

* qprep: one optimizer step of `qprep train --method grpo` (its recipe set up as `qprep train` sets it
  up, β > 0 so the reference forward runs): for each prompt, G completions sampled from the cached
  tokens, the policy forward with gradients and the reference forward (adapter disabled) over the
  prompt and its completions, the backward, the optimizer step. No tower runs.
* the TRL-derived step: the same language-model work, plus the vision tower as those trainers run it
  (DESIGN.md §13): once on the prompt's video in `generate`, then on `pixel_values_videos.repeat(G, 1)`
  in the policy forward and again in the reference forward, 1 + 2G tower passes per prompt. Their
  cost is measured by calling the checkpoint's own tower (transformers' `get_video_features`) on the
  processor's pixels of the same video, alone and G times in one call, and added to qprep's step.
  The run stops if that pass returns another number of merged tokens than the cache holds.

The model: Qwen2.5-VL-7B's vision tower at its released width (1280 wide, 16 heads, windowed
attention) with --vision-depth of its 32 blocks (bench/towers.py builds it; the FLOPs are also given
for all 32), merging into a language model of --text-layers × --text-hidden (default 2 × 64) in the
tiny checkpoint's proportions (4 heads, an MLP twice its width). The tower's FLOPs are counted by
torch's `FlopCounterMode` on one pass.

Where: --device (default cuda when there is one). On CPU everything is float32; on cuda both sides
run in bfloat16, as qprep chooses there: the cache extracted on the GPU in bfloat16, qprep's recipe
with dtype bfloat16 (what `qprep train` does on a GPU), the full model loaded in bfloat16 for the
tower passes, its pixels already on the GPU. Every timed part is bracketed by torch.cuda.synchronize().

Reproduce (from the repository root, with the virtualenv active; the checkpoint is cached in --workdir):

    python bench/grpo.py --device cpu         # 2 prompts, G 8, 4 of 32 vision blocks, 8 frames 448x336
    python bench/grpo.py --device cpu --prompts 1 --generations 2 --vision-depth 1 --frames 4   # smoke run
    python bench/grpo.py --device cuda --vision-depth 32 --text-hidden 1024 --text-layers 8   # as make gpu-check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import environment  # noqa: E402
from towers import QWEN2_5_VISION, TEXT_HIDDEN, TEXT_LAYERS, ensure_qwen2_5  # noqa: E402

RELEASED_DEPTH = 32


def parse(argv):
    from qprep.schemas.dtypes import compute_dtype

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qprep-bench-grpo"))
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where both sides run (default: cuda when "
                                                                  "available; bfloat16 there, float32 on CPU)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--vision-depth", type=int, default=4, help=f"vision blocks built, of the released "
                                                                    f"{RELEASED_DEPTH}")
    parser.add_argument("--text-hidden", type=int, default=TEXT_HIDDEN,
                        help="the language model's width (the tower merges into it)")
    parser.add_argument("--text-layers", type=int, default=TEXT_LAYERS, help="the language model's layers")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--width", type=int, default=448)
    parser.add_argument("--height", type=int, default=336)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = compute_dtype(args.device)  # what `qprep train` and `qprep extract` choose on that device
    return args


def synchronized(device: str) -> float:
    """`time.perf_counter()` once the device's queued work is done (GPU kernels run asynchronously)."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def sampling(args) -> dict:
    """How both sides read the video: fps 2, its frames at their own size (the tiny checkpoint's
    processor bounds would shrink them)."""
    return {"fps": 2, "max_pixels": args.width * args.height}


def prepare(args) -> tuple[str, Path, Path]:
    """The bench checkpoint (its tower merging into the language model's width), a video, its store."""
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.schemas.settings import VideoSettings
    from qprep.synth import VideoSpec, make_video

    released = {"vision": dict(QWEN2_5_VISION, out_hidden_size=args.text_hidden)}
    model = str(ensure_qwen2_5(args.workdir, "qwen2_5_vl", released, args.vision_depth, 0, args.text_hidden,
                               args.text_layers))
    # a folder per clip size: the folder is what is extracted, and a run at other sizes must not reuse it
    video = args.workdir / f"videos-{args.frames}x{args.width}x{args.height}" / "clip.mp4"
    seconds = args.frames / 2
    if not video.is_file():
        make_video(video, VideoSpec(width=args.width, height=args.height, fps=25, seconds=seconds, audio=False))
    store = args.workdir / f"store-{Path(model).name}-{args.frames}x{args.width}x{args.height}-{args.dtype}.zarr"
    if not (store / "manifest").exists():
        extract(video.parent, store, model, VideoSettings(**sampling(args)), dtype=args.dtype, shards=1,
                options=ExtractOptions(progress=False, executor="local", device=args.device))
    return model, video, store


def cache_step(args, model: str, store: Path) -> float:
    """Seconds of one GRPO optimizer step from the cache (rollouts, policy and reference forwards,
    backward, optimizer step), after one step of warm-up."""
    from qprep.schemas.training import GrpoSettings, LoraSettings, TrainSettings
    from qprep.train.loop import Recipe
    from qprep.train.objectives.grpo import GRPOObjective

    records = [{"id": "clip", "conversations": [{"from": "human", "value": f"<video> When does event {n} happen?"},
                                                {"from": "gpt", "value": "From 1.0 to 2.0."}]}
               for n in range(args.prompts)]
    data = args.workdir / "prompts.json"
    data.write_text(json.dumps(records))
    # No loader workers: the step reads its prompts from the cache itself (on a GPU `qprep train` reads
    # ahead in two worker processes, so this only counts against qprep).
    settings = TrainSettings(epochs=2, batch_size=args.prompts, grad_accum=1, workers=0, report_to=("none",),
                             gradient_checkpointing=False, dtype=args.dtype,
                             lora=LoraSettings(r=8, alpha=16, dropout=0.0),
                             method="grpo", grpo=GrpoSettings(num_generations=args.generations, beta=0.04,
                                                              max_new_tokens=args.new_tokens))
    recipe = Recipe(GRPOObjective(settings), settings, device=args.device, progress=False, echo=lambda line: None)
    recipe.setup(store, data, model, args.workdir / "run")
    try:
        times = []
        for batches in recipe.steps:  # one step per epoch: the first warms up
            started = synchronized(args.device)
            shares = recipe.objective.start_step(batches, recipe.peft_model, recipe.world, 0)
            for position, share in zip(batches, shares):
                recipe._train_batch(position, share)
            times.append(synchronized(args.device) - started)
    finally:
        recipe.cleanup()
    return times[-1]


def tower_passes(args, model: str, video: Path) -> tuple[float, float, float, int]:
    """Seconds of the tower on the prompt's video alone and on G copies in one call (what the policy and
    reference forwards run), the FLOPs of one pass and the merged tokens it returns."""
    import qprep
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = args.device
    prepared = qprep.preprocess_video(video, model, **sampling(args))
    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=getattr(torch, args.dtype)).eval().to(device)
    # the processor's normalised pixels, on the device before the clock starts (the trainers move a
    # batch's inputs there once; the repeat for the G completions runs there)
    pixels, grid = prepared.pixel_values_videos.to(device), prepared.video_grid_thw.to(device)
    g = args.generations

    def run(copies: int) -> float:
        started = synchronized(device)
        with torch.no_grad():
            full.model.get_video_features(pixels.repeat(copies, 1), grid.repeat(copies, 1))
        return synchronized(device) - started

    for copies in (1, g):  # warm-up at both shapes (on a GPU the first call at a shape also picks its kernels)
        run(copies)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        output = full.model.get_video_features(pixels, grid)
    return run(1), run(g), float(counter.get_total_flops()), int(output.pooler_output[0].shape[0])


def main(argv=None) -> int:
    from qprep import open_cache

    args = parse(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, video, store = prepare(args)
    ours = cache_step(args, model, store)
    alone, copies, flops, tokens = tower_passes(args, model, video)
    cached = open_cache(store)["clip"].video_tokens.shape[0]
    if tokens != cached:  # the two sides would not be stepping on the same video
        raise SystemExit(f"the tower pass returned {tokens} merged tokens, the cache holds {cached}")
    g, p = args.generations, args.prompts
    towers = p * (alone + 2 * copies)
    theirs = ours + towers
    full_depth = flops * RELEASED_DEPTH / args.vision_depth  # the blocks dominate; the merger is counted once more
    where = "bfloat16 on cuda" if args.device == "cuda" else "float32 on CPU"
    facts = environment(args.workdir, ("torch", "transformers", "peft"))
    if args.device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(facts, indent=2))
    print(f"\nOne GRPO step, {p} prompts × G {g}, {args.new_tokens} new tokens, β 0.04, a {args.frames}-frame "
          f"{args.width}x{args.height} video; Qwen2.5-VL-7B's tower at {args.vision_depth} of 32 blocks, a "
          f"{args.text_layers} × {args.text_hidden} language model, {where}\n")
    print("| | step (s) | tower passes per step | tower TFLOPs per step |")
    print("| --- | --- | --- | --- |")
    print(f"| qprep, from the cache | {ours:.2f} | 0 | 0 |")
    print(f"| TRL-derived (tower 1 + 2G per prompt) | {theirs:.2f} | {p * (1 + 2 * g)} | "
          f"{p * (1 + 2 * g) * flops / 1e12:.2f} |")
    print(f"\nstep time ratio {theirs / ours:.2f}x; tower FLOPs avoided per step: {p * (1 + 2 * g) * flops / 1e12:.2f} "
          f"TFLOPs at {args.vision_depth} blocks, ~{p * (1 + 2 * g) * full_depth / 1e12:.1f} TFLOPs at all 32 "
          f"(one pass: {tokens} merged tokens, {flops / 1e9:.1f} GFLOPs; alone {alone:.2f} s, G copies "
          f"{copies:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
