"""Benchmark: `qprep extract` against a plain sequential loop, and the cost of a re-run that has nothing to do.

What is compared (same videos, same tiny Qwen2.5-Omni checkpoint with the real classes and key
layout, float32, fps 2 with audio):

* qprep, with each executor (`--executor local`: CPU-stage processes forked from one server
  process and the towers in the driver; `--executor ray`: Ray Data CPU tasks feeding the tower
  actor): the `qprep extract` CLI on a fresh store (probe, sparse decode, resize, patchify,
  log-mel, towers, shards committed to a Zarr store). "cold" is the whole CLI process (Python
  start, imports, the worker processes or the local Ray it starts and stops, the towers loading).
  "warm" runs `qprep.extraction.run.extract` in a process where a first extract of two short clips
  has warmed the workers (Ray already up; or the worker server started), so it leaves start-up and
  first imports out (each extract still loads its own towers). The same process then extracts 2N
  videos (the N and N more) into another fresh store: "marginal" is the difference, what N more
  videos cost once the fixed costs are paid. The two executors' cold stores are checked to be the
  same bytes. From the cold and marginal rows, each executor's run is modelled as fixed cost + n ×
  cost per video, and the crossover (the plan size above which Ray is faster, if it is cheaper per
  video) is printed: `--executor auto` runs plans up to LOCAL_MAX_VIDEOS in process.
* reference: one Python process looping over the videos as a training script would:
  qwen-vl-utils' `fetch_video` (fps 2, the model's min/max pixels; reader forced with
  FORCE_QWENVL_VIDEO_READER, decord by default), transformers' `Qwen2VLVideoProcessor` from the
  model dir, qwen-omni-utils' audio loading (audioread + librosa at 16 kHz; where the ffmpeg
  program audioread needs is missing, the whole track through PyAV at 16 kHz instead, as the
  Qwen3-Omni loop reads it) and
  `WhisperFeatureExtractor` from the model dir (padding="max_length", return_attention_mask=True,
  as the Omni processor calls it), then the full model's
  `Qwen2_5OmniForConditionalGeneration.from_pretrained(...).thinker` `get_video_features(...)
  .pooler_output` and `get_audio_features(...).last_hidden_state`; each video's tokens are saved
  with numpy. It prepares one warm-up clip, then loops over the same 2N videos, timing each:
  "warm" is its loop over the first N, "cold" the process wall time minus the warm-up clip and
  the second N, and its loop over the second N is what qprep's marginal row is compared with.

Both sides report the frames and token counts they produced, as a check that they did the same work.

Memory: while a measured process runs, a thread samples its process tree every 0.2 s (the Ray
raylet, GCS and workers, or audioread's ffmpeg children, are all descendants) and keeps the largest
sum of RSS and of PSS (PSS splits shared pages, e.g. Ray's object store, between the processes that
map them; the RSS sum counts them once per process). The driver's own peak is its VmHWM (a fresh
process, so the high-water mark covers its whole life).

CPU: the tree's CPU seconds (each process's utime + stime as last sampled, or the reaped children's
rusage if larger), and "others' cores": how many cores anything else kept busy meanwhile (from
/proc/stat). On a shared 2-core machine a test run next door halves a measurement; before each
measured process the bench waits (up to --quiet-wait s) for the machine to go idle, and the column
says how well that worked. Several --repeats keep the fastest run.

No-op re-run: a folder of --noop-videos entries (hard links to four tiny clips, 100 per
subdirectory; the 11 entries the bench touches or modifies are real copies) is extracted once
(`--num-frames 4 --size 56x56 --no-audio`, cached in the workdir), then the bench times the whole
`qprep extract` CLI process on the unchanged folder (page cache warm, after one un-timed settling
run), after `touch`ing 10 files (re-hash, no extraction), and after replacing 1 file's bytes
(one extraction, so Ray starts). The summaries are checked: nothing extracted and Ray not started,
10 touched, 1 extracted.

Qwen3-VL (`--family qwen3_vl`): the same throughput rows on the same videos, with a Qwen3-VL
checkpoint (bench/qwen3vl.py: the real classes and key layout; the vision tower at Qwen3-VL-8B's
released width, hidden 1152, MLP 4304, 16 heads, patch 16, temporal 2, merge 2, 2304 position
embeddings, out_hidden_size 4096, with --vision-depth blocks (default 9 of the 8B's 27) and the
three deepstack levels at the released relative depths, [2, 5, 8] of 9 for [8, 16, 24] of 27; a
2-layer language model of width --hidden, which extraction never runs), fps 2, no audio
(`--no-audio`), float32. Qwen3VLVideoProcessor's `size` is a pixel budget over all frames of the
clip: both sides resize within --min-pixels..--max-pixels per clip (default 4·32²..256·32², the
checkpoint's own; the 8B's release allows up to 25,165,824). The reference loop reads each video
with qwen-vl-utils' reader (decord; its fps-2 frame choice, frames at the decoded size, so that the
processor's own per-clip resize applies, which is what qprep reproduces; `fetch_video` would first
resize every frame by its per-frame rules), runs the checkpoint's `Qwen3VLVideoProcessor`
(do_sample_frames=False) and `Qwen3VLForConditionalGeneration.from_pretrained(...).model`
`.get_video_features(...)`, and saves the merged tokens and the deepstack levels ([levels, n, d])
with numpy. A second table gives the bytes per video of the cold run's store from
`qprep.store.status.store_status(store)["token_bytes"]` (rows × row shape × item size of each token
array: `video` [n, 4096] and `deepstack` [n, 3, 4096]), and of the reference's .npy files. The no-op
re-run is not repeated (it hashes files and starts no tower; the Omni run measures it).

Qwen3-Omni (`--family qwen3_omni_moe`): the same throughput rows on the same videos, with audio, on a
Qwen3-Omni checkpoint (bench/qwen3omni.py: the full Qwen3OmniMoeForConditionalGeneration, real
classes and key layout; the towers at Qwen3-Omni-30B-A3B's released widths, vision 1152 wide / MLP
4304 / 16 heads / patch 16 / temporal 2 / merge 2 / 2304 position embeddings with --vision-depth
blocks, default 9 of 27, deepstack at [2, 5, 8]; audio d_model 1280 / 20 heads / FFN 5120 / 128 mel
bins / n_window 50 with --audio-layers layers, default 8 of 32; both out 2048 as released; a 2-layer
MoE language model of width --hidden, which extraction never runs), fps 2 + audio, float32. Its
video processor is Qwen2VLVideoProcessor, bounds per frame as Qwen2.5-Omni's: both sides resize
within --min-pixels..--max-pixels per frame (default 4·32²..64·32², the checkpoint's own; the
processor's own default is 128·32²..768·32²). The reference loop reads video as the Qwen2.5-Omni
loop does (qwen-vl-utils' `fetch_video`, decord, fps 2, the per-frame bounds, `image_patch_size`
16), the whole audio track with PyAV at 16 kHz (channels averaged; qwen-omni-utils and librosa are
not needed), runs the checkpoint's `AutoProcessor` (Qwen3OmniMoeProcessor) on the frames and the
track (its own feature-extractor call: padded to the track's own length, never truncated), and
`Qwen3OmniMoeForConditionalGeneration.from_pretrained(...).thinker`'s `get_video_features(...)`
(merged tokens and deepstack levels) and `get_audio_features(...).last_hidden_state`, saving each
with numpy. The bytes table adds the audio array (`audio` [n, 2048]). No no-op re-run.

Goals stated by the project: a cold CLI run of the small folder (the executor `auto` picks for it)
>= 1.5x the reference's whole process; each further video >= 3x the loop's; the no-op re-run over
10,000 videos < 5 s.

Reproduce (from the repository root, with the virtualenv active; videos, model and the 10,000-video
store are cached in --workdir, so only the first run pays for them):

    python bench/extract.py                          # everything (first run ~12 min, then ~5 min)
    python bench/extract.py --skip-noop --videos 8   # the throughput comparison only, a smoke run
    python bench/extract.py --repeats 3 --json extract.json   # ~8 min more; what the report used
    python bench/extract.py --family qwen3_vl --videos 4 --quiet-wait 30   # Qwen3-VL smoke run (~7 min)
    python bench/extract.py --family qwen3_vl --videos 16 --max-pixels 1048576   # larger frames (long)
    python bench/extract.py --family qwen3_omni_moe --videos 4 --quiet-wait 30   # Qwen3-Omni smoke run (~7 min)
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
from dataclasses import asdict, dataclass
from pathlib import Path

import machine  # bench/machine.py: what the run was measured on, and how busy it was
from machine import QUIET, children_cpu_s, system_busy_s, wait_for_quiet

PACKAGES = ("torch", "transformers", "ray", "av", "decord", "qwen-vl-utils", "qwen-omni-utils", "zarr")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FPS = 2.0
# Frame-size bounds both paths resize within (the tiny checkpoint's video processor config): the Omni
# processor's own default (128·28² and up) would make the bench time the resize of upscaled frames.
PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64}
SIZES = ((320, 240), (480, 270), (640, 360))
SECONDS = (5, 8, 10, 12, 15)
RATES = (25, 30)
NOOP_FLAGS = ("--num-frames", "4", "--size", "56x56", "--no-audio")
NOOP_SHAPES = ((64, 64), (96, 64), (64, 96), (80, 80))  # the tiny clips the no-op folder links to
TOUCHED, MODIFIED = 10, 1
RESULT_TAG = "BENCH-RESULT "
SAMPLE_EVERY_S = 0.2
TIMEOUT_S = 3600
THROUGHPUT_GOAL, NOOP_GOAL_S = 3.0, 5.0
COLD_GOAL = 1.5  # a first run on a small folder, the whole CLI process against the reference's
EXECUTORS = ("local", "ray")
DEFAULT_SMALL = "local"  # what --executor auto runs for a small plan without a cluster

FAMILIES = ("qwen2_5_omni", "qwen3_vl", "qwen3_omni_moe")
# Qwen3-VL (--family qwen3_vl): Qwen3VLVideoProcessor's `size` bounds the pixels of the whole clip
# (all frames together), not of a frame. The default is the bench checkpoint's own processor config
# (4..256 merged tokens of 32² pixels per clip); Qwen3-VL-8B's release allows 4096..25165824.
QWEN3_VL_PIXELS = {"min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 256}
QWEN3_VL_TEXT_LAYERS = 2
# Qwen3-Omni (--family qwen3_omni_moe): its video processor is Qwen2VLVideoProcessor, whose bounds are
# per frame. The default is the bench checkpoint's own video processor config (4..64 merged tokens of
# 32² pixels per frame, Qwen2.5-Omni's row's 4..64 × 28² at the 16-pixel patch); Qwen3OmniMoeProcessor's
# own video default, 128·32²..768·32² per frame, would upscale these clips.
QWEN3_OMNI_PIXELS = {"min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 64}
QWEN3_OMNI_TEXT_LAYERS = 2
DEFAULT_PIXELS = {"qwen3_vl": QWEN3_VL_PIXELS, "qwen3_omni_moe": QWEN3_OMNI_PIXELS}


@dataclass(frozen=True)
class Mode:
    """What differs between the families the bench runs: model, pixel bounds, audio, store folder."""

    family: str
    pixels: dict
    audio: bool
    stores: str  # folder of the stores under the workdir
    description: str  # of the model, for the table's title

    @property
    def cli_flags(self) -> tuple[str, ...]:
        flags = ("--fps", str(FPS), "--min-pixels", str(self.pixels["min_pixels"]), "--max-pixels",
                 str(self.pixels["max_pixels"]))
        return flags if self.audio else (*flags, "--no-audio")


# ---------------------------------------------------------------------------------------------
# Inputs (generated once into the workdir)


def ensure_model(workdir: Path, hidden: int) -> Path:
    from qprep.models.tiny import make_tiny_model

    path = workdir / f"tiny-omni-h{hidden}"
    if not (path / "config.json").is_file():
        print(f"building {path.name} …", file=sys.stderr, flush=True)
        shutil.rmtree(path, ignore_errors=True)
        make_tiny_model("qwen2_5_omni", path, hidden=hidden)
    return path


def clip_spec(index: int):
    """The index-th benchmark video: sizes, lengths and frame rates cycle with co-prime periods."""
    from qprep.synth import VideoSpec

    width, height = SIZES[index % len(SIZES)]
    return VideoSpec(width=width, height=height, seconds=SECONDS[index % len(SECONDS)],
                     fps=RATES[index % len(RATES)], audio=True)


def ensure_clip(path: Path, spec) -> Path:
    """Encode once (through a temporary name, so an interrupted run leaves no half file)."""
    from qprep.synth import make_video

    if not path.exists():
        partial = path.with_name("partial-" + path.name)
        make_video(partial, spec)
        partial.rename(path)
    return path


def ensure_videos(workdir: Path, count: int) -> tuple[Path, Path, Path]:
    """Folders with the first `count` and the first 2·`count` benchmark videos (hard links into the
    cache), and one with two short warm-up clips. Returns (videos, twice as many, warm-up)."""
    from qprep.synth import VideoSpec

    cache, warmup = workdir / "clips", workdir / "warmup"
    folders = (workdir / f"videos-{count}", workdir / f"videos-{2 * count}")
    for directory in (cache, warmup, *folders):
        directory.mkdir(parents=True, exist_ok=True)
    for index in range(2 * count):
        spec = clip_spec(index)
        name = f"v{index:03d}-{spec.width}x{spec.height}-{spec.seconds}s-{spec.fps}fps.mp4"
        if not (cache / name).exists():
            print(f"encoding {name} …", file=sys.stderr, flush=True)
        source = ensure_clip(cache / name, spec)
        for folder in folders[index >= count:]:
            if not (folder / name).exists():
                os.link(source, folder / name)
    for index in range(2):
        ensure_clip(warmup / f"w{index}.mp4", VideoSpec(width=320, height=240, seconds=3, fps=25, audio=True))
    return folders[0], folders[1], warmup


@dataclass
class NoopTree:
    videos: Path
    store: Path
    touch: list[Path]  # real copies, so touching them touches nothing else
    modify: Path
    variants: tuple[Path, Path]  # two clips of different bytes, swapped into `modify`


def ensure_noop_tree(workdir: Path, count: int) -> NoopTree:
    from qprep.synth import VideoSpec

    base = workdir / f"noop-{count}"
    clips = [ensure_clip(workdir / "noop-clips" / f"c{w}x{h}.mp4",
                         VideoSpec(width=w, height=h, seconds=2, fps=25, audio=False)) for w, h in NOOP_SHAPES]
    variants = tuple(ensure_clip(workdir / "noop-clips" / f"variant{i}.mp4",
                                 VideoSpec(width=72, height=72, seconds=2 + i, fps=25, audio=False)) for i in (0, 1))
    videos = base / "videos"
    copies = TOUCHED + MODIFIED
    for index in range(count):
        path = videos / f"{index // 100:03d}" / f"clip{index:05d}.mp4"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if index < copies:
            shutil.copyfile(clips[index % len(clips)], path)
        else:
            os.link(clips[index % len(clips)], path)
    entries = [videos / f"{i // 100:03d}" / f"clip{i:05d}.mp4" for i in range(copies)]
    return NoopTree(videos=videos, store=base / "store.zarr", touch=entries[:TOUCHED], modify=entries[TOUCHED],
                    variants=variants)


# ---------------------------------------------------------------------------------------------
# Measuring a process: wall time and the memory of its whole tree


TICK = machine.TICK


def _kb(path: str, fields: tuple[str, ...]) -> dict[str, int]:
    values = {}
    with open(path) as handle:
        for line in handle:
            name = line.split(":", 1)[0]
            if name in fields:
                values[name] = int(line.split()[1])
    return values


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (/proc/PID/stat utime, stime)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class TreeMonitor:
    """Samples a process tree every SAMPLE_EVERY_S: the peak sums of RSS and PSS, the peak number
    of processes, the root's VmHWM, and each process's CPU time as last seen."""

    def __init__(self, pid: int):
        self.pid = pid
        self.rss_kb = self.pss_kb = self.root_hwm_kb = self.processes = self.largest_child_rss_kb = 0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(SAMPLE_EVERY_S):
                return

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            pids = [self.pid, *(child.pid for child in root.children(recursive=True))]
            self.root_hwm_kb = max(self.root_hwm_kb, _kb(f"/proc/{self.pid}/status", ("VmHWM",))["VmHWM"])
        except (psutil.Error, OSError, KeyError):
            return
        rss = pss = 0
        for pid in pids:
            try:
                rollup = _kb(f"/proc/{pid}/smaps_rollup", ("Rss", "Pss"))
                self.cpu[pid] = _cpu_s(pid)
            except OSError:
                continue
            rss, pss = rss + rollup.get("Rss", 0), pss + rollup.get("Pss", 0)
            if pid != self.pid:
                self.largest_child_rss_kb = max(self.largest_child_rss_kb, rollup.get("Rss", 0))
        self.rss_kb, self.pss_kb = max(self.rss_kb, rss), max(self.pss_kb, pss)
        self.processes = max(self.processes, len(pids))


@dataclass
class Measured:
    wall_s: float
    returncode: int
    stdout: str
    stderr: str
    tree_rss_mb: float
    tree_pss_mb: float
    root_hwm_mb: float
    processes: int
    cpu_s: float  # the tree's CPU time (a lower bound: the last 0.2 s of each process can be missed)
    others_cores: float  # cores busy with anything else meanwhile (other users' work included)
    largest_child_rss_mb: float = 0.0  # the largest single descendant (a Ray worker, the raylet, ...)


def run_measured(command: list[str], env: dict | None = None) -> Measured:
    wait_for_quiet()
    busy, children, own = system_busy_s(), children_cpu_s(), time.process_time()
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMonitor(process.pid) as monitor:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    wall = time.perf_counter() - start
    # Reaped descendants (ffmpeg under the reference) are in RUSAGE_CHILDREN; Ray's workers are not.
    cpu = max(sum(monitor.cpu.values()), children_cpu_s() - children)
    others = max(0.0, system_busy_s() - busy - cpu - (time.process_time() - own)) / wall
    return Measured(wall, process.returncode, stdout, stderr, monitor.rss_kb / 1024, monitor.pss_kb / 1024,
                    monitor.root_hwm_kb / 1024, monitor.processes, cpu, others, monitor.largest_child_rss_kb / 1024)


def qprep_cli() -> list[str]:
    script = Path(sys.executable).parent / "qprep"
    return [str(script)] if script.exists() else [sys.executable, "-m", "qprep.cli"]


def run_cli_extract(videos: Path, store: Path, model: Path, flags: tuple[str, ...]) -> tuple[Measured, dict]:
    """`qprep extract … --quiet --json` as a user runs it; returns the measurement and its summary."""
    command = [*qprep_cli(), "extract", "--videos", str(videos), "--out", str(store), "--model", str(model),
               "--dtype", "float32", *flags, "--quiet", "--json"]
    measured = run_measured(command)
    if measured.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {measured.returncode}:\n{measured.stderr[-3000:]}")
    return measured, parse_summary(measured.stdout)


def parse_summary(stdout: str) -> dict:
    """The JSON summary is the last top-level object on stdout."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def run_worker(job: dict, env: dict | None = None) -> tuple[Measured, dict]:
    """This script in a fresh process, doing one measured job; returns what it reported."""
    measured = run_measured([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)], env)
    for line in reversed(measured.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return measured, json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"worker {job['kind']} exited {measured.returncode}:\n{measured.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------
# Workers (each in a fresh process)


def reference_worker(job: dict) -> dict:
    """The sequential loop a training script would write with the Qwen utilities and transformers."""
    begun = time.perf_counter()
    import numpy as np
    import torch
    from qwen_omni_utils.v2_5.audio_process import process_audio_info
    from qwen_vl_utils import fetch_video
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2VLVideoProcessor, WhisperFeatureExtractor

    model = job["model"]
    video_processor = Qwen2VLVideoProcessor.from_pretrained(model)  # its config holds the bounds in PIXELS
    feature_extractor = WhisperFeatureExtractor.from_pretrained(model)
    thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(model, dtype=torch.float32).thinker.eval()
    pixels = PIXELS
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    # qwen-omni-utils reads audio through audioread, which needs the ffmpeg program; without it,
    # the whole track through PyAV (FFmpeg's own resampler, about the same work)
    with_ffmpeg = shutil.which("ffmpeg") is not None

    @torch.inference_mode()
    def one(path: str) -> tuple[int, int, int]:
        element = {"type": "video", "video": path, "fps": FPS, **pixels}
        (frames, metadata), _ = fetch_video(element, return_video_sample_fps=True, return_video_metadata=True)
        if metadata.get("video_backend") != job["reader"]:
            raise RuntimeError(f"qwen-vl-utils read {path} with {metadata.get('video_backend')}, not {job['reader']}")
        vision = video_processor(videos=[frames], do_sample_frames=False, cap_pixels_per_frame=False,
                                 return_tensors="pt")
        waveform = (process_audio_info([{"role": "user", "content": [element]}], use_audio_in_video=True)[0]
                    if with_ffmpeg else pyav_audio(path, 16000))
        audio = feature_extractor(waveform, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                                  return_tensors="pt")
        video_tokens = thinker.get_video_features(vision["pixel_values_videos"], vision["video_grid_thw"]).pooler_output
        video_tokens = torch.cat(list(video_tokens)) if isinstance(video_tokens, (list, tuple)) else video_tokens
        audio_tokens = thinker.get_audio_features(audio["input_features"],
                                                  feature_attention_mask=audio["attention_mask"]).last_hidden_state
        name = Path(path).stem
        np.save(out / f"{name}.video.npy", video_tokens.numpy())
        np.save(out / f"{name}.audio.npy", audio_tokens.numpy())
        return len(frames), int(video_tokens.shape[0]), int(audio_tokens.shape[0])

    return {**timed_loop(one, job, begun), "torch_threads": torch.get_num_threads(),
            "audio_reader": "qwen-omni-utils (audioread + librosa)" if with_ffmpeg else "PyAV (no ffmpeg program)"}


def timed_loop(one, job: dict, begun: float) -> dict:
    """The reference loop's timing: `one` on the warm-up clip, then on each video, timed alone.
    `one(path)` returns (frames, video tokens, audio tokens, *file sizes); each `per_video` row is
    [frames, video tokens, audio tokens, seconds, *file sizes]."""
    loaded = time.perf_counter()
    one(job["warmup"])
    warmed = time.perf_counter()
    per_video = []
    for path in job["videos"]:
        started = time.perf_counter()
        frames, video_tokens, audio_tokens, *sizes = one(path)
        per_video.append([frames, video_tokens, audio_tokens, time.perf_counter() - started, *sizes])
    return {"load_s": loaded - begun, "warmup_s": warmed - loaded, "per_video": per_video}


def reference_qwen3_vl_worker(job: dict) -> dict:
    """The same loop for Qwen3-VL: qwen-vl-utils' video reader (its fps-2 frame choice, frames at
    the decoded size), the checkpoint's `Qwen3VLVideoProcessor` resizing the clip within its
    per-clip pixel budget, `Qwen3VLForConditionalGeneration.from_pretrained(...).model`
    `.get_video_features(...)`: merged tokens (`pooler_output`) and deepstack levels
    (`deepstack_features`, saved as one [levels, n, d] array), each with numpy."""
    begun = time.perf_counter()
    import numpy as np
    import torch
    from qwen_vl_utils.vision_process import VIDEO_READER_BACKENDS
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLVideoProcessor

    model = job["model"]
    video_processor = Qwen3VLVideoProcessor.from_pretrained(model)
    vl = Qwen3VLForConditionalGeneration.from_pretrained(model, dtype=torch.float32).model.eval()
    size = {"shortest_edge": job["pixels"]["min_pixels"], "longest_edge": job["pixels"]["max_pixels"]}
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)

    @torch.inference_mode()
    def one(path: str) -> list:
        # fetch_video would also resize each frame by its own per-frame rules (then the processor is
        # called with do_resize=False); the processor's per-clip rule is what qprep follows.
        element = {"type": "video", "video": path, "fps": FPS}
        frames, metadata, _ = VIDEO_READER_BACKENDS[job["reader"]](element)
        if metadata.get("video_backend") != job["reader"]:
            raise RuntimeError(f"qwen-vl-utils read {path} with {metadata.get('video_backend')}, not {job['reader']}")
        vision = video_processor(videos=[frames], do_sample_frames=False, size=size, return_tensors="pt")
        output = vl.get_video_features(vision["pixel_values_videos"], vision["video_grid_thw"])
        tokens = torch.cat(list(output.pooler_output))
        deepstack = torch.stack([torch.cat(list(level)) for level in output.deepstack_features])
        name = Path(path).stem
        np.save(out / f"{name}.video.npy", tokens.numpy())
        np.save(out / f"{name}.deepstack.npy", deepstack.numpy())
        return [len(frames), int(tokens.shape[0]), 0, (out / f"{name}.video.npy").stat().st_size,
                (out / f"{name}.deepstack.npy").stat().st_size]

    return {**timed_loop(one, job, begun), "torch_threads": torch.get_num_threads()}


