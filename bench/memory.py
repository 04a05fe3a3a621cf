"""Benchmark: memory stays bounded as the dataset grows: `qprep extract` on 10 and on 1,000 videos.

Each run is the `qprep extract` CLI on a fresh store, as a user runs it (its own local Ray), while
a thread samples the whole process tree every 0.2 s (bench/extract.py's TreeMonitor): the driver's
peak RSS (VmHWM), the largest single worker's peak RSS, and the peak sums of RSS and PSS over the
tree (Ray's raylet, GCS, CPU-stage workers and the tower actor are all descendants of the driver).
The videos are bench/extract.py's no-op folder: hard links to four 2 s clips (64–96 px, no audio),
100 per subfolder, extracted with `--num-frames 4 --size 56x56 --no-audio` into 256 shards; the
tiny Qwen2.5-Omni checkpoint, float32.

What bounds memory: the driver holds the plan (one small record per video) and the rows of the
shards still being written; Ray Data streams the CPU stage's output to the tower actor with
backpressure; a shard's rows leave the driver when it commits. So the driver's peak should grow
with the plan only (kilobytes per video), and the workers' not at all.

Reproduce (from the repository root, with the virtualenv active):

    python bench/memory.py                   # 10 and 1,000 videos (~3 min on 2 cores)
    python bench/memory.py --counts 10 100 5000
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import extract as bench  # noqa: E402  (bench/extract.py: the tree monitor, the clip folder, the model)

FLAGS = ("--num-frames", "4", "--size", "56x56", "--no-audio")


def measure(count: int, workdir: Path, model: Path) -> dict:
    tree = bench.ensure_noop_tree(workdir, count)
    store = workdir / f"memory-{count}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    measured, summary = bench.run_cli_extract(tree.videos, store, model, FLAGS)
    assert summary["extracted"] == count, summary
    return {"videos": count, "wall_s": measured.wall_s, "driver_mb": measured.root_hwm_mb,
            "largest_worker_mb": measured.largest_child_rss_mb, "tree_rss_mb": measured.tree_rss_mb,
            "tree_pss_mb": measured.tree_pss_mb, "processes": measured.processes,
            "others_cores": measured.others_cores}


def table(rows: list[dict]) -> str:
    header = ("videos", "wall s", "driver peak RSS MB", "largest worker RSS MB", "tree RSS MB (sum)",
              "tree PSS MB", "processes", "others' cores")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r['videos']:,} | {r['wall_s']:.1f} | {r['driver_mb']:.0f} | {r['largest_worker_mb']:.0f} | "
                     f"{r['tree_rss_mb']:.0f} | {r['tree_pss_mb']:.0f} | {r['processes']} | {r['others_cores']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qprep-bench-extract"))
    parser.add_argument("--quiet-wait", type=float, default=120, help="seconds to wait for an idle machine per run")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench.QUIET["max_wait_s"] = args.quiet_wait
    model = bench.ensure_model(args.workdir, 64)
    rows = [measure(count, args.workdir, model) for count in args.counts]
    print(table(rows))
    first, last = rows[0], rows[-1]
    print(f"\n{last['videos']:,} vs {first['videos']:,} videos: driver ×{last['driver_mb'] / first['driver_mb']:.2f}, "
          f"largest worker ×{last['largest_worker_mb'] / first['largest_worker_mb']:.2f}, "
          f"tree PSS ×{last['tree_pss_mb'] / first['tree_pss_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
