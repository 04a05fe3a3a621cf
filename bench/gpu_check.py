"""The GPU checks, as one command (`make gpu-check`): every bench's GPU rows and the demo on cuda.

Each check runs in a process of its own with a time limit, its whole output kept in --out; the
tables they print are gathered into --out/report.md, under a summary of what passed:

* bf16: the cache path against the full model in bfloat16 on the device (bench/bf16.py), each family;
* towers: the towers alone at released widths, one video a call and packed (bench/towers.py);
* images: a folder of photos through `qprep extract --media` against the processor + tower loop
  (bench/images.py);
* train: a LoRA step from the cache against the in-memory floor, bfloat16 (bench/train.py --device);
* train, mixed media: the same over images, videos and text-only turns (bench/train.py --mixed);
* grpo: a GRPO step from the cache against the TRL-derived step's 1 + 2G tower passes, the tower at
  its released 32 blocks, bfloat16 (bench/grpo.py --device);
* images, fixed-shape calls: the same with `extract --image-call-rows 16384` (GPU only);
* tower calls: images one per vision-tower call, several concatenated, and fixed-shape calls padded
  to a patch budget, images/s and whether an image's tokens depend on its batch-mates
  (bench/tower_calls.py);
* packing: batch 1, padded and packed rows on the device (bench/packing.py);
* demo: `qprep demo` end to end (it trains and infers on cuda when one is there).

The whole takes under 8 minutes on one H100 with the defaults. On a machine without a GPU it runs
the same checks on CPU at smaller sizes (--quick is implied), which is how it is tried before a GPU
is at hand.

    python bench/gpu_check.py                  # or: make gpu-check
    python bench/gpu_check.py --only bf16 demo
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@dataclass
class Check:
    name: str
    command: list[str]  # after the interpreter
    limit_s: int


def checks(device: str, quick: bool, workdir: Path) -> list[Check]:
    """The checks at GPU sizes, or the same at CPU sizes with `quick`."""
    bench = lambda name: str(BENCH / name)  # noqa: E731
    towers = ["--small", "--families", "qwen2_5_vl", "--no-with-extract"] if quick else [
        "--families", "qwen2_5_vl", "qwen3_vl", "qwen2_5_omni", "--repeats", "3", "--fit-seconds", "5",
        "--extract-videos", "8", "--extract-seconds", "5"]
    train = ["--videos", "3", "--steps", "5", "--warmup", "2", "--text-hidden", "256", "--text-layers", "2"] if quick \
        else ["--videos", "6", "--steps", "16", "--warmup", "4"]
    common_train = ["--device", device, "--dtype", "bfloat16", "--paths", "cache,floor", "--quiet-wait", "0",
                    "--workdir", str(workdir / "train")]
    # on a GPU the bench's own 2 prompts × G 8 on an 8-frame 448x336 clip, the tower's released 32 blocks
    # and an 8 × 1024 language model
    grpo = ["--prompts", "1", "--generations", "2", "--vision-depth", "1", "--frames", "4", "--new-tokens", "8"] \
        if quick else ["--vision-depth", "32", "--text-hidden", "1024", "--text-layers", "8"]
    return [
        Check("bf16", [bench("bf16.py"), "--device", device, *(["--families", "qwen2_5_vl", "qwen3_vl"] if quick
                                                                else [])], 240),
        Check("towers", [bench("towers.py"), "--device", device, "--workdir", str(workdir / "towers"), *towers], 240),
        Check("images", [bench("images.py"), "--device", device, "--images", "4" if quick else "48",
                         "--vision-depth", "1" if quick else "8", "--workdir", str(workdir / "images")], 240),
        Check("train", [bench("train.py"), *common_train, *train], 300),
        Check("train, mixed media", [bench("train.py"), *common_train, *train, "--mixed", "3" if quick else "6"], 300),
        Check("grpo", [bench("grpo.py"), "--device", device, "--workdir", str(workdir / "grpo"), *grpo], 180),
        *([] if quick else [Check("images, fixed-shape calls", [
            bench("images.py"), "--device", device, "--images", "48", "--vision-depth", "8", "--image-call-rows",
            "16384", "--workdir", str(workdir / "images")], 240)]),
        Check("tower calls", [bench("tower_calls.py"), "--device", device, "--workdir", str(workdir / "tower-calls"),
                              *(["--small-images", "4", "--real-images", "0", "--budget", "4096", "--repeats", "1", "--no-probe"] if quick
                                else ["--vision-depth", "32", "--small-images", "64", "--real-images", "8"])], 180),
        Check("packing", [bench("packing.py"), "--repeats", "1", "--paths", "batch1,padded,packed",
                          "--workdir", str(workdir / "packing"), *(["--hidden", "64"] if quick else [])], 300),
        Check("demo", ["-m", "qprep", "demo"], 240),
    ]


def run(check: Check, out: Path) -> dict:
    log = out / (check.name.replace(", ", "-").replace(" ", "-") + ".log")
    began = time.perf_counter()
    print(f"{check.name} …", file=sys.stderr, flush=True)
    # a session of its own, so that a check past its limit is stopped with every process it started
    process = subprocess.Popen([sys.executable, *check.command], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text, _ = process.communicate(timeout=check.limit_s)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        text, _ = process.communicate()
        code, text = "timeout", text + f"\n(stopped after {check.limit_s} s)"
    log.write_text(text)
    seconds = time.perf_counter() - began
    return {"check": check, "code": code, "seconds": seconds, "log": log, "text": text}


def tables(text: str) -> str:
    """The markdown tables with the caption above each and the line that follows it (what each bench
    prints as its result: what was measured, the table, the ratio), blank lines between them skipped."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if not lines[index].startswith("|"):
            index += 1
            continue
        start = index
        while index < len(lines) and lines[index].startswith("|"):
            index += 1
        before = [line for line in lines[max(0, start - 2):start] if line.strip() and not line.startswith("|")]
        after = [line for line in lines[index:index + 2] if line.strip() and not line.startswith("|")]
        blocks.append("\n".join(before[-1:] + [""] * bool(before) + lines[start:index] + [""] * bool(after)
                                + after[:1]))
    return "\n\n".join(blocks)


def report(results: list[dict], device: str) -> str:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (no GPU here: the checks at CPU sizes)"
    parts = [f"# qprep GPU checks on {name}", "", "| check | result | seconds | log |", "|---|---|---|---|"]
    for r in results:
        result = "passed" if r["code"] == 0 else ("TIMED OUT" if r["code"] == "timeout" else f"FAILED ({r['code']})")
        parts.append(f"| {r['check'].name} | {result} | {r['seconds']:.0f} | {r['log'].name} |")
    for r in results:
        parts += ["", f"## {r['check'].name}", "", tables(r["text"]) or r["text"][-2000:]]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check", help="logs and report.md go here")
    parser.add_argument("--quick", action="store_true", help="CPU sizes (implied without a GPU)")
    parser.add_argument("--only", nargs="+", help="run these checks only (their names as listed in the report)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [c for c in checks(device, args.quick or device == "cpu", args.out / "work")
              if not args.only or c.name in args.only]
    slower = 1 if device == "cuda" else 4  # CPU sizes still take longer on a CPU than GPU sizes on a GPU
    results = [run(dataclasses.replace(check, limit_s=check.limit_s * slower), args.out) for check in chosen]
    text = report(results, device)
    (args.out / "report.md").write_text(text)
    print(text)
    return 0 if all(r["code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