def pyav_audio(path: str, rate: int):
    """The whole first audio track, resampled to `rate` by FFmpeg's resampler (PyAV), channels
    averaged (as librosa's to_mono), float32: in place of qwen-omni-utils' audioread + librosa loading
    (another resampler, so not the same samples; about as many)."""
    import av
    import numpy as np

    with av.open(path) as container:
        resampler = av.AudioResampler(format="fltp", rate=rate)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
    return np.concatenate([f.to_ndarray() for f in frames], axis=1).mean(axis=0, dtype=np.float32)


def reference_qwen3_omni_worker(job: dict) -> dict:
    """The same loop for Qwen3-Omni, as the Qwen2.5-Omni loop reads video (its video processor is
    Qwen2VLVideoProcessor too, with per-frame bounds): qwen-vl-utils' `fetch_video` (fps 2, the
    per-frame min/max pixels, `image_patch_size` 16), the whole audio track at 16 kHz (`pyav_audio`, so
    that the row needs neither qwen-omni-utils nor librosa, with which the Qwen2.5-Omni loop loads
    audio), the checkpoint's `AutoProcessor` (Qwen3OmniMoeProcessor) on the frames and the track in
    one call (its own feature-extractor call: padded to the track's own length, never truncated),
    then `Qwen3OmniMoeForConditionalGeneration.from_pretrained(...).thinker`'s
    `get_video_features(...)` (merged tokens `pooler_output` and the deepstack levels
    `deepstack_features`, saved as one [levels, n, d] array) and
    `get_audio_features(...).last_hidden_state`, each saved with numpy."""
    begun = time.perf_counter()
    import numpy as np
    import torch
    from qwen_vl_utils import fetch_video
    from transformers import AutoProcessor, Qwen3OmniMoeForConditionalGeneration

    model = job["model"]
    processor = AutoProcessor.from_pretrained(model)
    thinker = Qwen3OmniMoeForConditionalGeneration.from_pretrained(model, dtype=torch.float32).thinker.eval()
    pixels = job["pixels"]
    size = {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]}
    patch, rate = int(processor.video_processor.patch_size), int(processor.feature_extractor.sampling_rate)
    prompt = processor.video_token + processor.audio_token
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)

    @torch.inference_mode()
    def one(path: str) -> list:
        element = {"type": "video", "video": path, "fps": FPS, **pixels}
        (frames, metadata), _ = fetch_video(element, image_patch_size=patch, return_video_sample_fps=True,
                                            return_video_metadata=True)
        if metadata.get("video_backend") != job["reader"]:
            raise RuntimeError(f"qwen-vl-utils read {path} with {metadata.get('video_backend')}, not {job['reader']}")
        waveform = pyav_audio(path, rate)
        inputs = processor(text=[prompt], videos=[frames], audio=[waveform], do_sample_frames=False, size=size,
                           cap_pixels_per_frame=False, return_tensors="pt")
        output = thinker.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        tokens = torch.cat(list(output.pooler_output))
        deepstack = torch.stack([torch.cat(list(level)) for level in output.deepstack_features])
        audio = thinker.get_audio_features(inputs["input_features"],
                                           feature_attention_mask=inputs["feature_attention_mask"]).last_hidden_state
        name = Path(path).stem
        sizes = []
        for kind, array in (("video", tokens), ("deepstack", deepstack), ("audio", audio)):
            np.save(out / f"{name}.{kind}.npy", array.numpy())
            sizes.append((out / f"{name}.{kind}.npy").stat().st_size)
        return [len(frames), int(tokens.shape[0]), int(audio.shape[0]), *sizes]

    return {**timed_loop(one, job, begun), "files": ["video", "deepstack", "audio"],
            "torch_threads": torch.get_num_threads()}


