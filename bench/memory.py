"""Benchmark: the extract driver's memory stays flat however many images a run has.

What runs: `qprep extract --media DIR --executor local --dtype float32` on --count small images
(100,000 by default) in a fresh process under `nice`, as a user runs it: the CPU stage in worker
processes, the towers and the writer in the driver. The store writes are the real ones, at
Qwen2.5-VL-7B's merged width (3584, float32: 4 tokens, 57 KB an image). The towers are a cheap
stand-in (`STAND_IN`): Qwen2.5-VL-7B's vision tower with its released patching and merger width
(out 3584) but 32 wide and one block, since the tower's compute is not the subject here.

What is sampled, every second: the driver's RSS and peak RSS (VmRSS, VmHWM), the largest worker
process's RSS, and the images committed so far (rows of the manifest files the run has written).
The table shows them as the run goes; flat rows mean the driver holds no more for 100,000 images
than for 10,000. What bounds it: the writer holds at most `ExtractOptions.hold_bytes` of fresh
tokens (256 MB; past that they wait in a scratch file until their shard commits), a commit writes
a chunk at a time, and a new store has about 256 entries a shard (qprep.store.layout). The plan
itself (a small record per image) is made before the first image is extracted.

The images are hard links to 16 distinct 64x48 PNGs (resized to 56x56 by the released processor's
3,136-pixel floor), 1,000 to a folder.

Reproduce (from the repository root, with the virtualenv active; model and images are cached in --workdir):

    python bench/memory.py --count 2000      # a quick check (about a minute on 2 cores)
    python bench/memory.py                   # 100,000 images
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from images import with_released_image_bounds  # noqa: E402
from machine import environment  # noqa: E402
from towers import QWEN2_5_VISION, ensure_qwen2_5  # noqa: E402

# The stand-in towers: Qwen2.5-VL-7B's vision tower narrowed to 32 wide, one block, merging to the
# released 3584. The released width would cost some 50 ms an image on a CPU core (its 0.67 B
# weights read for 16 patches); here the towers take a few ms and the run measures the writer.
STAND_IN = {"vision": dict(QWEN2_5_VISION, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=3584)}

DISTINCT = 16
PER_FOLDER = 1000
SAMPLE_EVERY_S = 1.0


def ensure_images(workdir: Path, count: int) -> Path:
    """`count` images under workdir/images-COUNT: hard links to DISTINCT small PNGs."""
    import numpy as np
    from PIL import Image

    sources = workdir / "image-sources"
    sources.mkdir(parents=True, exist_ok=True)
    for index in range(DISTINCT):
        path = sources / f"{index:02d}.png"
        if not path.is_file():
            pixels = np.random.default_rng(index).integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
    folder = workdir / f"images-{count}"
    done = folder / ".complete"
    if not done.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        for index in range(count):
            path = folder / f"{index // PER_FOLDER:04d}" / f"img{index:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(sources / f"{index % DISTINCT:02d}.png", path)
        done.touch()
    return folder


@dataclass
class Sample:
    seconds: float
    committed: int
    driver_rss_mb: float
    driver_peak_mb: float
    largest_worker_mb: float


class Sampler:
    """Samples the driver, its worker processes and the store's committed rows every SAMPLE_EVERY_S."""

    def __init__(self, pid: int, store: Path):
        self.pid, self.store = pid, store
        self.samples: list[Sample] = []
        self.began = time.perf_counter()
        self._rows: dict[str, tuple[int, int]] = {}  # manifest file → (mtime_ns, rows)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                self.samples.append(self.sample())
            except (OSError, KeyError):
                pass  # the process ended between two reads

    def sample(self) -> Sample:
        import psutil

        status = _kb(f"/proc/{self.pid}/status", ("VmRSS", "VmHWM"))
        workers = [child.memory_info().rss for child in psutil.Process(self.pid).children(recursive=True)]
        return Sample(time.perf_counter() - self.began, self.committed(), status["VmRSS"] / 1024,
                      status["VmHWM"] / 1024, max(workers, default=0) / 2**20)

    def committed(self) -> int:
        """Rows in the store's manifest files (each file replaced whole at its shard's commit)."""
        import pyarrow.parquet as pq

        manifest = self.store / "manifest"
        for path in manifest.glob("*.parquet") if manifest.is_dir() else ():
            try:
                mtime = path.stat().st_mtime_ns
                if self._rows.get(path.name, (None,))[0] != mtime:
                    self._rows[path.name] = (mtime, pq.ParquetFile(path).metadata.num_rows)
            except OSError:
                continue
        return sum(rows for _, rows in self._rows.values())


