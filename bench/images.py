"""Benchmark: a folder of images through `qprep extract --media`, against a plain loop of the
checkpoint's own processor and towers, on this machine's CPU or its GPU (--device cuda: both sides'
tower in bfloat16 there).

What is compared, for --images images and twice as many (so that the cost of each further image
shows apart from the fixed start-up):

* qprep: `qprep extract --media DIR --out STORE --model M --executor local` in a fresh process
  (imports, the towers' load, CPU-stage worker processes reading, orienting, resizing and
  patchifying the images, the towers one image a call, the store written), wall time.
* the loop: a fresh process that imports transformers, loads the full model class with
  `from_pretrained`, and for each image calls `AutoProcessor(...)(images=[load_image(path)])` and
  `model.get_image_features(...)`, one image at a time: what a training stack does per image.

The model: Qwen2.5-VL-7B's vision tower at its released width (1280 wide, 16 heads, windowed
attention, out 3584) with --vision-depth of its 32 blocks (bench/towers.py builds it), a tiny
language model (never run), and the released processor's image bounds (3136–12845056 pixels), so a
1280x720 photo is 1288x728 pixels, 4784 patches, 1196 merged tokens. The images are generated:
half 1280x720, half 1024x768 (4:3) JPEGs of smooth gradients with noise, as photos compress.

Then both sides' tokens are compared for every image, bit for bit: qprep calls the towers one
image a call, so a store's bytes never depend on which images a run held together. With
--image-call-rows N, qprep packs images into fixed-shape calls of N patch rows (`qprep extract
--image-call-rows`): its tokens are then another call shape's, held to the tolerance `qprep verify`
allows such a store (float32: 2^-16 of the largest magnitude; bfloat16: 2^-6) and their largest
difference printed.

Reproduce (from the repository root, with the virtualenv active; the checkpoint and the images are
cached in --workdir):

    python bench/images.py                  # 48 and 96 images, 2 of 32 vision blocks
    python bench/images.py --images 200     # the few hundred images the goal names
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import environment  # noqa: E402
from towers import QWEN2_5_VL_7B, ensure_qwen2_5  # noqa: E402

RELEASED_IMAGE_PIXELS = (3136, 12845056)  # Qwen2.5-VL-7B-Instruct's preprocessor_config.json
SIZES = ((1280, 720), (1024, 768))


def ensure_model(workdir: Path, depth: int) -> Path:
    """The bench checkpoint, its image processor given the released bounds."""
    return with_released_image_bounds(ensure_qwen2_5(workdir, "qwen2_5_vl", QWEN2_5_VL_7B, depth, 0))


def with_released_image_bounds(built: Path) -> Path:
    """A copy of the checkpoint `built` whose image processor has Qwen2.5-VL-7B's image bounds."""
    path = built.parent / f"{built.name}-released-image-bounds"
    if not (path / "config.json").is_file():
        shutil.copytree(built, path, dirs_exist_ok=True)
        config = json.loads((path / "processor_config.json").read_text())  # as save_pretrained writes it
        low, high = RELEASED_IMAGE_PIXELS
        config["image_processor"]["size"] = {"shortest_edge": low, "longest_edge": high}
        (path / "processor_config.json").write_text(json.dumps(config, indent=2))
    return path


def ensure_images(folder: Path, count: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = folder / f"photo-{index:04d}.jpg"
        if not path.is_file():
            width, height = SIZES[index % len(SIZES)]
            rng = np.random.default_rng(index)
            y, x = np.mgrid[0:height, 0:width]
            base = np.stack([(x * (index + 3)) % 256, (y * 2 + index) % 256, ((x + y) // 3) % 256], axis=-1)
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
    return folder


def loop_main(folder: str, model: str, out: str, device: str) -> None:
    """The reference loop, in its own process (--loop): prints its timings, saves its tokens (bfloat16
    on a GPU, float32 on CPU, as `qprep extract` chooses)."""
    began = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoProcessor
    from transformers.image_utils import load_image

    processor = AutoProcessor.from_pretrained(model)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    full = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=dtype).eval().to(device)
    loaded = time.perf_counter()
    tokens = {}
    with torch.inference_mode():
        for path in sorted(Path(folder).glob("*.jpg")):
            inputs = processor(text=["<|image_pad|>"], images=[load_image(str(path))], return_tensors="pt")
            output = full.get_image_features(inputs["pixel_values"].to(device), inputs["image_grid_thw"].to(device))
            tokens[path.stem] = output.pooler_output[0].float().cpu().numpy()
    if device == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    np.savez(out, **tokens)
    print(json.dumps({"wall_s": done - began, "load_s": loaded - began, "images_s": done - loaded}))


def run_loop(folder: Path, model: Path, out: Path, device: str) -> dict:
    began = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--loop", str(folder), str(model), str(out), device],
                            capture_output=True, text=True, check=True)
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - began}


def run_qprep(folder: Path, model: Path, store: Path, device: str, image_call_rows: int = 0) -> dict:
    shutil.rmtree(store, ignore_errors=True)
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "qprep", "extract", "--media", str(folder), "--out", str(store),
                             "--model", str(model), "--executor", "local", "--device", device, "--quiet", "--json",
                             "--image-call-rows", str(image_call_rows)],
                            capture_output=True, text=True, check=True)
    summary = json.loads(result.stdout)
    return {"process_s": time.perf_counter() - began, "extracted": summary["extracted"], "failed": summary["failed"]}