def qprep_warm_worker(job: dict) -> dict:
    """`extract` with Ray already up and its workers warmed by a first small extract: of N videos,
    then of 2N (the same N and N more) on another fresh store."""
    import logging

    import ray

    from qprep.extraction.run import ExtractOptions, extract
    from qprep.schemas.settings import VideoSettings

    started = time.perf_counter()
    if job["executor"] == "ray":
        ray.init(include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)  # as qprep's own
    result = {"ray_init_s": time.perf_counter() - started}
    settings = VideoSettings(fps=FPS, **job.get("pixels", PIXELS), audio=job.get("audio", True))
    options = ExtractOptions(progress=False, executor=job["executor"])
    extract(job["warmup"], job["warmup_store"], job["model"], settings, dtype="float32", options=options)
    for key in ("videos", "videos_2x"):
        begun = time.perf_counter()
        summary = extract(job[key], job[key + "_store"], job["model"], settings, dtype="float32", options=options)
        result[key] = {"wall_s": time.perf_counter() - begun, **summary.to_dict()}
    if ray.is_initialized():
        ray.shutdown()
    return result


WORKERS = {"reference": reference_worker, "reference-qwen3_vl": reference_qwen3_vl_worker,
           "reference-qwen3_omni_moe": reference_qwen3_omni_worker, "qprep-warm": qprep_warm_worker}