def _kb(path: str, fields: tuple[str, ...]) -> dict[str, int]:
    with open(path) as handle:
        return {line.split(":")[0]: int(line.split()[1]) for line in handle if line.split(":")[0] in fields}


def run(folder: Path, model: Path, store: Path) -> tuple[dict, list[Sample], float]:
    shutil.rmtree(store, ignore_errors=True)
    command = ["nice", "-n", "10", sys.executable, "-m", "qprep", "extract", "--media", str(folder), "--out",
               str(store), "--model", str(model), "--dtype", "float32", "--executor", "local", "--quiet", "--json"]
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with Sampler(process.pid, store) as sampler:
        stdout, stderr = process.communicate()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{stderr[-3000:]}")
    return json.loads(stdout), sampler.samples, time.perf_counter() - began


def table(samples: list[Sample], count: int, rows: int = 10) -> str:
    """The first sample after each tenth of the images is committed."""
    header = "| images committed | s | driver RSS MB | driver peak RSS MB | largest worker RSS MB |"
    lines = [header, "|---:|---:|---:|---:|---:|"]
    shown = []
    for step in range(1, rows + 1):
        due = count * step // rows
        sample = next((s for s in samples if s.committed >= due), None)
        if sample is not None and sample not in shown:
            shown.append(sample)
    for s in [samples[0], *shown] if samples else []:
        lines.append(f"| {s.committed:,} | {s.seconds:.0f} | {s.driver_rss_mb:.0f} | {s.driver_peak_mb:.0f} | "
                     f"{s.largest_worker_mb:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="images to extract")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qprep-bench-memory"))
    args = parser.parse_args(argv)
    model = with_released_image_bounds(ensure_qwen2_5(args.workdir, "qwen2_5_vl", STAND_IN, 1, 0))
    folder = ensure_images(args.workdir, args.count)
    summary, samples, wall = run(folder, model, args.workdir / f"store-{args.count}.zarr")
    print(json.dumps(environment(args.workdir, ("torch", "transformers", "zarr")), indent=2))
    print(f"{args.count:,} images 64x48 → 56x56, 4 tokens each at width 3584 (float32); towers: a cheap stand-in "
          f"(Qwen2.5-VL-7B's vision tower 32 wide, 1 block, merging to 3584: the tower's compute is not the "
          f"subject); the store writes are the real ones")
    print(f"extracted {summary['extracted']:,}, failed {summary['failed']}, {summary['shards_written']} shards, "
          f"{summary['bytes_written'] / 1e9:.2f} GB written in {wall:.0f} s ({summary['extracted'] / wall:.0f} images/s)")
    print(table(samples, args.count))
    during = [s for s in samples if 0 < s.committed < args.count]
    if during:
        first, last = during[0], during[-1]
        print(f"\ndriver RSS from {first.committed:,} to {last.committed:,} images committed: "
              f"{first.driver_rss_mb:.0f} → {last.driver_rss_mb:.0f} MB (peak {max(s.driver_peak_mb for s in samples):.0f} MB); "
              f"largest worker at most {max(s.largest_worker_mb for s in samples):.0f} MB")
    return 0 if summary["extracted"] == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