def fixed_shape_tolerance(device: str) -> float:
    """What `qprep verify` allows a store of fixed-shape image calls in the dtype extract gives `device`."""
    from qprep.audit.verify import default_tolerance
    from qprep.schemas.dtypes import compute_dtype

    return default_tolerance(compute_dtype(device), {"image_call_rows": 1})


def same_tokens(store: Path, reference: Path, rtol: float = 0.0) -> tuple[int, int, float]:
    """(images whose stored tokens equal the loop's, bit for bit or within `rtol` of the largest
    magnitude, images compared, the largest difference)."""
    from qprep import open_cache

    cache = open_cache(store)
    expected = np.load(reference)
    equal, largest = 0, 0.0
    for name in expected.files:
        ours, theirs = cache[name].video_tokens.float().numpy(), expected[name]
        gap = float(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else float("inf")
        largest = max(largest, gap)
        equal += gap <= rtol * float(np.abs(theirs).max())
    return equal, len(expected.files), largest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="images in the smaller folder (the larger: twice)")
    parser.add_argument("--vision-depth", type=int, default=2, help="vision blocks built, of the released 32")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qprep-bench-images"))
    parser.add_argument("--device", choices=("cuda", "cpu"), help="where both sides run the tower (default: cuda "
                                                                 "when available; bfloat16 there, float32 on CPU)")
    parser.add_argument("--image-call-rows", type=int, default=0,
                        help="qprep's fixed-shape image calls (extract --image-call-rows; 0: one image a call)")
    parser.add_argument("--loop", nargs=4, metavar=("FOLDER", "MODEL", "OUT", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loop:
        loop_main(*args.loop)
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = ensure_model(args.workdir, args.vision_depth)
    rows, checks = [], []
    for count in (args.images, 2 * args.images):
        folder = ensure_images(args.workdir / f"images-{count}", count)
        ours = run_qprep(folder, model, args.workdir / f"store-{count}.zarr", device, args.image_call_rows)
        loop = run_loop(folder, model, args.workdir / f"loop-{count}.npz", device)
        rtol = fixed_shape_tolerance(device) if args.image_call_rows else 0.0
        checks.append(same_tokens(args.workdir / f"store-{count}.zarr", args.workdir / f"loop-{count}.npz", rtol))
        rows.append((count, ours, loop))
    print(json.dumps(environment(args.workdir, ("torch", "transformers", "pillow")), indent=2))
    print(table(rows, args.vision_depth, device))
    how = f"within the tolerance (fixed-shape calls of {args.image_call_rows} rows)" if args.image_call_rows \
        else "bit for bit"
    for equal, compared, largest in checks:
        print(f"tokens equal to the loop's, {how}: {equal} of {compared} images (largest difference {largest:.3g})")
    return 0 if all(equal == compared for equal, compared, _ in checks) else 1


def table(rows, depth: int, device: str) -> str:
    (small, ours_1, loop_1), (large, ours_2, loop_2) = rows
    further = large - small
    ours_each = (ours_2["process_s"] - ours_1["process_s"]) / further
    loop_each = (loop_2["process_s"] - loop_1["process_s"]) / further
    where = "bfloat16 on cuda" if device == "cuda" else "float32 on CPU"
    lines = [f"Qwen2.5-VL-7B vision tower, {depth} of 32 blocks, {where}; photos 1280x720 and 1024x768", "",
             "| run | images | qprep s | loop s | qprep images/s | loop images/s | qprep vs loop |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for count, ours, loop in rows:
        lines.append(f"| whole process | {count} | {ours['process_s']:.1f} | {loop['process_s']:.1f} | "
                     f"{count / ours['process_s']:.2f} | {count / loop['process_s']:.2f} | "
                     f"{loop['process_s'] / ours['process_s']:.2f}x |")
    lines.append(f"| each further image | {further} | {ours_each:.2f} | {loop_each:.2f} | {1 / ours_each:.2f} | "
                 f"{1 / loop_each:.2f} | {loop_each / ours_each:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
