"""Benchmark: several images per vision-tower call, and whether an image's tokens then depend on which
images ran with it, bit for bit.

`qprep extract` calls the vision tower one medium per call (`Budget()`), so that a store's bytes never
depend on which media a run held together. Thousands of small images one per call leave a GPU idle.
This compares, on the same images, three ways of calling Qwen2.5-VL-7B's vision tower:

* (a) one image per call: what qprep does today, the reference for every bit check;
* (b) N images concatenated in one call: pixel_values concatenated, image_grid_thw stacked (the
  tower's cu_seqlens keep attention within each image, its window index keeps windows within each
  image); consecutive images, N = --concat (4 and 16);
* (c) fixed-shape calls: images packed greedily into calls of exactly --budget patch rows, the rest
  of each call filled with filler images of zeros (grids (1, 8, 8), one 8x8-patch window each, and
  one (1, 2, r/2) for the remainder: every image's patch count is a multiple of 4 for the 2x2
  merge, so r is too), so that every call has the same shape and runs the same GEMM and
  convolution shapes. Run in two compositions: the images in order, and shuffled (seed 1), so that
  an image has other batch-mates at another offset in its call.

For each image: are its merged tokens (`get_image_features(...).pooler_output`, as qprep stores them)
from (b) and (c) bitwise equal (torch.equal) to (a)'s, and (c)'s equal across the two compositions?
Where not, the largest absolute difference is shown. images/s: the images of a size over the median
(of --repeats) time of all of that mode's calls on them; the modes take turns within each repeat, so
that others' load on the machine spreads over all of them ("passes s" lists every pass).

A probe of the single operations that see the whole call (patch embedding's Conv3d, the blocks' and
the merger's Linear layers, RMSNorm) then says which of them, if any, give an image's rows other bits
when the call holds other rows: one image alone, two images concatenated, and the fixed budget with
the image at offset 0 and after another image.

The model: Qwen2.5-VL-7B's vision tower at its released width (1280 wide, MLP 3420, 16 heads,
patch 14, merge 2, 112-pixel windows, out 3584) built by bench/towers.py with --vision-depth of its 32
blocks, random weights, float32 on CPU, SDPA attention (as `qprep extract` runs it on CPU), loaded
alone as qprep loads it (`qprep.pipeline.towers.Towers`) and called through the model class's own
`get_image_features`. bench/towers.py maps the released full-attention blocks [7, 15, 23, 31] to
relative depths, which at 2 blocks makes both blocks full-attention and never runs the windowed
attention; this bench copies that checkpoint with `fullatt_block_indexes` set as released for 32
blocks, or to the last block alone below 8 blocks ([1] of 2: one windowed, one full block), so both
kinds of attention run. The image processor has the released bounds (3136–12845056 pixels), as in
bench/images.py; pixel_values and image_grid_thw come from the checkpoint's own AutoProcessor.

Images (generated, smooth gradients with noise): "small" 448x448 (1024 patches, 256 tokens) and
336x504 (864 patches, 216 tokens), alternating; "real" 1280x720 (1288x728: 4784 patches) and
1024x768 (1036x756: 3996 patches), alternating.

Reproduce (from the repository root, with the virtualenv active; the checkpoint is cached in
--workdir):

    python bench/tower_calls.py --threads 1
    python bench/tower_calls.py --threads 2
    python bench/tower_calls.py --small-images 8 --real-images 0 --repeats 1   # a quick look
    python bench/tower_calls.py --device cuda --vision-depth 32                # one GPU, bfloat16

The last run of each thread count saves its one-per-call tokens in --workdir; a run with 1 (2) threads
compares its own with those of the last run with 2 (1), bit for bit.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # qprep from this checkout

from machine import environment, system_busy_s  # noqa: E402
from extract import markdown  # noqa: E402
from images import ensure_model  # noqa: E402
from towers import RELEASED_FULL_ATTENTION  # noqa: E402

SIZES = {"small": ((448, 448), (336, 504)), "real": ((1280, 720), (1024, 768))}
FILLER_GRID = (1, 8, 8)  # one 112-pixel window of zeros


# ---------------------------------------------------------------------------------------------
# Checkpoint, tower, images


def windowed_checkpoint(built: Path, depth: int) -> Path:
    """A copy of `built` whose vision tower has windowed blocks as released: full attention at
    [7, 15, 23, 31] of 32 blocks, below 8 blocks at the last block alone. The weights are linked."""
    blocks = [i for i in RELEASED_FULL_ATTENTION if i < depth] or [depth - 1]
    path = built.parent / f"{built.name}-full{'-'.join(map(str, blocks))}"
    if not (path / "config.json").is_file():
        partial = built.parent / f"partial-{path.name}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for item in built.iterdir():
            if item.suffix == ".safetensors":
                (partial / item.name).symlink_to(item.resolve())
            else:
                shutil.copy2(item, partial / item.name)
        config = json.loads((partial / "config.json").read_text())
        config["vision_config"]["fullatt_block_indexes"] = blocks
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        partial.rename(path)
    return path


def load_tower(checkpoint: Path, device: str):
    """The vision tower as `qprep extract` loads it: float32 on CPU, bfloat16 on cuda, SDPA."""
    from qprep.models.checkpoint import open_checkpoint
    from qprep.pipeline.towers import Towers
    from qprep.schemas.settings import load_model_spec

    return Towers(open_checkpoint(str(checkpoint)), load_model_spec(str(checkpoint)),
                  dtype="bfloat16" if device == "cuda" else "float32", device=device, attn_implementation="sdpa")


def picture(width: int, height: int, index: int):
    """bench/images.py's photo: a smooth gradient with noise."""
    from PIL import Image

    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * (index + 3)) % 256, (y * 2 + index) % 256, ((x + y) // 3) % 256], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


@dataclass
class Image:
    name: str
    pixels: torch.Tensor  # float32 [patches, 3·2·14·14], as the processor returns them
    grid: tuple[int, int, int]


def prepare(processor, kind: str, count: int) -> list[Image]:
    out = []
    for index in range(count):
        width, height = SIZES[kind][index % 2]
        inputs = processor.image_processor(images=[picture(width, height, index)], return_tensors="pt")
        grid = tuple(inputs["image_grid_thw"][0].tolist())
        out.append(Image(f"{kind}-{index:02d} {width}x{height}", inputs["pixel_values"].float(), grid))
    return out


# ---------------------------------------------------------------------------------------------
# Calls


def tower_call(tower, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """One call of the model's own get_image_features: each entry's merged tokens."""
    with torch.inference_mode():
        output = tower.get_image_features(pixels, torch.tensor(grids, dtype=torch.int64))
    return list(output.pooler_output)


def fillers(rows: int, patch_dim: int) -> list[tuple[tuple[int, int, int], int]]:
    """Filler images of zeros making up `rows` patch rows: (1, 8, 8) windows, then (1, 2, r/2)."""
    unit = FILLER_GRID[1] * FILLER_GRID[2]
    out = [(FILLER_GRID, unit)] * (rows // unit)
    if rows % unit:
        out.append(((1, 2, (rows % unit) // 2), rows % unit))
    return out


@dataclass
class Plan:
    """A mode's calls: each a list of image indices (in call order) plus its filler rows."""

    label: str
    mode: str
    groups: list[list[int]]
    filler: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.mode} {self.label}"


def greedy(sizes: list[int], order: list[int], budget: int) -> list[list[int]]:
    groups, total = [], 0
    for index in order:
        if sizes[index] > budget:
            raise SystemExit(f"an image of {sizes[index]} patches is over --budget {budget}")
        if groups and total + sizes[index] <= budget:
            groups[-1].append(index)
            total += sizes[index]
        else:
            groups.append([index])
            total = sizes[index]
    return groups


def plans(images: list[Image], concat: list[int], budget: int) -> list[Plan]:
    count = len(images)
    sizes = [image.pixels.shape[0] for image in images]
    out = [Plan("1", "(a) one image per call", [[i] for i in range(count)])]
    for n in concat:
        if n <= count:
            calls = [list(range(start, min(start + n, count))) for start in range(0, count, n)]
            out.append(Plan(str(n), "(b) N concatenated", calls))
    shuffled = list(range(count))
    random.Random(1).shuffle(shuffled)
    if shuffled == sorted(shuffled):
        shuffled.reverse()
    for mode, order in (("(c) fixed budget, in order", list(range(count))), ("(c) fixed budget, shuffled", shuffled)):
        groups = greedy(sizes, order, budget)
        out.append(Plan(f"{budget}", mode, groups, [budget - sum(sizes[i] for i in g) for g in groups]))
    return out


def run_plan(tower, images: list[Image], plan: Plan) -> tuple[float, dict[int, torch.Tensor]]:
    patch_dim = images[0].pixels.shape[1]
    tokens: dict[int, torch.Tensor] = {}
    began = time.perf_counter()
    for number, group in enumerate(plan.groups):
        parts, grids = [images[i].pixels for i in group], [images[i].grid for i in group]
        if plan.filler:
            for grid, rows in fillers(plan.filler[number], patch_dim):
                parts.append(torch.zeros(rows, patch_dim, dtype=images[0].pixels.dtype))
                grids.append(grid)
        outputs = tower_call(tower, torch.cat(parts).to(tower.device_name), grids)
        for i, out in zip(group, outputs):
            tokens[i] = out.to("cpu", copy=True)
    return time.perf_counter() - began, tokens


def offsets(plan: Plan, images: list[Image]) -> dict[int, tuple[int, int]]:
    """Each image's (call, first patch row in its call)."""
    out = {}
    for number, group in enumerate(plan.groups):
        row = 0
        for i in group:
            out[i] = (number, row)
            row += images[i].pixels.shape[0]
    return out


def compare(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> tuple[int, float]:
    """(images equal bit for bit, largest absolute difference over the others)."""
    equal, worst = 0, 0.0
    for i in a:
        if torch.equal(a[i], b[i]):
            equal += 1
        else:
            worst = max(worst, (a[i] - b[i]).abs().max().item())
    return equal, worst


# ---------------------------------------------------------------------------------------------
# Single operations


def probe_ops(tower, images: list[Image], budget: int) -> list[tuple]:
    """Does an operation give an image's rows other bits when its call holds other rows? Each op on
    x (one image's rows) alone, then x with another image after it, then x inside the fixed budget
    at offset 0 and after the other image."""
    visual = tower.visual
    x_pixels, y_pixels = (images[i].pixels.to(tower.device_name, visual.dtype) for i in (1, 0))  # x: 1024x768
    n, m = x_pixels.shape[0], y_pixels.shape[0]
    rows = []

    def layouts(x, y):
        pad = torch.zeros(budget - n - m, x.shape[1], dtype=x.dtype, device=x.device)
        return {"alone": (x, 0), "+ other image": (torch.cat([x, y]), 0),
                "budget, offset 0": (torch.cat([x, y, pad]), 0),
                f"budget, offset {m}": (torch.cat([y, x, pad]), m)}

    def check(name, op, x, y, unit=1):
        with torch.inference_mode():
            reference = None
            for layout, (inputs, offset) in layouts(x, y).items():
                out = op(inputs)[offset // unit:(offset + x.shape[0]) // unit]
                if reference is None:
                    reference, shape = out, tuple(inputs.shape)
                    continue
                same = torch.equal(out, reference)
                diff = 0.0 if same else (out - reference).abs().max().item()
                rows.append((name, f"{shape[0]} rows", f"{layout}: {inputs.shape[0]} rows", "yes" if same else "no",
                             f"{diff:.2e}"))

    block = visual.blocks[0]
    check("patch_embed (Conv3d 3x2x14x14 → 1280)", visual.patch_embed, x_pixels, y_pixels)
    with torch.inference_mode():
        x_hidden, y_hidden = visual.patch_embed(x_pixels), visual.patch_embed(y_pixels)
    check("RMSNorm 1280", block.norm1, x_hidden, y_hidden)
    check("attn.qkv Linear 1280 → 3840", block.attn.qkv, x_hidden, y_hidden)
    check("mlp.gate_proj Linear 1280 → 3420", block.mlp.gate_proj, x_hidden, y_hidden)
    with torch.inference_mode():
        x_wide, y_wide = block.mlp.gate_proj(x_hidden), block.mlp.gate_proj(y_hidden)
    check("mlp.act_fn SiLU on [rows, 3420]", block.mlp.act_fn, x_wide, y_wide)
    check("mlp.down_proj Linear 3420 → 1280", block.mlp.down_proj, x_wide, y_wide)
    merger = visual.merger
    check("merger (RMSNorm, view 4 rows → 5120, Linear 5120 → 5120, GELU, Linear → 3584)", merger, x_hidden,
          y_hidden, unit=4)
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (torch.set_num_threads)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the tower runs (float32 on cpu, bfloat16 on cuda, as qprep extract chooses)")
    parser.add_argument("--vision-depth", type=int, default=2, help="vision blocks built, of the released 32")
    parser.add_argument("--small-images", type=int, default=16, help="small images (448x448 and 336x504)")
    parser.add_argument("--real-images", type=int, default=6, help="real images (1280x720 and 1024x768)")
    parser.add_argument("--concat", type=int, nargs="+", default=[4, 16], help="images per call in mode (b)")
    parser.add_argument("--budget", type=int, default=16384, help="patch rows of every call in mode (c)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of every mode; the median is shown")
    parser.add_argument("--no-probe", action="store_true", help="skip the single-operation probe")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qprep-bench-tower-calls"))
    args = parser.parse_args(argv)
    if args.budget % 4:
        raise SystemExit("--budget must be a multiple of 4 (the 2x2 merge)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoProcessor

    checkpoint = windowed_checkpoint(ensure_model(args.workdir, args.vision_depth), args.vision_depth)
    processor = AutoProcessor.from_pretrained(checkpoint)
    tower = load_tower(checkpoint, args.device)
    groups = {kind: prepare(processor, kind, count)
              for kind, count in (("small", args.small_images), ("real", args.real_images)) if count}

    busy_began, cpu_began, wall_began = system_busy_s(), cpu_s(), time.perf_counter()
    for images in groups.values():  # warm-up: one image per call, and one budget-shaped call
        run_plan(tower, images, Plan("1", "warm-up", [[0]]))
        run_plan(tower, images, Plan("b", "warm-up", [[0]], [args.budget - images[0].pixels.shape[0]]))
    results = {}
    for kind, images in groups.items():
        print(f"{kind}: {len(images)} images, grids {sorted({i.grid for i in images})}", file=sys.stderr, flush=True)
        kind_plans = plans(images, args.concat, args.budget)
        times = {plan.key: [] for plan in kind_plans}
        tokens = {}
        for repeat in range(args.repeats):
            turn = kind_plans[repeat % len(kind_plans):] + kind_plans[:repeat % len(kind_plans)]
            for plan in turn:
                seconds, out = run_plan(tower, images, plan)
                times[plan.key].append(seconds)
                if plan.key in tokens:  # the same call again: deterministic?
                    if compare(tokens[plan.key], out)[0] != len(images):
                        print(f"warning: {kind} {plan.mode}: a repeat gave other bits", file=sys.stderr)
                else:
                    tokens[plan.key] = out
                print(f"  repeat {repeat + 1} {plan.mode} N/budget {plan.label}: {seconds:.1f} s", file=sys.stderr,
                      flush=True)
        results[kind] = (images, kind_plans, times, tokens)
    others = ((system_busy_s() - busy_began) - (cpu_s() - cpu_began)) / (time.perf_counter() - wall_began)

    probe = []
    if not args.no_probe and "real" in groups and len(groups["real"]) >= 2:
        probe = probe_ops(tower, groups["real"], args.budget)
    elif not args.no_probe and "small" in groups:
        probe = probe_ops(tower, groups["small"], args.budget)

    where = "" if args.device == "cpu" else f"-{args.device}"
    saved = args.workdir / f"one-per-call-d{args.vision_depth}{where}-threads{args.threads}.pt"
    torch.save({kind: {images[i].name: t for i, t in res[3][res[1][0].key].items()}
                for kind, res in results.items() for images in [res[0]]}, saved)

    print(json.dumps(environment(args.workdir, ("torch", "transformers")), indent=2))
    print(f"\nQwen2.5-VL-7B vision tower, {args.vision_depth} of 32 blocks (full attention at "
          f"{tower.visual.config.fullatt_block_indexes}, the others windowed), {tower.dtype_name} on "
          f"{args.device}, SDPA, {torch.get_num_threads()} torch threads; median of {args.repeats} passes; others kept "
          f"{others:.2f} cores busy meanwhile\n")
    header = ("size", "mode", "N / budget", "calls", "filler rows", "images/s", "vs one per call",
              "bitwise = one per call", "= across compositions", "max abs diff vs one per call", "passes s")
    rows = []
    for kind, (images, kind_plans, times, tokens) in results.items():
        reference = tokens[kind_plans[0].key]
        base = len(images) / statistics.median(times[kind_plans[0].key])
        shapes = " and ".join(f"{w}x{h}" for w, h in SIZES[kind])
        fixed = [p.key for p in kind_plans if p.filler]
        across = compare(tokens[fixed[0]], tokens[fixed[1]])
        first, second = (offsets(p, images) for p in kind_plans if p.filler)
        moved = sum(first[i][1] != second[i][1] for i in first)
        for plan in kind_plans:
            rate = len(images) / statistics.median(times[plan.key])
            equal, worst = compare(reference, tokens[plan.key])
            patches = sum(i.pixels.shape[0] for i in images)
            filler = f"{sum(plan.filler) / (patches + sum(plan.filler)):.0%}" if plan.filler else "0"
            cross = (f"{across[0]} / {len(images)}" + (f" (max {across[1]:.1e})" if across[0] < len(images) else "")
                     + f"; {moved} at another offset" if plan.filler else "")
            rows.append((f"{kind} ({shapes})", plan.mode, plan.label, len(plan.groups), filler, f"{rate:.3f}",
                         f"{rate / base:.2f}x", f"{equal} / {len(images)}", cross,
                         "0" if equal == len(images) else f"{worst:.1e}",
                         ", ".join(f"{t:.1f}" for t in times[plan.key])))
    print(markdown(header, rows))
    if probe:
        print("\nSingle operations: an image's rows alone against the same rows in a larger call")
        print(markdown(("operation", "alone", "in", "bitwise equal", "max abs diff"), probe))
    other = args.workdir / f"one-per-call-d{args.vision_depth}{where}-threads{3 - args.threads}.pt" \
        if args.threads in (1, 2) and args.device == "cpu" else None
    if other is not None and other.is_file():
        theirs, ours = torch.load(other), torch.load(saved)
        pairs = [(ours[k][n], theirs[k][n]) for k in ours if k in theirs for n in ours[k] if n in theirs[k]]
        same = sum(torch.equal(a, b) for a, b in pairs)
        print(f"\none image per call, {args.threads} vs {3 - args.threads} torch threads: {same} of {len(pairs)} "
              f"images bitwise equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