def worker_main(job_json: str) -> None:
    job = json.loads(job_json)
    result = WORKERS[job["kind"]](job)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# The measurements (driver side)


@dataclass
class Row:
    name: str
    videos: int
    wall_s: float
    driver_mb: float | None = None
    tree_rss_mb: float | None = None
    tree_pss_mb: float | None = None
    frames: int | None = None
    video_tokens: int | None = None
    audio_tokens: int | None = None
    cpu_s: float | None = None
    others_cores: float | None = None
    note: str = ""
    ratio: float | None = None
    files: dict | None = None  # bytes of the token files the reference saved, by kind (Qwen3-VL, Qwen3-Omni)

    @property
    def per_min(self) -> float:
        return 60 * self.videos / self.wall_s


def fastest(rows: list[Row]) -> Row:
    """The fastest of repeated runs, with the largest memory seen in any of them."""
    best = min(rows, key=lambda r: r.wall_s)
    for name in ("driver_mb", "tree_rss_mb", "tree_pss_mb"):
        seen = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        setattr(best, name, max(seen) if seen else None)
    return best


def measured_fields(measured: Measured) -> dict:
    return {"driver_mb": measured.root_hwm_mb, "tree_rss_mb": measured.tree_rss_mb,
            "tree_pss_mb": measured.tree_pss_mb, "cpu_s": measured.cpu_s, "others_cores": measured.others_cores}


