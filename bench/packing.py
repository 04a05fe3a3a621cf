"""Benchmark: sequence packing against padded batches and batch 1, and data-parallel CPU ranks.

What is compared (the same tiny-width Qwen2.5-Omni checkpoint, real classes and key layout, with a
language model of width --hidden; the same store; the same 16 samples whose lengths vary by about
4x, as the recipe's 10 s to 3 min clips do; float32 on CPU; 2 epochs; LoRA r 16 on the default
targets; each path in a process of its own, so that its peak memory is its own):

* batch 1: `qprep train --batch-size 1 --grad-accum 4`;
* padded: `--batch-size 4 --grad-accum 1`, each batch right-padded to its longest sample;
* packed: `--packing --max-length L --grad-accum 1`, L = 4 x the mean sample length (rows hold
  about four samples; first fit over the seeded order; no padding);
* 2 ranks: `--cpu-ranks 2 --batch-size 1 --grad-accum 2` (the same 4 samples per optimizer step,
  two per rank), whose rows record the time of each step's all-reduce (`allreduce_s`);
* 2 ranks, `--shard`: the same, the language model sharded over the two ranks (FSDP2: each layer
  gathered for its forward and backward, the adapter's gradients reduce-scattered in the backward,
  so its `allreduce_s` holds only the step's loss sums).

Columns: the sample tokens trained per second of step time (padding not counted), the share of
computed tokens that were padding, the peak resident memory (the largest process: with 2 ranks, one
rank), and the mean loss
of each epoch (the paths see the same samples per epoch, in other groupings: the epoch means agree
to the precision the groupings allow). The 2-rank rows add the all-reduce's share of the step time.

Goal stated by the project: packing >= 1.3x the padded tokens/s on this CPU. With SDPA (the
default) qprep attends each sample of a packed row on its own (`qprep.train.packed_attention`), so
a row costs its samples' squared lengths in attention, as unpacked batches do; transformers' own
packed-sequence mask would attend over the whole row, the square of its length.

Reproduce (from the repository root, with the virtualenv active):

    python bench/packing.py                  # ~3 min on 2 cores (2 repeats of each path)
    python bench/packing.py --hidden 512     # a wider language model
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CLIP_SECONDS = (2, 3, 4, 5, 6, 7, 8, 8)  # 4x from the shortest to the longest
PATHS = {
    "batch 1": ["--batch-size", "1", "--grad-accum", "4"],
    "padded (batch 4)": ["--batch-size", "4", "--grad-accum", "1"],
    "packed": ["--packing", "--grad-accum", "1"],
    "2 CPU ranks": ["--cpu-ranks", "2", "--batch-size", "1", "--grad-accum", "2"],
    "2 ranks, --shard": ["--cpu-ranks", "2", "--batch-size", "1", "--grad-accum", "2", "--shard"],
}

SHORT = {"batch1": "batch 1", "padded": "padded (batch 4)", "packed": "packed", "ranks": "2 CPU ranks",
         "shard": "2 ranks, --shard"}


def prepare(workdir: Path, hidden: int) -> tuple[Path, Path, Path]:
    """The model, store and data file (cached in the workdir)."""
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.models.tiny import make_tiny_model
    from qprep.schemas.settings import VideoSettings
    from qprep.synth import VideoSpec, make_video

    model, store, data = workdir / f"omni-h{hidden}", workdir / f"store-h{hidden}.zarr", workdir / "train.json"
    if not (model / "config.json").is_file():
        make_tiny_model("qwen2_5_omni", model, hidden=hidden)
    if not (store / "manifest.parquet").exists() and not (store / ".qprep").exists():
        for index, seconds in enumerate(CLIP_SECONDS):
            make_video(workdir / "videos" / f"clip{index}.mp4", VideoSpec(width=112, height=84, fps=25, seconds=seconds))
        extract(workdir / "videos", store, str(model), VideoSettings(fps=2), dtype="float32", shards=1,
                options=ExtractOptions(progress=False))
    records = [{"id": f"clip{index}", "conversations": [
        {"from": "human", "value": "<video>\nCould you detail events during different time segments?"},
        {"from": "gpt", "value": f"From 0.0 to {seconds / 2:.1f}, a disc appears." + " It moves." * (index % 3)}]}
        for repeat in range(2) for index, seconds in enumerate(CLIP_SECONDS)]
    data.write_text(json.dumps(records))
    return model, store, data


def sample_lengths(model: Path, store: Path, data: Path) -> list[int]:
    from qprep.models.checkpoint import open_checkpoint
    from qprep.store.reader import open_cache
    from qprep.train.data import build_dataset, load_records

    checkpoint = open_checkpoint(str(model))
    tokenizer = checkpoint.tokenizer()
    dataset = build_dataset(load_records(data), open_cache(store), tokenizer,
                            checkpoint.family.prompt_layout(checkpoint, tokenizer))
    return [len(s.input_ids) for s in dataset.samples]


def run_path(name: str, flags: list[str], model: Path, store: Path, data: Path, out: Path, max_length: int) -> dict:
    """One `qprep train` process; its metrics and the peak memory of its process tree."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "qprep", "train", "--cache", str(store), "--data", str(data), "--model", str(model),
               "--out", str(out), "--epochs", "2", "--lr", "1e-4", "--workers", "0", "--quiet",
               "--max-length", str(max_length), *flags]
    # a wrapper of its own reports the largest resident set among the processes it waited for
    # (the launcher's ranks included): this process's children's maximum would carry over between paths
    wrapper = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print('peak-kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(code)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    peak = int(done.stderr.rsplit("peak-kb", 1)[1].split()[0]) / 1024
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "wall_s": wall, "peak_mb": peak}


