"""Benchmark: the frozen vision and audio towers alone (no decoding, no resizing), as qprep calls them.

What is measured, for each model (checkpoints with random weights, built once into --workdir with
transformers' real classes and key layout, the towers at the released widths, the language model
tiny: 2 layers of width 64, which extraction never runs):

* Qwen2.5-Omni-3B: vision 1280 wide, MLP 3420, 16 heads, patch 14, merge 2, temporal patch 2,
  window attention over 112-pixel windows with full attention at blocks [7, 15, 23, 31] of 32,
  out 2048; audio d_model 1280, 20 heads, FFN 5120, 128 mel bins, n_window 100, 32 layers, out 2048.
* Qwen2.5-VL-7B: the same vision tower with out 3584 (no audio tower).
* Qwen3-VL-8B and Qwen3-Omni-30B-A3B: bench/qwen3vl.py's and bench/qwen3omni.py's checkpoints
  (vision 1152 wide, 27 blocks with deepstack; Qwen3-Omni's audio 1280 wide, 32 layers).

--vision-depth and --audio-layers set the blocks built (default: the released 32 / 27 vision blocks
and 32 audio layers); the table's "depth" column says what ran, as "used of released". With fewer
blocks, the full-attention blocks ([7, 15, 23, 31] of 32) and the deepstack levels ([8, 16, 24] of
27) sit at the same relative depths. Widths are never reduced.

How: `qprep.pipeline.towers.Towers` loads the towers alone from the checkpoint (bf16 on cuda,
float32 on CPU, SDPA attention). The inputs are synthetic, with the shapes and dtypes the CPU stage
hands the towers (qprep/pipeline/prepare.py): each video --frames frames at --side x --side
pixels as uint8 patches [t·h·w, 3·2·patch²] with grid (frames/2, side/patch, side/patch); each
audio track --audio-seconds of float32 log-mel frames [128, 100 a second] with its processor's
window lengths (300 s windows for Qwen2.5-Omni, the whole track for Qwen3-Omni). --pack such videos
(and tracks) go through `video_features` / `encode_audio` two ways: one video per call (the
default `Budget()`, what a store's bytes are made with) and packed (`Budget(video_patches=the
videos' rows, audio_frames=the tracks' frames)`, all of them in one call). Each is called once to
warm up, then timed --repeats times (torch.cuda.synchronize before and after on GPU); the fastest
is shown. A call includes what `Towers` does around the model: normalising the uint8 patches on the
CPU, the copy to the device and the tokens' copy back. tokens/s counts the tokens the towers return
(merged visual tokens, audio tokens). Peak memory is torch.cuda.max_memory_allocated on GPU (reset
before each row; weights included) and the process's peak RSS on CPU (VmHWM, reset before each row
through /proc/self/clear_refs).

Largest video that fits (GPU only): one video per call, the frame count doubled from --frames until
the call raises torch.cuda.OutOfMemoryError; the last that fit is shown with its tokens/s and peak
memory, and the note says why the doubling stopped. It also stops before a size whose call would
take over --fit-seconds (twice the last one's time: with SDPA, transformers runs one attention call
per window or frame, so a long video is slow well before it is large), or whose host-side copies
(uint8 patches, their float32 normalisation and its concatenation) would take over half the host's
available memory; the size shown is then a lower bound.

GPU busy fraction under extraction (--with-extract, on by default on GPU, skipped on CPU):
`qprep.extraction.run.extract` with the local executor (CPU-stage worker processes, the towers in
this process, one video per call) over --extract-videos synthetic clips (`qprep.synth.make_video`,
320x240 at 30 fps with stereo audio, --extract-seconds each), fps 2, frames resized to --side x --side,
into a fresh store. nvidia-smi samples utilization.gpu every 0.2 s meanwhile; the busy fraction is
the mean of the samples from the first non-zero one on (the towers' loading before it left out).
tokens/s there is the run's tokens over its whole wall time.

Reproduce (from the repository root, with the virtualenv active; checkpoints and clips are cached
in --workdir, so only the first run pays for building them):

    python bench/towers.py --small --vision-depth 1 --audio-layers 1   # CPU smoke run (~2 min on 2 cores)
    python bench/towers.py --small                                      # CPU: 2 blocks / layers, small inputs
    python bench/towers.py                                              # one GPU: released depths, bf16, extract
    python bench/towers.py --families qwen2_5_omni qwen3_omni_moe --pack 8   # a subset, larger packed calls
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import machine  # bench/machine.py
import qwen3omni  # bench/qwen3omni.py: the Qwen3-Omni bench checkpoint
import qwen3vl  # bench/qwen3vl.py: the Qwen3-VL bench checkpoint
from extract import markdown  # bench/extract.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # qprep from this checkout
from qprep.extraction.run import ExtractOptions, extract  # noqa: E402
from qprep.models.checkpoint import open_checkpoint  # noqa: E402
from qprep.pipeline.towers import AudioInput, Towers, VideoInput  # noqa: E402
from qprep.schemas.settings import VideoSettings, load_model_spec  # noqa: E402
from qprep.schemas.towers import Budget  # noqa: E402
from qprep.synth import VideoSpec, make_video  # noqa: E402

TEXT_HIDDEN, TEXT_LAYERS = 64, 2  # the language model: extraction never runs it
RELEASED_FULL_ATTENTION = [7, 15, 23, 31]  # Qwen2.5-VL / Qwen2.5-Omni vision blocks without windows, of 32
QWEN2_5_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=RELEASED_FULL_ATTENTION)
QWEN2_5_OMNI_3B = {"vision": dict(QWEN2_5_VISION, out_hidden_size=2048),
                   "audio": dict(encoder_layers=32, d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                 output_dim=2048, num_mel_bins=128, n_window=100, max_source_positions=1500)}
QWEN2_5_VL_7B = {"vision": dict(QWEN2_5_VISION, out_hidden_size=3584)}
SMALL = dict(vision_depth=2, audio_layers=2, frames=8, audio_seconds=10, pack=2, repeats=2)
FULL = dict(frames=100, audio_seconds=60, pack=4, repeats=3)
SAMPLE_EVERY_MS = 200


@dataclass(frozen=True)
class Model:
    family: str  # the --families name (the checkpoint's model_type)
    label: str
    vision_depth: int  # released
    audio_layers: int  # released; 0: no audio tower
    build: Callable[[Path, int, int], Path]  # (workdir, vision depth, audio layers) -> checkpoint


@dataclass
class Row:
    model: str
    part: str
    depth: str
    mode: str
    size: str
    tokens_per_s: float | None
    peak: str
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Checkpoints


def full_attention_blocks(depth: int) -> list[int]:
    """The released full-attention blocks ([7, 15, 23, 31] of 32) at the same relative depths of `depth` blocks."""
    return sorted({index * depth // QWEN2_5_VISION["depth"] for index in RELEASED_FULL_ATTENTION})


def qwen2_5_config(kind: str, released: dict, vision_depth: int, audio_layers: int, text_hidden: int = TEXT_HIDDEN,
                   text_layers: int = TEXT_LAYERS):
    """tiny_config(kind) with the released tower widths at the given depths, and a language model of
    `text_layers` × `text_hidden` in the tiny config's proportions."""
    from qprep.models.tiny import tiny_config

    tiny = tiny_config(kind, hidden=text_hidden)
    config = tiny.to_dict()
    towers = config.get("thinker_config", config)
    towers["text_config"].update(num_hidden_layers=text_layers)
    towers["text_config"].pop("layer_types", None)  # one per layer: rebuilt for the new depth
    towers["vision_config"].update(released["vision"], depth=vision_depth,
                                   fullatt_block_indexes=full_attention_blocks(vision_depth))
    if "audio" in released:
        towers["audio_config"].update(released["audio"], encoder_layers=audio_layers)
    return type(tiny)(**config)