def measure_qprep_cold(videos: Path, model: Path, workdir: Path, count: int, mode: Mode, executor: str) -> Row:
    store = fresh(workdir / mode.stores / f"cold-{executor}.zarr")
    measured, summary = run_cli_extract(videos, store, model, (*mode.cli_flags, "--executor", executor))
    check(summary["extracted"] == count and summary["executor"] == executor, f"cold extract: {short(summary)}")
    note = (f"extract() {summary['seconds']:.1f} s of it; {measured.processes} processes; "
            f"{summary['failed']} failed")
    started = "Ray start, " if executor == "ray" else "worker processes, "
    return Row(f"qprep extract CLI --executor {executor}, cold ({started}imports, model load)", count, measured.wall_s,
               frames=summary["frames"], video_tokens=summary["video_tokens"],
               audio_tokens=summary["audio_tokens"], note=note, **measured_fields(measured))


def measure_qprep_warm(videos: Path, videos_2x: Path, warmup: Path, model: Path, workdir: Path,
                       count: int, mode: Mode, executor: str) -> tuple[Row, Row]:
    """The warm extract of N videos, and the marginal cost of N more: extract(2N) - extract(N)."""
    stores = workdir / mode.stores
    job = {"kind": "qprep-warm", "videos": str(videos), "videos_2x": str(videos_2x), "warmup": str(warmup),
           "model": str(model), "pixels": mode.pixels, "audio": mode.audio, "executor": executor,
           "warmup_store": str(fresh(stores / f"warmup-{executor}.zarr")),
           "videos_store": str(fresh(stores / f"warm-{executor}.zarr")),
           "videos_2x_store": str(fresh(stores / f"warm-2x-{executor}.zarr"))}
    measured, result = run_worker(job)
    first, double = result["videos"], result["videos_2x"]
    check(first["extracted"] == count and double["extracted"] == 2 * count, f"warm extract: {short(first)}")
    warmed = "Ray up, workers warmed" if executor == "ray" else "the worker server started"
    init = f"ray.init took {result['ray_init_s']:.1f} s; " if executor == "ray" else ""
    warm = Row(f"qprep extract() --executor {executor}, warm ({warmed})", count, first["wall_s"],
               frames=first["frames"], video_tokens=first["video_tokens"], audio_tokens=first["audio_tokens"],
               note=f"{init}memory, CPU: whole process (warm-up and 2N run included)", **measured_fields(measured))
    marginal = Row(f"qprep --executor {executor} marginal: warm extract of {2 * count} minus of {count}", count,
                   double["wall_s"] - first["wall_s"], frames=double["frames"] - first["frames"],
                   video_tokens=double["video_tokens"] - first["video_tokens"],
                   audio_tokens=double["audio_tokens"] - first["audio_tokens"],
                   note=f"extract of {2 * count}: {double['wall_s']:.1f} s")
    return warm, marginal


