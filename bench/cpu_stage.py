"""Benchmark: qprep's CPU stage against the reference path, wall time and memory per video.

Requires FFmpeg from the system, beside the Python packages of the virtualenv:

    apt-get install -y ffmpeg   # Debian's libavcodec/libavformat (torchcodec loads them) and the
                                # ffmpeg binary (audioread, the reference audio path, runs it)

What is compared, for each video × frame policy:

* qprep: `qprep.preprocess_video(path, fps=2.0 | num_frames=100, audio=...)` with transformers'
  Qwen2-VL processor defaults (min_pixels 128·28·28, max_pixels 768·28·28);
* reference: qwen-vl-utils' `process_vision_info` (or qwen-omni-utils' `process_mm_info` with
  `use_audio_in_video=True` for the audio rows) with each video reader backend
  (FORCE_QWENVL_VIDEO_READER = torchcodec, decord, torchvision), given the same pixel bounds,
  followed by transformers' `Qwen2VLVideoProcessor()` (`do_sample_frames=False`,
  `cap_pixels_per_frame=False`) on the frames and, for the audio rows, transformers'
  `WhisperFeatureExtractor` (128 bins, 300 s window, `padding="max_length"`) on the waveform.
  qwen-vl-utils silently falls back to torchvision when a backend fails; a run whose returned
  metadata names another backend than the one asked for is reported as n/a with the error.

How it is measured: every run is a fresh Python process, so nothing is shared between runs. The
process imports everything, builds the processors, and warms up by preparing a tiny clip the same
way. Then it hands freed heap memory back to the kernel (glibc's malloc_trim), records its
resident set (VmRSS), resets the kernel's peak-RSS mark (writing 5 to /proc/self/clear_refs) and
times the one call; the memory gain is the peak (VmHWM) after the call minus the RSS before it, so
it counts every byte the call held at its worst moment, the result included, with no sampling
gaps. Where the reset is not permitted, a thread samples VmRSS every 5 ms instead. The ffmpeg
child process that audioread runs for the reference audio rows is not counted. Decoder threads
are left at each library's default (qprep: one per core; torchcodec via qwen-vl-utils: 8).
With --repeats N each run is repeated in N fresh processes: the table shows the fastest wall time
and the largest memory gain.

The speedup of a row is the wall time of the fastest working reference backend on the same video
and policy divided by the row's wall time; the memory ratio is the row's gain over that reference's
gain. The goal: qprep at least 1.5× faster on the median row, never slower on any row, and a memory
gain at most 1/3 of the reference's on every row.

Reproduce (from the repository root, with the virtualenv active):

    python bench/cpu_stage.py                      # full run, several minutes
    python bench/cpu_stage.py --quick              # 1/10 of the durations, a smoke run
    python bench/cpu_stage.py --repeats 3 --json bench.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIN_PIXELS = 128 * 28 * 28
MAX_PIXELS = 768 * 28 * 28
PATHS = ("qprep", "torchcodec", "decord", "torchvision")
POLICIES = {
    "fps 2": {"fps": 2.0, "audio": False},
    "100 frames": {"num_frames": 100, "audio": False},
    "fps 2 + audio": {"fps": 2.0, "audio": True},
}
RESULT_TAG = "BENCH-RESULT "
WORKER_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Video:
    name: str
    width: int
    height: int
    fps: int
    seconds: float
    gop_seconds: float

    def file(self, workdir: Path) -> Path:
        return workdir / f"{self.name}-{self.width}x{self.height}-{self.seconds:g}s-gop{self.gop_seconds:g}.mp4"


VIDEOS = (
    Video("720p30", 1280, 720, 30, 60.0, 2.0),
    Video("360p30", 640, 360, 30, 180.0, 4.0),
    Video("1080p60", 1920, 1080, 60, 10.0, 3.0),
)
WARMUP = Video("warmup", 320, 240, 30, 4.0, 2.0)  # 120 frames: enough for the 100-frame policy


@dataclass
class Row:
    video: str
    policy: str
    path: str
    wall_s: float | None = None
    mem_gain_mb: float | None = None
    grid_thw: list[int] | None = None
    mel_length: int | None = None
    error: str | None = None
    speedup: float | None = None
    mem_ratio: float | None = None
    note: str | None = None

    @property
    def works(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------------------------------------
# Inputs


def ensure_video(video: Video, workdir: Path) -> Path:
    """Encode the video once; later runs reuse the file."""
    from qprep.synth import make_video

    path = video.file(workdir)
    if not path.exists():
        print(f"encoding {path.name} …", file=sys.stderr, flush=True)
        partial = path.with_name("partial-" + path.name)
        make_video(partial, width=video.width, height=video.height, fps=video.fps, seconds=video.seconds,
                   gop_seconds=video.gop_seconds, audio=True)
        partial.rename(path)
    return path


def bench_videos(quick: bool) -> tuple[Video, ...]:
    if not quick:
        return VIDEOS
    return tuple(Video(v.name, v.width, v.height, v.fps, max(v.seconds / 10, WARMUP.seconds), v.gop_seconds)
                 for v in VIDEOS)


# ---------------------------------------------------------------------------------------------
# The two paths (run inside the worker process)


def qprep_runner(policy: dict):
    import qprep

    def run(path: str) -> dict:
        prepared = qprep.preprocess_video(path, **policy)
        return {"keep": prepared, "backend": "qprep", "grid_thw": prepared.video_grid_thw[0].tolist(),
                "mel_length": prepared.mel_length if policy["audio"] else None}

    return run


def reference_runner(backend: str, policy: dict):
    """qwen-vl-utils / qwen-omni-utils + transformers, as a training script would call them."""
    from transformers import Qwen2VLVideoProcessor, WhisperFeatureExtractor

    processor = Qwen2VLVideoProcessor()
    extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
                                        chunk_length=300, n_fft=400)
    sampling = {"fps": policy["fps"]} if "fps" in policy else {"nframes": policy["num_frames"]}

    def run(path: str) -> dict:
        element = {"type": "video", "video": path, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, **sampling}
        conversation = [{"role": "user", "content": [element]}]
        audios = None
        if policy["audio"]:
            from qwen_omni_utils import process_mm_info

            audios, _, videos, _ = process_mm_info(conversation, use_audio_in_video=True,
                                                   return_video_kwargs=True, return_video_metadata=True)
        else:
            from qwen_vl_utils import process_vision_info

            _, videos, _ = process_vision_info(conversation, return_video_kwargs=True, return_video_metadata=True)
        frames, metadata = videos[0]
        vision = processor(videos=[frames], do_sample_frames=False, cap_pixels_per_frame=False, return_tensors="pt")
        result = {"keep": [vision], "backend": metadata.get("video_backend"),
                  "grid_thw": vision["video_grid_thw"][0].tolist(), "mel_length": None}
        if audios is not None:
            features = extractor(audios, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                                 return_tensors="pt")
            result["keep"].append(features)
            result["mel_length"] = int(features["attention_mask"].sum())
        return result

    return run


# ---------------------------------------------------------------------------------------------
# Memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_free_heap() -> None:
    """Hand freed malloc memory back to the kernel (glibc), so that memory the warm-up freed but
    the allocator kept neither inflates the baseline nor hides part of the call's own gain."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak RSS gained inside the block: the kernel's reset high-water mark, else a 5 ms sampler."""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        release_free_heap()
        self.baseline_kb = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self._sampler = None
        except OSError:
            self._peak_kb, self._stop = self.baseline_kb, threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak_kb = max(self._peak_kb, _status_kb("VmRSS"))

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            peak_kb = _status_kb("VmHWM")
        else:
            self._stop.set()
            self._sampler.join()
            peak_kb = max(self._peak_kb, _status_kb("VmRSS"))
        self.gain_mb = (peak_kb - self.baseline_kb) / 1024


# ---------------------------------------------------------------------------------------------
# Worker: one measurement in this (fresh) process


class _Warnings(logging.Handler):
    """Keeps warnings (qwen-vl-utils reports a backend failure only as one, then falls back)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_worker(job: dict) -> dict:
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)
    try:
        if job["path"] == "qprep":
            run = qprep_runner(job["policy"])
        else:
            run = reference_runner(job["path"], job["policy"])
        check_backend(run(job["warmup"]), job["path"])
        gc.collect()
        with PeakMemory() as memory:
            start = time.perf_counter()
            result = run(job["video"])
            wall = time.perf_counter() - start
        check_backend(result, job["path"])
    except Exception as exc:  # any failure of a path is a table entry, not a crash
        return {"error": failure_reason(exc, warnings)}
    return {
        "wall_s": wall,
        "mem_gain_mb": memory.gain_mb,
        "grid_thw": result["grid_thw"],
        "mel_length": result["mel_length"],
    }