def ensure_qwen2_5(workdir: Path, kind: str, released: dict, vision_depth: int, audio_layers: int,
                   text_hidden: int = TEXT_HIDDEN, text_layers: int = TEXT_LAYERS) -> Path:
    """Build and save a Qwen2.5-Omni / Qwen2.5-VL bench checkpoint once (cached in `workdir`)."""
    import transformers
    from checkpoints import finish_from_template
    from transformers.utils import logging

    from qprep.models.tiny import MODEL_CLASSES, make_tiny_model

    vision, audio = released["vision"], released.get("audio")
    name = f"{kind}-v{vision_depth}x{vision['hidden_size']}o{vision['out_hidden_size']}"
    name += f"-a{audio_layers}x{audio['d_model']}" if audio else ""
    path = workdir / f"{name}-t{text_layers}x{text_hidden}"
    if (path / "config.json").is_file():
        return path
    print(f"building {path.name} …", file=sys.stderr, flush=True)
    partial, template = workdir / ("partial-" + path.name), workdir / f"{kind}-template"
    for directory in (partial, template):
        shutil.rmtree(directory, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    tiny = make_tiny_model(kind, template, hidden=TEXT_HIDDEN)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():  # the talker's unused zero-width layers, as in tiny.py
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            model = getattr(transformers, MODEL_CLASSES[kind])(qwen2_5_config(kind, released, vision_depth,
                                                                              audio_layers, text_hidden, text_layers))
        model.save_pretrained(partial)
        del model
    finally:
        logging.set_verbosity(verbosity)
    return finish_from_template(tiny, partial, path)


MODELS = (
    Model("qwen2_5_omni", "Qwen2.5-Omni-3B", 32, 32,
          lambda w, v, a: ensure_qwen2_5(w, "qwen2_5_omni", QWEN2_5_OMNI_3B, v, a)),
    Model("qwen2_5_vl", "Qwen2.5-VL-7B", 32, 0, lambda w, v, a: ensure_qwen2_5(w, "qwen2_5_vl", QWEN2_5_VL_7B, v, 0)),
    Model("qwen3_vl", "Qwen3-VL-8B", qwen3vl.RELEASED_DEPTH, 0,
          lambda w, v, a: qwen3vl.ensure_model(w, v, qwen3vl.QWEN3_VL_8B["vision"]["out_hidden_size"], TEXT_HIDDEN,
                                               TEXT_LAYERS)),
    Model("qwen3_omni_moe", "Qwen3-Omni-30B-A3B", qwen3omni.RELEASED_DEPTH,
          qwen3omni.QWEN3_OMNI_30B["audio"]["encoder_layers"],
          lambda w, v, a: qwen3omni.ensure_model(w, v, a, qwen3omni.RELEASED_OUT, TEXT_HIDDEN, TEXT_LAYERS)),
)


# ---------------------------------------------------------------------------------------------
# Inputs


def video_input(spec, frames: int, side: int):
    """A clip of `frames` frames at side x side as the CPU stage hands it over: uint8 patches, grid (t, h, w)."""
    if side % spec.factor:
        raise SystemExit(f"--side {side} is not a multiple of {spec.factor} (patch {spec.patch_size} x merge "
                         f"{spec.merge_size})")
    grid = (math.ceil(frames / spec.temporal_patch_size), side // spec.patch_size, side // spec.patch_size)
    return VideoInput(torch.randint(0, 256, (math.prod(grid), spec.patch_dim), dtype=torch.uint8), grid)


def longer(video, times: int):
    """The same clip `times` over (rows are frame-major)."""
    t, h, w = video.grid_thw
    return VideoInput(video.patches.repeat(times, 1), (t * times, h, w))


def audio_input(spec, seconds: float):
    """`seconds` of log-mel frames, in the processor's windows (one per 300 s, or the whole track)."""
    audio = spec.audio
    frames = int(seconds * audio.sampling_rate) // audio.hop_length
    window = frames if audio.whole_track else audio.window_samples // audio.hop_length
    lengths = tuple(min(window, frames - start) for start in range(0, frames, window))
    return AudioInput(torch.randn(audio.feature_size, frames, dtype=torch.float32), lengths)


# ---------------------------------------------------------------------------------------------
# Measurements


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    status = Path("/proc/self/status").read_text()
    kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    return f"{kb / 2**20:.2f} GiB RSS"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(call: Callable[[], int], device: str, repeats: int) -> tuple[float, str]:
    """Tokens/s of the fastest of `repeats` calls after a warm-up call, and the peak memory."""
    reset_peak(device)
    tokens, best = call(), math.inf
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        call()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return tokens / best, peak(device)


def mode_rows(towers, model: Model, part: str, depth: str, size: str, packed, call: Callable[[], int],
              repeats: int) -> list[Row]:
    """One row per call mode: one video per call (the default budget), then all of them in one call."""
    rows = []
    for mode, budget in (("one video per call", Budget()), ("packed", packed)):
        towers.budget = budget
        rate, memory = timed(call, towers.device_name, repeats)
        rows.append(Row(model.label, part, depth, mode, size, rate, memory))
    return rows


def vision_rows(towers, model: Model, depth: str, args) -> list[Row]:
    videos = [video_input(towers.spec, args.frames, args.side) for _ in range(args.pack)]
    return mode_rows(towers, model, "vision", depth, f"{args.pack} x {args.frames} frames {args.side}x{args.side}",
                     Budget(video_patches=sum(v.patches.shape[0] for v in videos)),
                     lambda: sum(len(f.tokens) for f in towers.video_features(videos)), args.repeats)


def audio_rows(towers, model: Model, depth: str, args) -> list[Row]:
    audios = [audio_input(towers.spec, args.audio_seconds) for _ in range(args.pack)]
    return mode_rows(towers, model, "audio", depth, f"{args.pack} x {args.audio_seconds:g} s audio",
                     Budget(audio_frames=sum(a.mel.shape[1] for a in audios)),
                     lambda: sum(len(t) for t in towers.encode_audio(audios)), args.repeats)


def host_cap_frames(spec, side: int) -> int:
    """Frames whose host-side copies (uint8 patches, float32 normalised, float32 concatenated: 9 bytes
    an element) stay within half the host's available memory."""
    available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable"))
    per_frame = 9 * spec.patch_dim * (side // spec.patch_size) ** 2
    return available // 2 // per_frame


def largest_row(towers, model: Model, depth: str, args) -> Row:
    """One video per call, doubling the frames until the GPU runs out of memory (or the next size would
    pass the host cap or --fit-seconds)."""
    row = Row(model.label, "vision", depth, "largest that fits", "n/a (CPU)", None, "n/a (CPU)")
    if towers.device_name != "cuda":
        return row
    row.size, row.peak = "none fit", ""
    towers.budget = Budget()
    base = video_input(towers.spec, args.frames, args.side)
    cap, frames = host_cap_frames(towers.spec, args.side), args.frames
    while True:
        if frames > cap:
            row.note = f"{frames} frames: over the host cap, not tried"
            break
        video = longer(base, frames // args.frames)
        try:
            rate, memory, seconds = timed_once(towers, video)
        except torch.cuda.OutOfMemoryError:
            row.note = f"{frames} frames: out of memory"
            break
        except RuntimeError as error:  # a kernel that refuses the size before memory runs out
            row.note = f"{frames} frames: {str(error).splitlines()[0][:160]}"
            break
        finally:
            del video
            gc.collect()
            torch.cuda.empty_cache()
        row.size, row.tokens_per_s, row.peak = f"{frames} frames {args.side}x{args.side}", rate, memory
        if 2 * seconds > args.fit_seconds:
            row.note = f"{2 * frames} frames would take over {args.fit_seconds:g} s, not tried"
            break
        frames *= 2
    return row


def timed_once(towers, video) -> tuple[float, str, float]:
    """Tokens/s, peak memory and seconds of one call on one video."""
    reset_peak("cuda")
    synchronize("cuda")
    started = time.perf_counter()
    tokens = len(towers.video_features([video])[0].tokens)
    synchronize("cuda")
    seconds = time.perf_counter() - started
    return tokens / seconds, peak("cuda"), seconds


class GpuBusy:
    """nvidia-smi's utilization.gpu of this process's GPU every 0.2 s while the block runs."""

    def __enter__(self) -> GpuBusy:
        device = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0] or str(torch.cuda.current_device())
        self.samples: list[int] = []
        try:
            self.process = subprocess.Popen(["nvidia-smi", "-i", device, "--query-gpu=utilization.gpu",
                                             "--format=csv,noheader,nounits", f"--loop-ms={SAMPLE_EVERY_MS}"],
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            self.process = None
            return self
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
            self.reader.join()

    def note(self) -> str:
        """The mean utilization from the first busy sample on."""
        if self.process is None:
            return "GPU busy n/a (no nvidia-smi)"
        first = next((i for i, value in enumerate(self.samples) if value), None)
        if first is None:
            return "GPU busy n/a (no busy sample)"
        busy = self.samples[first:]
        return f"GPU busy {sum(busy) / (100 * len(busy)):.0%} ({len(busy)} samples)"


def ensure_clips(workdir: Path, count: int, seconds: float) -> Path:
    folder = workdir / f"clips-{count}x{seconds:g}s"
    for index in range(count):
        path = folder / f"clip{index:03d}.mp4"
        if not path.is_file():
            make_video(folder / f"partial-{index:03d}.mp4", VideoSpec(width=320, height=240, fps=30,
                                                                      seconds=seconds)).rename(path)
    return folder


def extract_row(model: Model, checkpoint: Path, depth: str, args) -> Row:
    videos = ensure_clips(args.workdir, args.extract_videos, args.extract_seconds)
    store = args.workdir / "stores" / f"{checkpoint.name}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    reset_peak("cuda")
    with GpuBusy() as sampler:
        summary = extract(videos, store, str(checkpoint), VideoSettings(fps=2.0, size=(args.side, args.side)),
                          dtype="bfloat16", options=ExtractOptions(executor="local", progress=False))
    note = sampler.note() + (f", {summary.failed} failed" if summary.failed else "")
    return Row(model.label, "vision + audio" if model.audio_layers else "vision", depth, "qprep extract (local)",
               f"{args.extract_videos} clips x {args.extract_seconds:g} s, fps 2, {args.side}x{args.side}",
               (summary.video_tokens + summary.audio_tokens) / summary.seconds, peak("cuda"), note)


def bench_model(model: Model, args, device: str) -> list[Row]:
    vision_depth = args.vision_depth or model.vision_depth
    audio_layers = (args.audio_layers or model.audio_layers) if model.audio_layers else 0
    checkpoint = model.build(args.workdir, vision_depth, audio_layers)
    print(f"{model.label}: towers of {checkpoint.name} …", file=sys.stderr, flush=True)
    towers = Towers(open_checkpoint(checkpoint), load_model_spec(checkpoint),
                    dtype="bfloat16" if device == "cuda" else "float32", device=device)
    vision = f"{vision_depth} of {model.vision_depth}"
    rows = vision_rows(towers, model, vision, args)
    if audio_layers:
        rows += audio_rows(towers, model, f"{audio_layers} of {model.audio_layers}", args)
    rows.append(largest_row(towers, model, vision, args))
    del towers
    free(device)
    if args.with_extract and device == "cuda":
        depth = vision + (f", audio {audio_layers} of {model.audio_layers}" if audio_layers else "")
        rows.append(extract_row(model, checkpoint, depth, args))
        free(device)
    return rows


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Report


def machine_line(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else machine.cpu_model()
    return (f"machine: {name} ({device}), torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
            f"{os.cpu_count()} cores")


def table(rows: list[Row]) -> str:
    header = ("model", "part", "depth (used of released)", "call mode", "input size", "tokens/s", "peak memory",
              "note")
    return markdown(header, [(r.model, r.part, r.depth, r.mode, r.size,
                              "" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}", r.peak, r.note)
                             for r in rows])


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=[m.family for m in MODELS],
                        choices=[m.family for m in MODELS], help="models to run (default: all)")
    parser.add_argument("--small", action="store_true",
                        help=f"CPU-sized defaults: {', '.join(f'{k} {v}' for k, v in SMALL.items())}")
    parser.add_argument("--vision-depth", type=int, help="vision blocks of every model (default: the released depth)")
    parser.add_argument("--audio-layers", type=int, help="audio layers of the Omni models (default: the released 32)")
    parser.add_argument("--frames", type=int, help=f"frames of each video (default {FULL['frames']})")
    parser.add_argument("--side", type=int, default=224, help="frame width and height in pixels")
    parser.add_argument("--audio-seconds", type=float, help=f"seconds of each audio track (default "
                                                            f"{FULL['audio_seconds']})")
    parser.add_argument("--pack", type=int, help=f"videos (and tracks) per measurement; the packed mode puts them "
                                                 f"all in one call (default {FULL['pack']})")
    parser.add_argument("--repeats", type=int, help=f"timed calls after the warm-up; the fastest is shown "
                                                    f"(default {FULL['repeats']})")
    parser.add_argument("--fit-seconds", type=float, default=20,
                        help="largest video that fits: no doubling past a call this long")
    parser.add_argument("--with-extract", action=argparse.BooleanOptionalAction,
                        help="also the GPU busy fraction under `qprep extract` (default: on GPU only)")
    parser.add_argument("--extract-videos", type=int, default=16, help="clips --with-extract extracts")
    parser.add_argument("--extract-seconds", type=float, default=10, help="seconds of each of those clips")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "qprep-bench" / "towers",
                        help="cache of checkpoints, clips and stores")
    args = parser.parse_args(argv)
    for name, value in (SMALL if args.small else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.with_extract = device == "cuda" if args.with_extract is None else args.with_extract
    args.workdir = args.workdir.expanduser().resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = [row for model in MODELS if model.family in args.families for row in bench_model(model, args, device)]
    print(machine_line(device))
    print(f"dtype {'bfloat16' if device == 'cuda' else 'float32'}, SDPA; {args.repeats} timed calls after a "
          f"warm-up, the fastest shown\n")
    print(table(rows))
    if device != "cuda":
        print(f"\nqprep extract's GPU busy fraction: {'skipped' if args.with_extract else 'not run'} on CPU "
              f"(it measures a GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