def measure_reference(videos: Path, videos_2x: Path, warmup: Path, model: Path, workdir: Path, count: int,
                      reader: str, mode: Mode) -> tuple[Row, Row, Row]:
    """One process looping over the 2N videos: cold and warm rows for the first N (cold: the
    process wall minus the warm-up clip and the second N), and the loop over the second N."""
    files = sorted(str(p) for p in videos_2x.glob("*.mp4"))
    first = {str(videos_2x / p.name) for p in videos.glob("*.mp4")}
    files.sort(key=lambda f: f not in first)  # the N of the qprep run first, then the N more
    kind = "reference" if mode.family == "qwen2_5_omni" else f"reference-{mode.family}"
    job = {"kind": kind, "videos": files, "warmup": str(next(warmup.glob("*.mp4"))), "model": str(model),
           "out": str(fresh(workdir / mode.stores / "reference")), "reader": reader, "pixels": mode.pixels}
    env = {**os.environ, "FORCE_QWENVL_VIDEO_READER": reader}
    measured, result = run_worker(job, env)
    head, tail = result["per_video"][:count], result["per_video"][count:]

    def totals(part: list) -> dict:
        return {k: sum(v[i] for v in part) for i, k in enumerate(("frames", "video_tokens", "audio_tokens"))}

    loop_head, loop_tail = sum(v[3] for v in head), sum(v[3] for v in tail)
    cold = Row(f"reference loop ({reader}), cold (process: imports, model load)", count,
               measured.wall_s - result["warmup_s"] - loop_tail, **totals(head),
               note=f"load {result['load_s']:.1f} s; torch threads {result['torch_threads']}; "
                    f"audio {result.get('audio_reader', 'PyAV')}; memory, CPU: "
                    f"whole process ({2 * count} videos)", **measured_fields(measured))
    warm = Row(f"reference loop ({reader}), warm (the loop alone)", count, loop_head, **totals(head))
    more = Row(f"reference loop over the {count} more videos", count, loop_tail, **totals(tail))
    if len(head[0]) > 4:  # the .npy sizes (Qwen3-VL: video, deepstack; Qwen3-Omni: and audio)
        kinds = result.get("files", ["video", "deepstack"])
        cold.files = {kind: sum(v[4 + i] for v in head) for i, kind in enumerate(kinds)}
    return cold, warm, more


def store_bytes(store: Path, count: int) -> dict:
    """What a store of `count` videos holds: bytes of each token array (`store_status`'s
    token_bytes: rows × row shape × item size), all its files, and its token count."""
    from qprep.store.status import store_status

    status = store_status(store)
    check(status["videos"]["ok"] == count, f"{store}: {status['videos']}")
    return {"videos": count, "arrays": status["token_bytes"], "files": status["bytes"],
            "video_tokens": status["tokens"]["video"], "audio_tokens": status["tokens"]["audio"],
            "levels": status["deepstack_levels"],
            "dtype": status["dtype"]}


def bytes_table(stored: dict, reference: Row) -> str:
    """Bytes per video of the qprep store, split by array, and of the reference's .npy files (with
    audio columns where the store has an audio array). "bytes / merged token": the merged tokens'
    and deepstack levels' bytes over the merged tokens."""
    count, arrays = stored["videos"], stored["arrays"]
    audio = "audio" in arrays
    header = ("what", "videos", "merged tokens / video", "video bytes / video", "deepstack bytes / video",
              "deepstack / video", *(("audio tokens / video", "audio bytes / video") if audio else ()),
              "all files / video", "bytes / merged token")

    def row(name: str, videos: int, video_tokens: int, audio_tokens: int, sizes: dict, files: int) -> tuple:
        deep = sizes.get("deepstack", 0)
        audio_columns = ((fmt(audio_tokens / videos, ".0f"), fmt(sizes.get("audio", 0) / videos, ",.0f"))
                         if audio else ())
        return (name, videos, fmt(video_tokens / videos, ".0f"), fmt(sizes["video"] / videos, ",.0f"),
                fmt(deep / videos, ",.0f"), fmt(deep / max(sizes["video"], 1), ".2f") + "x", *audio_columns,
                fmt(files / videos, ",.0f"), fmt((sizes["video"] + deep) / max(video_tokens, 1), ",.0f"))

    rows = [row(f"qprep store ({stored['levels']} deepstack levels, {stored['dtype']}; token_bytes)", count,
                stored["video_tokens"], stored["audio_tokens"], arrays, stored["files"])]
    if reference.files:
        rows.append(row("reference .npy files (first N)", reference.videos, reference.video_tokens or 0,
                        reference.audio_tokens or 0, reference.files, sum(reference.files.values())))
    return markdown(header, rows)


@dataclass
class NoopRow:
    name: str
    wall_s: float
    extracted: int
    touched: int
    executor: str  # what ran the stages: "none" when nothing needed them
    extract_s: float
    others_cores: float
    note: str = ""


def measure_noop(workdir: Path, model: Path, count: int, repeats: int) -> tuple[dict, list[NoopRow]]:
    tree = ensure_noop_tree(workdir, count)
    build = {}
    if not tree.store.exists():
        print(f"first extract of the {count}-video no-op folder (cached for later runs) …", file=sys.stderr,
              flush=True)
        measured, summary = run_cli_extract(tree.videos, tree.store, model, NOOP_FLAGS)
        check(summary["extracted"] == count, f"first extract of the no-op folder: {short(summary)}")
        build = {"wall_s": measured.wall_s, "extracted": summary["extracted"], "extract_s": summary["seconds"],
                 "tree_pss_mb": measured.tree_pss_mb, "driver_mb": measured.root_hwm_mb}
    run_cli_extract(tree.videos, tree.store, model, NOOP_FLAGS)  # settles an interrupted earlier run
    rows = []
    for _ in range(repeats):
        rows.append(noop_run("no-op (nothing changed)", tree, model, count, touched=0, extracted=0))
    for _ in range(repeats):
        now = time.time_ns()
        for path in tree.touch:
            os.utime(path, ns=(now, now))
        rows.append(noop_run(f"{TOUCHED} files touched (re-hash only)", tree, model, count, touched=TOUCHED,
                             extracted=0))
    for _ in range(repeats):
        other = next(v for v in tree.variants if v.stat().st_size != tree.modify.stat().st_size)
        shutil.copyfile(other, tree.modify)
        rows.append(noop_run(f"{MODIFIED} file replaced (1 extraction, in process)", tree, model, count, touched=0,
                             extracted=MODIFIED))
    return build, rows