class BackendFallback(RuntimeError):
    pass


def check_backend(result: dict, path: str) -> None:
    if result["backend"] != path:
        raise BackendFallback(f"qwen-vl-utils fell back to {result['backend']}")


def failure_reason(exc: Exception, warnings: _Warnings) -> str:
    fallback = [m for m in warnings.messages if "video_reader_backend" in m]
    if fallback:  # the backend's own error, not the fallback's
        return fallback[0].split("msg: ", 1)[-1]
    return f"{type(exc).__name__}: {exc}"


def worker_main(job_json: str) -> None:
    result = run_worker(json.loads(job_json))
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver: fresh processes, the table, the goal


def measure(video: str, policy: str, path: str, files: dict[str, str], repeats: int) -> Row:
    job = {"path": path, "policy": POLICIES[policy], "video": files[video], "warmup": files["warmup"]}
    env = {k: v for k, v in os.environ.items() if k != "FORCE_QWENVL_VIDEO_READER"}
    if path != "qprep":
        env["FORCE_QWENVL_VIDEO_READER"] = path
    runs = []
    for _ in range(repeats):
        runs.append(run_once(job, env))
        if "error" in runs[-1]:
            return Row(video, policy, path, error=runs[-1]["error"])
    return Row(video, policy, path,
               wall_s=min(r["wall_s"] for r in runs),
               mem_gain_mb=max(r["mem_gain_mb"] for r in runs),
               grid_thw=runs[0]["grid_thw"],
               mel_length=runs[0]["mel_length"])