def summarise(name: str, result: dict, lengths: list[int]) -> dict:
    rows = [r for r in result["rows"] if "loss" in r]
    step_time = sum(r["step_time_s"] for r in rows)
    real = 2 * sum(lengths)  # two epochs of every sample
    computed = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows)  # attention tokens of each batch, all ranks
    padded = {"padded (batch 4)": _padded_tokens(result)} .get(name, computed)
    epochs = [sum(r["loss"] for r in rows if r["epoch"] == e) / max(1, sum(1 for r in rows if r["epoch"] == e))
              for e in (0, 1)]
    reduce_share = (sum(r.get("allreduce_s", 0.0) for r in rows) / step_time) if name.startswith("2 ") else None
    return {"path": name, "tokens_per_s": real / step_time, "padding": 1 - real / max(padded, real),
            "peak_mb": result["peak_mb"], "wall_s": result["wall_s"], "epoch_loss": epochs, "batches": len(rows),
            "allreduce_share": reduce_share}


def _padded_tokens(result: dict) -> float:
    """Tokens a padded batch computes: its rows x its longest row (the metrics count the attention
    mask's ones, i.e. the real tokens, so the padded size comes from the batch's shape instead)."""
    return float(result.get("padded_tokens", 0.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "qprep-bench" / "packing")
    parser.add_argument("--hidden", type=int, default=256, help="language model width (tiny: 64)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path; the fastest is kept")
    parser.add_argument("--paths", default=",".join(SHORT),
                        help=f"which paths to run, of {','.join(SHORT)} (on a GPU machine the single-process "
                             f"paths train on the GPU, the ranks on CPU)")
    args = parser.parse_args(argv)
    chosen = args.paths.split(",")
    unknown = set(chosen) - set(SHORT)
    if unknown or "padded" not in chosen:
        parser.error(f"--paths: {', '.join(sorted(unknown)) or 'padded is the baseline, keep it'}; "
                     f"choose from {','.join(SHORT)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, store, data = prepare(args.workdir, args.hidden)
    lengths = sample_lengths(model, store, data)
    max_length = 4 * sum(lengths) // len(lengths)
    print(f"{len(lengths)} samples of {min(lengths)}..{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}); "
          f"packed rows of at most {max_length}", flush=True)
    results = []
    for name, flags in PATHS.items():
        if not any(SHORT[short] == name for short in chosen):
            continue
        runs = []
        for _ in range(args.repeats):
            result = run_path(name, flags, model, store, data, args.workdir / f"run-{len(results)}",
                              max(max_length, max(lengths)))
            if name == "padded (batch 4)":
                result["padded_tokens"] = padded_batch_tokens(model, store, data)
            runs.append(summarise(name, result, lengths))
        results.append(max(runs, key=lambda r: r["tokens_per_s"]))
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        print(f"  {name}: {walls} s", flush=True)
    padded = next(r for r in results if r["path"] == "padded (batch 4)")
    print(f"\n{'path':18}{'tokens/s':>10}{'vs padded':>11}{'padding':>9}{'peak MB':>9}{'batches':>9}  epoch losses")
    for r in results:
        extra = f"  all-reduce {r['allreduce_share']:.1%} of step time" if r["allreduce_share"] is not None else ""
        print(f"{r['path']:18}{r['tokens_per_s']:10.0f}{r['tokens_per_s'] / padded['tokens_per_s']:10.2f}x"
              f"{r['padding']:9.1%}{r['peak_mb']:9.0f}{r['batches']:9d}  "
              + " ".join(f"{loss:.4f}" for loss in r["epoch_loss"]) + extra)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def padded_batch_tokens(model: Path, store: Path, data: Path) -> float:
    """Rows x longest row of every padded batch of 4, over two epochs (the plan `train` follows)."""
    from qprep.models.checkpoint import open_checkpoint
    from qprep.store.reader import open_cache
    from qprep.train.data import build_dataset, load_records
    from qprep.train.loader import plan

    checkpoint = open_checkpoint(str(model))
    tokenizer = checkpoint.tokenizer()
    samples = build_dataset(load_records(data), open_cache(store), tokenizer,
                            checkpoint.family.prompt_layout(checkpoint, tokenizer)).samples
    batches = plan(samples, seed=0, batch_size=4, epochs=2)
    return float(sum(len(b.samples) * max(len(samples[i].input_ids) for i in b.samples) for b in batches))


if __name__ == "__main__":
    sys.exit(main())