def noop_run(name: str, tree: NoopTree, model: Path, count: int, touched: int, extracted: int) -> NoopRow:
    measured, summary = run_cli_extract(tree.videos, tree.store, model, NOOP_FLAGS)
    expected = "local" if extracted else None  # auto: a one-video plan runs in process
    check(summary["videos"] == count and summary["extracted"] == extracted and summary["touched"] == touched
          and summary["failed"] == 0 and summary["executor"] == expected, f"{name}: {short(summary)}")
    return NoopRow(name, measured.wall_s, summary["extracted"], summary["touched"], summary["executor"] or "none",
                   summary["seconds"], measured.others_cores, note=f"driver peak {measured.root_hwm_mb:.0f} MB")


# ---------------------------------------------------------------------------------------------
# Helpers, the table, main


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def short(summary: dict) -> str:
    keys = ("videos", "extracted", "failed", "up_to_date", "touched", "executor", "seconds", "failures")
    return json.dumps({k: summary.get(k) for k in keys})[:2000]


def environment(workdir: Path) -> dict:
    return machine.environment(workdir, PACKAGES)


def fmt(value, pattern: str) -> str:
    return "" if value is None else format(value, pattern)


def markdown(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def throughput_table(rows: list[Row]) -> str:
    header = ("run", "videos", "wall s", "videos/min", "qprep / reference", "driver peak MB", "tree peak RSS MB",
              "tree peak PSS MB", "tree CPU s", "others' cores", "frames", "video tokens", "audio tokens", "note")
    return markdown(header, [(r.name, r.videos, fmt(r.wall_s, ".1f"), fmt(r.per_min, ".1f"),
                              fmt(r.ratio, ".2f") + ("x" if r.ratio else ""), fmt(r.driver_mb, ".0f"),
                              fmt(r.tree_rss_mb, ".0f"), fmt(r.tree_pss_mb, ".0f"), fmt(r.cpu_s, ".0f"),
                              fmt(r.others_cores, ".2f"), r.frames, r.video_tokens, r.audio_tokens, r.note)
                             for r in rows])


def noop_table(rows: list[NoopRow], count: int) -> str:
    header = (f"re-run over {count} videos", "CLI wall s", "extract() s", "extracted", "touched", "executor",
              "others' cores", "note")
    return markdown(header, [(r.name, fmt(r.wall_s, ".2f"), fmt(r.extract_s, ".2f"), r.extracted, r.touched,
                              r.executor, fmt(r.others_cores, ".2f"), r.note) for r in rows])


def same_bytes(first: Path, second: Path) -> bool:
    import hashlib

    def digests(store: Path) -> dict:
        return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
                for sub in ("shards", "manifest") for p in sorted((store / sub).rglob("*")) if p.is_file()}

    return digests(first) == digests(second)


def crossover(measured: dict, count: int) -> str:
    """Where Ray's lower cost per video (if it is lower) pays for its start: each executor's run of n
    videos modelled as fixed + n · per-video, from its cold row (n = count) and its marginal row."""
    fixed, per_video = {}, {}
    for executor, (cold, _, marginal) in measured.items():
        per_video[executor] = marginal.wall_s / count
        fixed[executor] = cold.wall_s - count * per_video[executor]
    line = ", ".join(f"{e}: {fixed[e]:.1f} s + {per_video[e]:.2f} s a video" for e in EXECUTORS)
    if per_video["ray"] >= per_video["local"]:
        return f"crossover: {line}; Ray is not cheaper per video on this machine, so local wins at every size"
    videos = (fixed["ray"] - fixed["local"]) / (per_video["local"] - per_video["ray"])
    return f"crossover: {line}; Ray wins above about {videos:.0f} videos"


def compare(pairs: list[tuple[Row, Row]]) -> None:
    """Each qprep row's videos/min over its reference row's."""
    for ours, theirs in pairs:
        ours.ratio = ours.per_min / theirs.per_min


def repeated(measure, repeats: int):
    runs = [measure() for _ in range(repeats)]
    if isinstance(runs[0], tuple):
        return tuple(fastest(list(group)) for group in zip(*runs))
    return fastest(runs)