def run_once(job: dict, env: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"worker exited {done.returncode}: {tail}"}


def compare(rows: list[Row]) -> None:
    """Fill in speedup and memory ratio against the fastest working reference of each group, and
    note any row whose output shape differs from that reference's."""
    for group in groups(rows).values():
        references = [r for r in group if r.works and r.path != "qprep"]
        if not references:
            continue
        fastest = min(references, key=lambda r: r.wall_s)
        for row in filter(lambda r: r.works, group):
            row.speedup = fastest.wall_s / row.wall_s
            row.mem_ratio = row.mem_gain_mb / fastest.mem_gain_mb if fastest.mem_gain_mb > 0 else None
            if (row.grid_thw, row.mel_length) != (fastest.grid_thw, fastest.mel_length):
                row.note = (f"output differs from {fastest.path}: grid {row.grid_thw} vs {fastest.grid_thw}, "
                            f"mel frames {row.mel_length} vs {fastest.mel_length}")


def groups(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    grouped: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        grouped.setdefault((row.video, row.policy), []).append(row)
    return grouped


def verdict(rows: list[Row]) -> dict:
    qprep = [r for r in rows if r.path == "qprep"]
    compared = [r for r in qprep if r.speedup is not None]
    ratios = [r.mem_ratio for r in compared]
    summary = {
        "qprep_rows": len(qprep),
        "rows_compared": len(compared),
        "median_speedup": statistics.median(r.speedup for r in compared) if compared else None,
        "min_speedup": min((r.speedup for r in compared), default=None),
        "max_mem_ratio": None if None in ratios or not ratios else max(ratios),
    }
    summary["goal_met"] = bool(
        compared and len(compared) == len(qprep)
        and summary["median_speedup"] >= 1.5
        and summary["min_speedup"] >= 1.0
        and summary["max_mem_ratio"] is not None and summary["max_mem_ratio"] <= 1 / 3
    )
    return summary


def fmt(value, pattern: str, suffix: str = "") -> str:
    return "" if value is None else format(value, pattern) + suffix


TABLE_HEADER = ("video", "policy", "path/backend", "wall s", "mem gain MB", "speedup", "mem ratio", "grid t,h,w",
                "note")


def table_cells(row: Row) -> tuple[str, ...]:
    if not row.works:
        return (row.video, row.policy, row.path, "n/a", "", "", "", "", row.error)
    return (row.video, row.policy, row.path, fmt(row.wall_s, ".2f"), fmt(row.mem_gain_mb, ".0f"),
            fmt(row.speedup, ".2f", "x"), fmt(row.mem_ratio, ".2f"), ",".join(map(str, row.grid_thw)),
            row.note or "")


def print_table(rows: list[Row], summary: dict) -> None:
    lines = [TABLE_HEADER, *map(table_cells, rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_HEADER) - 1)]
    for number, line in enumerate(lines):
        cells = [c.rjust(w) if 3 <= i < 7 and number else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        print(" | ".join([*cells, line[-1]]).rstrip(" |"))
        if number == 0:
            print("-+-".join("-" * w for w in widths) + "-+-" + "-" * 4)
    print(f"\nqprep speedup over the fastest working reference: median {fmt(summary['median_speedup'], '.2f', 'x')}"
          f" over {summary['rows_compared']}/{summary['qprep_rows']} rows, slowest row "
          f"{fmt(summary['min_speedup'], '.2f', 'x')}; largest memory ratio {fmt(summary['max_mem_ratio'], '.2f')}")
    print("goal (>= 1.5x on the median row, never slower, memory gain <= 1/3 of the reference's): "
          + ("MET" if summary["goal_met"] else "NOT MET"))


def environment() -> dict:
    packages = ("torch", "torchvision", "torchcodec", "decord", "av", "transformers", "qwen-vl-utils",
                "qwen-omni-utils", "librosa")
    versions = {}
    for name in packages:
        try:
            versions[name] = version(name)
        except Exception:
            versions[name] = None
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(), **versions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qprep-bench"), help="where the videos are cached")
    parser.add_argument("--quick", action="store_true", help="1/10 of the durations (at least 4 s): a smoke run")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per run; the fastest is shown")
    parser.add_argument("--json", type=Path, help="also write the table and the verdict here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    videos = bench_videos(args.quick)
    files = {v.name: str(ensure_video(v, args.workdir)) for v in (WARMUP, *videos)}
    env = environment()
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows = []
    for video in videos:
        for policy in POLICIES:
            for path in PATHS:
                print(f"  {video.name} | {policy} | {path} …", file=sys.stderr, flush=True)
                rows.append(measure(video.name, policy, path, files, max(1, args.repeats)))
    compare(rows)
    summary = verdict(rows)
    print()
    print_table(rows, summary)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "videos": [asdict(v) for v in videos],
                                         "rows": [asdict(r) for r in rows], "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