def image_row_arguments(argv: list[str]) -> list[str] | None:
    """With --images, the arguments bench/images.py runs the image row with (all of them: its own
    --workdir and --vision-depth, not this bench's); None without it."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--images", type=int)
    known, _ = first.parse_known_args(argv)
    return [arg for arg in argv if arg != "--"] if known.images else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=32, help="videos in the throughput comparison")
    parser.add_argument("--noop-videos", type=int, default=10_000, help="videos in the no-op re-run folder")
    parser.add_argument("--skip-noop", action="store_true", help="only the throughput comparison")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qprep-bench-extract"),
                        help="cache of videos, model and stores")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the fastest is shown")
    parser.add_argument("--reader", default="decord", choices=("decord", "torchvision", "torchcodec"),
                        help="qwen-vl-utils' video reader for the reference (FORCE_QWENVL_VIDEO_READER)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model's language part")
    parser.add_argument("--family", default="qwen2_5_omni", choices=FAMILIES,
                        help="qwen3_vl: a Qwen3-VL checkpoint with the 8B's vision width, no audio; qwen3_omni_moe: "
                             "a Qwen3-Omni checkpoint with the 30B-A3B's tower widths, with audio; both without the "
                             "no-op run")
    parser.add_argument("--vision-depth", type=int, default=9,
                        help="Qwen3-VL and Qwen3-Omni only: vision blocks (the releases have 27; deepstack levels at "
                             "the same relative depths)")
    parser.add_argument("--audio-layers", type=int, default=8,
                        help="Qwen3-Omni only: audio encoder layers (the release has 32)")
    parser.add_argument("--min-pixels", type=int,
                        help=f"Qwen3-VL: pixel floor of a whole clip (default {QWEN3_VL_PIXELS['min_pixels']}); "
                             f"Qwen3-Omni: of a frame (default {QWEN3_OMNI_PIXELS['min_pixels']})")
    parser.add_argument("--max-pixels", type=int,
                        help=f"Qwen3-VL: pixel budget of a whole clip, all its frames (default "
                             f"{QWEN3_VL_PIXELS['max_pixels']}); Qwen3-Omni: of a frame (default "
                             f"{QWEN3_OMNI_PIXELS['max_pixels']})")
    parser.add_argument("--quiet-wait", type=float, default=180,
                        help="before each measured run, wait up to this many seconds for the other processes "
                             "on the machine to go idle (0: never wait)")
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--images", type=int, metavar="N",
                        help="the image row instead: N and 2N photos through `qprep extract --media` against a loop "
                             "of the processor and the towers at Qwen2.5-VL-7B's width (bench/images.py; its "
                             "options, e.g. --vision-depth or --device, pass through)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    image_row = image_row_arguments(sys.argv[1:] if argv is None else argv)
    if image_row is not None:
        import images  # bench/images.py

        return images.main(image_row)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    workdir, repeats = args.workdir.resolve(), max(1, args.repeats)
    QUIET["max_wait_s"] = args.quiet_wait
    workdir.mkdir(parents=True, exist_ok=True)
    default = DEFAULT_PIXELS.get(args.family, PIXELS)
    pixels = {"min_pixels": args.min_pixels or default["min_pixels"],
              "max_pixels": args.max_pixels or default["max_pixels"]}
    if args.family == "qwen3_vl":
        import qwen3vl  # bench/qwen3vl.py: the Qwen3-VL bench checkpoint

        out_hidden = qwen3vl.QWEN3_VL_8B["vision"]["out_hidden_size"]
        model = qwen3vl.ensure_model(workdir, args.vision_depth, out_hidden, args.hidden, QWEN3_VL_TEXT_LAYERS)
        mode = Mode("qwen3_vl", pixels, audio=False, stores="stores-qwen3_vl", description=(
            f", Qwen3-VL {model.name} (vision {args.vision_depth} blocks at the 8B's width 1152, deepstack "
            f"{qwen3vl.deepstack_indexes(args.vision_depth)}, out {out_hidden}; language model "
            f"{QWEN3_VL_TEXT_LAYERS} × {args.hidden}), no audio, pixels {pixels['min_pixels']}..{pixels['max_pixels']} "
            f"per clip"))
        args.skip_noop = True  # the no-op re-run hashes files and starts no tower: the Omni run measures it
    elif args.family == "qwen3_omni_moe":
        import qwen3omni  # bench/qwen3omni.py: the Qwen3-Omni bench checkpoint

        out_hidden = qwen3omni.RELEASED_OUT  # extraction never runs the language model
        model = qwen3omni.ensure_model(workdir, args.vision_depth, args.audio_layers, out_hidden, args.hidden,
                                       QWEN3_OMNI_TEXT_LAYERS)
        mode = Mode("qwen3_omni_moe", pixels, audio=True, stores="stores-qwen3_omni_moe", description=(
            f" + audio, Qwen3-Omni {model.name} (vision {args.vision_depth} blocks at the 30B-A3B's width 1152, "
            f"deepstack {qwen3omni.deepstack_indexes(args.vision_depth)}; audio {args.audio_layers} layers at its "
            f"width 1280; out {out_hidden}; MoE language model {QWEN3_OMNI_TEXT_LAYERS} × {args.hidden}), pixels "
            f"{pixels['min_pixels']}..{pixels['max_pixels']} per frame"))
        args.skip_noop = True
    else:
        model = ensure_model(workdir, args.hidden)
        mode = Mode("qwen2_5_omni", PIXELS, audio=True, stores="stores",
                    description=f" + audio, tiny Omni (hidden {args.hidden})")
    videos, videos_2x, warmup = ensure_videos(workdir, args.videos)
    facts = environment(workdir)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)

    print("reference loop …", file=sys.stderr, flush=True)
    reference = repeated(lambda: measure_reference(videos, videos_2x, warmup, model, workdir, args.videos,
                                                   args.reader, mode), repeats)
    rows, measured = list(reference), {}
    for executor in EXECUTORS:
        print(f"qprep extract --executor {executor}, cold …", file=sys.stderr, flush=True)
        cold = repeated(lambda: measure_qprep_cold(videos, model, workdir, args.videos, mode, executor), repeats)
        print(f"qprep extract --executor {executor}, warm …", file=sys.stderr, flush=True)
        warm, marginal = repeated(lambda: measure_qprep_warm(videos, videos_2x, warmup, model, workdir,
                                                             args.videos, mode, executor), repeats)
        compare([(cold, reference[0]), (warm, reference[1]), (marginal, reference[2])])
        measured[executor] = (cold, warm, marginal)
        rows += [cold, warm, marginal]
    check(same_bytes(*(workdir / mode.stores / f"cold-{e}.zarr" for e in EXECUTORS)),
          "the two executors' stores differ")
    stored = store_bytes(workdir / mode.stores / "cold-local.zarr", args.videos)

    build, noop_rows = ({}, []) if args.skip_noop else measure_noop(workdir, model, args.noop_videos, repeats)

    print()
    print(markdown(("machine", "value"), list(facts.items())))
    print()
    print(f"Throughput: {args.videos} videos ({sum(clip_spec(i).seconds for i in range(args.videos))} s of "
          f"{'/'.join(f'{w}x{h}' for w, h in SIZES)} h264+aac at {'/'.join(map(str, RATES))} fps), "
          f"fps {FPS:g}{mode.description}, float32, fastest of {repeats}:\n")
    print(throughput_table(rows))
    if mode.family != "qwen2_5_omni":
        print(f"\nStore bytes per video (the cold run's store of {args.videos} videos):\n")
        print(bytes_table(stored, reference[0]))
    print("\nthe two executors' cold stores: the same bytes (sha256 of every file)")
    cold, _, marginal = measured[DEFAULT_SMALL]
    print(f"\ngoals: the cold CLI (--executor {DEFAULT_SMALL}, auto's choice here) >= {COLD_GOAL:g}x the reference "
          f"process: {cold.ratio:.2f}x ({'MET' if cold.ratio >= COLD_GOAL else 'NOT MET'}); each further video "
          f">= {THROUGHPUT_GOAL:g}x the loop: " + ", ".join(
              f"{e} {measured[e][2].ratio:.2f}x ({'MET' if measured[e][2].ratio >= THROUGHPUT_GOAL else 'NOT MET'})"
              for e in EXECUTORS))
    print(crossover(measured, args.videos))
    if build:
        print(f"\nfirst extract of the {args.noop_videos}-video no-op folder ({' '.join(NOOP_FLAGS)}): "
              f"{build['wall_s']:.0f} s wall, {60 * build['extracted'] / build['wall_s']:.0f} videos/min, "
              f"tree peak PSS {build['tree_pss_mb']:.0f} MB")
    if noop_rows:
        print()
        print(noop_table(noop_rows, args.noop_videos))
        best = min(r.wall_s for r in noop_rows if r.extracted == 0 and r.touched == 0)
        print(f"\ngoal: no-op re-run over {args.noop_videos} videos < {NOOP_GOAL_S:g} s — {best:.2f} s "
              f"({'MET' if best < NOOP_GOAL_S else 'NOT MET'})")
    print(f"\nwaited {QUIET['waited_s']:.0f} s in all for the machine to go idle (limit {args.quiet_wait:g} s a run)")
    if args.json:
        args.json.write_text(json.dumps({"environment": facts, "family": mode.family, "pixels": mode.pixels,
                                         "rows": [asdict(r) for r in rows], "store_bytes": stored,
                                         "noop_build": build, "noop": [asdict(r) for r in noop_rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
