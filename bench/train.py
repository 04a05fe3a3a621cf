"""Benchmark: a LoRA training step from qprep's cache against one from the raw video, and against the floor.

What is compared (same model, same data, same sample order, same number of steps):

* cache: `qprep.train.loop.train` (the `qprep train` loop) on a store `qprep.extraction.run.extract`
  built from the videos beforehand: each step reads the sample's cached video and audio tokens
  (`collate`), scatters them into the prompt's placeholders, computes the 3-D positions with the
  model's own `get_rope_index` and runs the language model with LoRA (forward, backward, AdamW step).
  Its step times are the ones it writes to `metrics.jsonl` (waiting for the batch, which its
  loader workers collate ahead, to optimizer step).
* raw: what LLaMA-Factory / ms-swift do for Qwen2.5-Omni: each step decodes the clip with
  qwen-vl-utils' `fetch_video` (decord, forced with FORCE_QWENVL_VIDEO_READER; fps 2 or
  --num-frames; the processor's min/max pixels), loads its audio with qwen-omni-utils'
  `process_audio_info(use_audio_in_video=True)` (audioread + librosa at 16 kHz), runs the checkpoint's
  `AutoProcessor` on text, frames and audio (`use_audio_in_video=True`, `audio_from_video_indices=[0]`,
  `do_sample_frames=False`, `fps` = the sample fps `fetch_video` returns, as the qwen-omni-utils
  recipes pass `video_kwargs`: the processor takes each frame pair's duration from it and
  otherwise assumes fps 2, wrong for --num-frames; the same pixel bounds), then
  `Qwen2_5OmniForConditionalGeneration.from_pretrained(...).thinker` (LLaMA-Factory's `model.thinker`)
  with frozen towers (requires_grad False) and peft LoRA on the language model only
  (target_modules r".*language_model\\.layers\\.\\d+\\..*\\.(q_proj|k_proj|v_proj|o_proj|up_proj|down_proj)$"):
  forward (towers included) with labels, backward, AdamW step. Two rows: "stock" is what peft +
  transformers 5 do as they are: `get_peft_model` sees gradient checkpointing and calls the thinker's
  `enable_input_require_grads()`, which in transformers 5 hooks every sub-model's input embedding,
  the vision patch embedding and the audio conv1 included, so autograd records the frozen towers and
  the backward runs through them; the other row removes those hooks (`disable_input_require_grads()`)
  so the towers stay out of autograd, the fairer (and faster) reference, used for the goal.
* floor: the cache path's language-model step alone: `train`'s own recipe set up (`Recipe.setup`: the
  same `LanguageModel` + `apply_lora`, optimizer step (`qprep.train.optim`: the Trainer's AdamW groups,
  linear schedule, clipping at 1.0) and batch plan) and its objective's token-weighted loss, on batches
  `collate`d from the cache before the timed loop (each sample's batch built once, held in memory,
  reused): forward (positions, embedding scatter, text model, loss), backward, step. No data loading
  at all.

An instrumented copy of the cache loop ("cache, phases") times each part of a step: collate (the
Zarr read), get_rope_index, the embedding scatter, the rest of the forward, backward, optimizer.
The raw path's parts are timed too (decode, audio, processor, towers' forward, the rest).

Settings on every path: batch size 1, gradient accumulation 1 (one optimizer step per sample),
float32 on CPU, torch's default threads, LoRA r 16 / alpha 16 / dropout 0.05 on q/k/v/o/up/down_proj,
lr 1e-4 (the cache paths take `train`'s optimizer step, clipping and schedule included; the raw
path plain AdamW), gradient checkpointing on the language model (non-reentrant, as `train` enables it;
--no-gradient-checkpointing turns it off everywhere), the same seed before the LoRA weights are
made. The samples come in `train`'s order (a seeded permutation); the data file lists each video
--steps / --videos times, so every path runs exactly --steps steps. The first --warmup steps are
left out of the statistics; the table shows the median and mean of the rest, samples/s
(1 / mean step time at batch size 1) and the median per step of the prompt's tokens. As checks that
the paths did the same work: the raw path's input_ids must equal the cached samples' (the table says
how many steps matched), and the floor's losses must equal the cache path's step for step (the
same seed, RNG use and inputs in the same order: the difference is printed).

The model: a reduced Qwen2.5-Omni whose towers keep their real width (vision: hidden 1280, 16 heads,
MLP 3420, patch 14, merge 2, window 112; audio: d_model 1280, 20 heads, FFN 5120, 128 mel bins)
with --vision-depth blocks and --audio-layers layers, and a small language model
(--text-hidden, --text-layers), built from `qprep.models.tiny.tiny_config` with the real
classes, with the tiny checkpoint's tokenizer, chat template and processor files (pixel bounds
4..64 × 28² per frame). Model and clips are cached in --workdir. How the compute splits between
towers and language model is printed next to the same figures for Qwen2.5-Omni-7B, because the
raw/cache ratio depends on it: FLOPs ≈ 2 × matmul weights × tokens per forward; the cache step
≈ 3 forwards of the language model (forward, backward to the activations, checkpoint recompute),
the raw step that plus one forward of the towers.

Memory: each path runs in a fresh process. At its first step (a warm-up step) the process hands
freed heap back (malloc_trim), records VmRSS and VmHWM ("setup peak": imports and model load),
and resets the kernel's peak-RSS mark (clear_refs 5); "steps peak" is VmHWM at the end, the
largest resident set over all its steps (model weights included). audioread's ffmpeg children
are not counted. "RSS at step 1" can leave out weights `from_pretrained` mapped from the file and
nothing has touched yet (the raw path's): compare the steps' peaks.

Timing: before each measured process the bench waits (up to --quiet-wait s) for the machine to go
idle, and the "others' cores" column says how busy the other processes kept the machine meanwhile
(/proc/stat minus the worker's own CPU time). With --repeats N each path runs N times; the run with
the lowest median step time is shown, with the largest memory seen.

Qwen3-VL (`--family qwen3_vl`): the cache, cache-phases and floor paths (no raw-video path) on a
Qwen3-VL checkpoint (bench/qwen3vl.py: the real classes and key layout; the vision tower at
Qwen3-VL-8B's released width 1152 / MLP 4304 / 16 heads / patch 16, --vision-depth blocks, default 3,
one per deepstack level, out_hidden_size = the language model's width; a language model of
--text-layers × --text-hidden, M-RoPE sections in the release's proportions). The clips are
extracted at fps 2 (or --num-frames) without audio, within 4·32²..1024·32² pixels per clip (the
Qwen3-VL video processor's `size` bounds the whole clip). Each step's sample carries the
`<t seconds>` stamps of its temporal patches in the prompt, and the cache path reads the merged
tokens and the deepstack levels ([levels, n, d], 3× the merged tokens' bytes) from the store, which
the language model gets as `visual_pos_masks` + `deepstack_visual_embeds`; the floor holds the same
batches, deepstack included, in memory. The line above the table gives the cache's array sizes and
what a step reads.

Qwen3-Omni (`--family qwen3_omni_moe`): the same three paths on a Qwen3-Omni checkpoint
(bench/qwen3omni.py: the full Qwen3OmniMoeForConditionalGeneration, real classes and key layout; the
towers at Qwen3-Omni-30B-A3B's released widths, vision 1152 / MLP 4304 / 16 heads / patch 16 with
--vision-depth blocks, default 3, one per deepstack level, and audio 1280 / 20 heads / FFN 5120 with
--audio-layers layers, both out = the language model's width; a MoE language model of
--text-layers × --text-hidden, 8 experts, top 2, M-RoPE sections in the release's proportions;
talker and code2wav tiny and never read). The clips are extracted at fps 2 (or --num-frames) with
audio, within 4·32²..64·32² pixels per frame (its video processor is Qwen2VLVideoProcessor: bounds
per frame). Each step's prompt holds the audio-in-video block (`<|vision_start|><|audio_start|>`,
video and audio placeholders merged one by one in time order, `<|audio_end|><|vision_end|>`), the
cache path reads the merged tokens, the deepstack levels and the audio tokens from the store, and
the positions come from the thinker's `get_rope_index(use_audio_in_video=True)`; the floor holds the
same batches in memory. LoRA on the thinker's attention (q/k/v/o_proj, the family's default for its
MoE language model). The tokenizer is `Checkpoint.tokenizer()`, as `train` gets it (Qwen3-Omni's
release keeps its chat template beside the processor, `chat_template.json`).

Mixed media (`--mixed IMAGES`, any family): the clips and IMAGES JPEG photos (1280x720, 640x480,
480x640, 800x800) in one folder, extracted with `extract --media` (videos and images in one store);
the records cycle through a video, an image, an image and a video, two videos, and a text-only
turn (qprep's `{"id", "media", "conversations"}` records), so consecutive steps read different
numbers and kinds of media, or none. The cache, cache-phases and floor paths (the raw paths read
one video per sample); goal cache / floor within 5 %.

Goals stated by the project: raw / cache step time >= 5x; cache / floor within 10 % (<= 1.10); for
Qwen3-VL, cache / floor within 5 % (<= 1.05); Qwen3-Omni is held to the 10 %. If cache / floor is
over its goal (or with --profile), the cache loop runs once more under cProfile and the top
functions are printed.

Reproduce (from the repository root, with the virtualenv active; about 4 min on 2 cores, the first run
included):

    python bench/train.py                                # 12 clips, 24 steps per path
    python bench/train.py --videos 4 --steps 8           # a smoke run
    python bench/train.py --repeats 2 --json train.json  # what a report would use
    python bench/train.py --family qwen3_vl --videos 4 --steps 12 --quiet-wait 30   # Qwen3-VL smoke run
    python bench/train.py --family qwen3_vl --repeats 2   # Qwen3-VL: 12 clips, 24 steps per path
    python bench/train.py --family qwen3_omni_moe --videos 4 --steps 12 --quiet-wait 30   # Qwen3-Omni smoke run
    python bench/train.py --family qwen3_omni_moe --repeats 2   # Qwen3-Omni: 12 clips, 24 steps per path
    python bench/train.py --mixed 6 --videos 4 --steps 15 --quiet-wait 30   # mixed-media smoke run
    python bench/train.py --mixed 12 --repeats 2   # mixed media: 12 clips, 12 photos, 24 steps per path
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import machine  # bench/machine.py: what the run was measured on, and how busy it was
from machine import QUIET, children_cpu_s, system_busy_s, wait_for_quiet

PACKAGES = ("torch", "transformers", "peft", "decord", "qwen-vl-utils", "qwen-omni-utils", "librosa", "zarr")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTH, HEIGHT = 320, 240
SECONDS = (5, 8, 6, 10, 7, 9)  # clip lengths cycle through these
RATES = (25, 30)
FPS = 2.0
# Frame-size bounds of both paths (the tiny checkpoint's video processor config), named explicitly:
# the Omni processor would otherwise resize within its own 128·28²–768·28².
PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64}
LR = 1e-4
SEED = 0
LORA_REGEX = r".*language_model\.layers\.\d+\..*\.(q_proj|k_proj|v_proj|o_proj|up_proj|down_proj)$"
RESULT_TAG = "BENCH-RESULT "
TIMEOUT_S = 3600
RAW_OVER_CACHE_GOAL, CACHE_OVER_FLOOR_GOAL = 5.0, 1.10

FAMILIES = ("qwen2_5_omni", "qwen3_vl", "qwen3_omni_moe")
# Qwen3-VL (--family qwen3_vl): Qwen3VLVideoProcessor's `size` bounds the pixels of the whole clip
# (all its frames), not of one frame: 4..1024 merged tokens of 32² pixels per clip, about the Omni
# run's video tokens per clip on these clips.
QWEN3_VL_PIXELS = {"min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 1024}
QWEN3_VL_PATHS = ("cache", "cache-loop", "floor")  # no raw-video path for Qwen3-VL here
QWEN3_VL_CACHE_OVER_FLOOR_GOAL = 1.05
MIXED_CACHE_OVER_FLOOR_GOAL = 1.05  # the mixed-media row (--mixed)
# Qwen3-Omni (--family qwen3_omni_moe): Qwen2VLVideoProcessor's bounds are per frame: 4..64 merged
# tokens of 32² pixels per frame (the bench checkpoint's own video processor config; the Omni run's
# 4..64 × 28² at the 16-pixel patch). The same paths as Qwen3-VL, the general cache / floor goal.
QWEN3_OMNI_PIXELS = {"min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 64}
QWEN3_PATHS = {"qwen3_vl": QWEN3_VL_PATHS, "qwen3_omni_moe": QWEN3_VL_PATHS}  # no raw-video path for either
QWEN3_MEDIA = {"qwen3_vl": {"pixels": QWEN3_VL_PIXELS, "audio": False},
               "qwen3_omni_moe": {"pixels": QWEN3_OMNI_PIXELS, "audio": True}}
QUESTIONS = ("what happens in the video", "describe the video", "when does the red disc show")

# Qwen2.5-Omni-7B's thinker (its config.json): what the bench model is compared with.
OMNI_7B = {
    "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064),
    "vision": dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                   fullatt_block_indexes=[7, 15, 23, 31]),
    "audio": dict(encoder_layers=32, d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, output_dim=3584),
}


# ---------------------------------------------------------------------------------------------
# Inputs (generated once into the workdir)


def model_name(args) -> str:
    if args.family == "qwen3_vl":
        import qwen3vl

        return qwen3vl.model_name(args.vision_depth, args.text_hidden, args.text_layers, args.text_hidden)
    if args.family == "qwen3_omni_moe":
        import qwen3omni

        return qwen3omni.model_name(args.vision_depth, args.audio_layers, args.text_hidden, args.text_layers,
                                    args.text_hidden)
    return (f"omni-v{args.vision_depth}x1280-a{args.audio_layers}x1280-t{args.text_layers}x{args.text_hidden}")


def bench_config(text_hidden: int, text_layers: int, vision_depth: int, audio_layers: int):
    """The tiny Omni config with towers of the real width and the given depths."""
    from transformers import Qwen2_5OmniConfig
    from qprep.models.tiny import tiny_config

    config = tiny_config("qwen2_5_omni", hidden=text_hidden).to_dict()
    thinker = config["thinker_config"]
    thinker["text_config"].update(num_hidden_layers=text_layers)
    thinker["text_config"].pop("layer_types", None)  # rebuilt for the new depth
    # Full attention every 8th block as in the release ([7, 15, 23, 31] of 32), at least the last one.
    full = [i for i in range(vision_depth) if i % 8 == 7] or [vision_depth - 1]
    thinker["vision_config"].update(hidden_size=1280, num_heads=16, intermediate_size=3420, depth=vision_depth,
                                    fullatt_block_indexes=full, out_hidden_size=text_hidden)
    thinker["audio_config"].update(d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                   encoder_layers=audio_layers, output_dim=text_hidden)
    return Qwen2_5OmniConfig(**config)


def ensure_model(workdir: Path, args) -> Path:
    """Build and save the bench model once: real classes and key layout; the tokenizer, chat
    template, processor configs and speaker table are those `make_tiny_model` writes."""
    import torch
    from checkpoints import finish_from_template
    from transformers import Qwen2_5OmniForConditionalGeneration
    from transformers.utils import logging

    from qprep.models.tiny import make_tiny_model

    if args.family == "qwen3_vl":
        import qwen3vl  # bench/qwen3vl.py; the merged tokens go into the LM: out_hidden_size = its width

        return qwen3vl.ensure_model(workdir, args.vision_depth, args.text_hidden, args.text_hidden,
                                    args.text_layers, seed=SEED)
    if args.family == "qwen3_omni_moe":
        import qwen3omni  # bench/qwen3omni.py; vision and audio outputs at the LM's width, as for Qwen3-VL

        return qwen3omni.ensure_model(workdir, args.vision_depth, args.audio_layers, args.text_hidden,
                                      args.text_hidden, args.text_layers, seed=SEED)
    path = workdir / model_name(args)
    if (path / "config.json").is_file():
        return path
    print(f"building {path.name} …", file=sys.stderr, flush=True)
    partial = fresh(workdir / ("partial-" + path.name))
    tiny = make_tiny_model("qwen2_5_omni", fresh(workdir / "tiny-template"), hidden=args.text_hidden)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the talker's ids lie beyond its tiny vocabulary, as in tiny.py
    try:
        torch.manual_seed(SEED)
        Qwen2_5OmniForConditionalGeneration(bench_config(args.text_hidden, args.text_layers, args.vision_depth,
                                                         args.audio_layers)).save_pretrained(partial)
    finally:
        logging.set_verbosity(verbosity)
    return finish_from_template(tiny, partial, path)


def clip_name(index: int) -> str:
    seconds, rate = SECONDS[index % len(SECONDS)], RATES[index % len(RATES)]
    return f"v{index:03d}-{WIDTH}x{HEIGHT}-{seconds}s-{rate}fps"


def ensure_videos(workdir: Path, count: int) -> Path:
    """A folder with `count` h264+aac clips (hard links into the clip cache); the red disc shows at a
    different time in each."""
    from qprep.synth import VideoSpec, make_video

    cache, folder = workdir / "clips", workdir / f"videos-{count}"
    for directory in (cache, folder):
        directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        name = clip_name(index) + ".mp4"
        seconds = SECONDS[index % len(SECONDS)]
        if not (cache / name).exists():
            print(f"encoding {name} …", file=sys.stderr, flush=True)
            start = (index * 1.3) % (seconds - 2)
            spec = VideoSpec(width=WIDTH, height=HEIGHT, seconds=seconds, fps=RATES[index % len(RATES)], audio=True,
                             events=((start, start + 1.5),))
            make_video(cache / ("partial-" + name), spec)
            (cache / ("partial-" + name)).rename(cache / name)
        if not (folder / name).exists():
            os.link(cache / name, folder / name)
    return folder


def answer(index: int) -> str:
    seconds = SECONDS[index % len(SECONDS)]
    start = (index * 1.3) % (seconds - 2)
    return f"A red disc shows from {start:.1f} s to {start + 1.5:.1f} s of the {seconds} s video."


def write_data(path: Path, videos: int, steps: int) -> Path:
    """LongVALE-style records: the videos cycled to `steps` records (each video steps/videos times)."""
    records = []
    for step in range(steps):
        index = step % videos
        records.append({"id": clip_name(index), "conversations": [
            {"from": "human", "value": f"<video>\n{QUESTIONS[index % len(QUESTIONS)]}"},
            {"from": "gpt", "value": answer(index)}]})
    path.write_text(json.dumps(records, indent=1))
    return path


IMAGE_SIZES = ((1280, 720), (640, 480), (480, 640), (800, 800))  # landscape, 4:3, portrait, square
# the mixed-media records cycle through these: (kind of each medium in placeholder order)
MIXED_PATTERNS = (("video",), ("image",), ("image", "video"), ("video", "video"), ())


def image_name(index: int) -> str:
    width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
    return f"i{index:03d}-{width}x{height}"


def ensure_media(workdir: Path, videos: int, images: int) -> Path:
    """A folder holding the `videos` clips of `ensure_videos` and `images` JPEG photos (a disc on a
    gradient, each of its own size and colour), for `extract --media`."""
    from PIL import Image, ImageDraw

    clips = ensure_videos(workdir, videos)
    folder = workdir / f"media-{videos}v{images}i"
    folder.mkdir(parents=True, exist_ok=True)
    for clip in clips.iterdir():
        if not (folder / clip.name).exists():
            os.link(clip, folder / clip.name)
    for index in range(images):
        path = folder / (image_name(index) + ".jpg")
        if path.exists():
            continue
        width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
        radius = min(width, height) // 6
        x, y = (index * 97) % (width - 2 * radius), (index * 61) % (height - 2 * radius)
        ImageDraw.Draw(image).ellipse((x, y, x + 2 * radius, y + 2 * radius), fill=(200, 30 + index * 13 % 200, 40))
        image.save(folder / ("partial-" + path.name), format="JPEG", quality=90)
        (folder / ("partial-" + path.name)).rename(path)
    return folder


def write_mixed_data(path: Path, videos: int, images: int, steps: int) -> Path:
    """qprep records over several media or none, cycling through MIXED_PATTERNS: a video, an image, an
    image and a video, two videos, text only; the media taken in turn from the folder's clips and photos."""
    records, taken = [], {"video": 0, "image": 0}
    names = {"video": lambda i: clip_name(i % videos), "image": lambda i: image_name(i % images)}
    for step in range(steps):
        pattern = MIXED_PATTERNS[step % len(MIXED_PATTERNS)]
        media = []
        for kind in pattern:
            media.append(names[kind](taken[kind]))
            taken[kind] += 1
        marks = "".join(f"<{kind}>" for kind in pattern)
        question = (QUESTIONS[step % len(QUESTIONS)] if pattern
                    else "in one sentence, what does a red disc on a grey background suggest")
        records.append({"id": f"mixed-{step:04d}", "media": media, "conversations": [
            {"from": "human", "value": f"{marks}\n{question}" if marks else question},
            {"from": "gpt", "value": answer(step) if pattern else "A signal, or a warning light."}]})
    path.write_text(json.dumps(records, indent=1))
    return path


def policy(args) -> dict:
    return {"num_frames": args.num_frames} if args.num_frames else {"fps": FPS}


# ---------------------------------------------------------------------------------------------
# Memory and CPU


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


class StepMemory:
    """Call `start()` at the first step: trims the heap, notes VmRSS and the setup's VmHWM, resets
    the peak mark; `peak_mb()` is the peak since."""

    def __init__(self):
        self.started = False
        self.reset_ok = False
        self.baseline_mb = self.setup_peak_mb = 0.0

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.setup_peak_mb = _status_kb("VmHWM") / 1024
        self.baseline_mb = _status_kb("VmRSS") / 1024
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self.reset_ok = True
        except OSError:
            pass

    def result(self) -> dict:
        return {"baseline_mb": self.baseline_mb, "setup_peak_mb": self.setup_peak_mb,
                "steps_peak_mb": _status_kb("VmHWM") / 1024, "peak_reset": self.reset_ok}




# ---------------------------------------------------------------------------------------------
# Workers (each in a fresh process)


def synchronized(device: str) -> float:
    """`time.perf_counter()` once the device's queued work is done (GPU kernels run asynchronously)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def gpu_peak(device: str) -> dict:
    """The GPU's peak allocated memory over the whole process (model, optimizer state and steps)."""
    if not device.startswith("cuda"):
        return {}
    import torch

    return {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def _quiet_transformers() -> None:
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # librosa's audioread deprecation
    warnings.filterwarnings("ignore", category=UserWarning)


def _train_order(count: int) -> list[int]:
    """The sample order of `train`'s single epoch (a permutation seeded with seed + epoch)."""
    import torch

    return torch.randperm(count, generator=torch.Generator().manual_seed(SEED + 0)).tolist()


def _digest(ids) -> str:
    return hashlib.sha1(json.dumps([int(i) for i in ids]).encode()).hexdigest()[:12]


def cache_settings(job: dict):
    """The settings of both cache paths: batch size 1, no accumulation (one optimizer step per sample),
    float32, the default LoRA."""
    from qprep.schemas.training import LoraSettings, TrainSettings

    return TrainSettings(epochs=1, lr=LR, batch_size=1, grad_accum=1, seed=SEED,
                         gradient_checkpointing=job["gradient_checkpointing"], dtype=job.get("dtype", "float32"),
                         lora=LoraSettings())


def cache_worker(job: dict) -> dict:
    """`qprep.train.loop.train` itself; step times and losses from its metrics.jsonl."""
    began = time.perf_counter()
    import torch

    from qprep.train.loop import train
    from qprep.train.model import LanguageModel

    _quiet_transformers()
    memory, forward, first = StepMemory(), LanguageModel.forward, {}

    def forward_first_resets(self, *args, **kwargs):  # setup ends where the first step's forward begins
        if not memory.started:
            first["setup_s"] = time.perf_counter() - began
            memory.start()
        return forward(self, *args, **kwargs)

    LanguageModel.forward = forward_first_resets
    out = fresh(Path(job["out"]))
    summary = train(job["cache"], job["data"], job["model"], out, cache_settings(job), device=job["device"],
                    progress=False,
                    echo=lambda line: None)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [{"s": m["step_time_s"], "loss": m["loss"], "tokens": round(m["tokens_per_s"] * m["step_time_s"])}
             for m in lines]
    return {"steps": steps, "setup_s": first.get("setup_s"), "samples": summary.samples,
            "torch_threads": torch.get_num_threads(), **memory.result(), **gpu_peak(job["device"])}


class Phases:
    """Accumulates seconds per named phase within one step."""

    def __init__(self):
        self.current: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def timed(self, name: str, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)
        return wrapper

    def take(self) -> dict[str, float]:
        taken, self.current = self.current, {}
        return taken


def loop_worker(job: dict) -> dict:
    """The floor (batches collated before the loop) or the instrumented cache loop ("cache-loop":
    collate inside the step), set up by `train`'s own recipe (`Recipe.setup`: the same checks, model,
    LoRA, optimizer, schedule and batch plan), its steps timed here part by part."""
    began = time.perf_counter()
    import tempfile

    import torch

    from qprep.train.data import collate
    from qprep.train.loop import Recipe
    from qprep.train.objectives.sft import SupervisedObjective
    from qprep.train.optim import clip

    _quiet_transformers()
    settings = cache_settings(job)
    objective = SupervisedObjective(settings)
    device = job["device"]
    recipe = Recipe(objective, settings, device=device, progress=False, echo=lambda line: None)
    recipe.setup(job["cache"], job["data"], job["model"], fresh(Path(job["out"] or tempfile.mkdtemp())))
    model, cache, layout, samples = recipe.peft_model, recipe.cache, recipe.layout, objective.samples
    language_model = model.get_base_model()
    steps = [batches[0] for batches in recipe.steps]  # one batch of one sample per optimizer step
    floor = job["kind"] == "floor"
    batches = {}
    if floor:  # each sample's batch collated once, before the loop
        for index in sorted({position.samples[0] for position in steps}):
            batches[index] = collate([samples[index]], cache, layout).to(device)
    phases = Phases()
    language_model.position_ids = phases.timed("get_rope_index", language_model.position_ids)
    language_model.embed = phases.timed("embed + scatter", language_model.embed)
    memory = StepMemory()
    setup_s = time.perf_counter() - began
    profiler = None
    timed = []
    for number, position in enumerate(steps):
        if number == job["warmup"] and job.get("profile"):
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        memory.start()
        index = position.samples[0]
        sample = samples[index]
        share = objective.start_step([position], model, recipe.world, 0)[0]
        tick = synchronized(device)
        if floor:
            batch = batches[index]
        else:
            batch = collate([sample], cache, layout).to(device)
        collated = synchronized(device)
        with recipe.autocast:
            loss = objective.loss(model, batch, position, share, whole=True)
        forwarded = synchronized(device)
        loss.backward()
        backward = synchronized(device)
        clip(recipe.trainable, settings.max_grad_norm)
        recipe.optimizer.step()
        recipe.scheduler.step()
        recipe.optimizer.zero_grad(set_to_none=True)
        done = synchronized(device)
        parts = phases.take()
        inner = sum(parts.values())
        parts = {"collate (cache read)": collated - tick, **parts, "rest of forward": forwarded - collated - inner,
                 "backward": backward - forwarded, "optimizer": done - backward}
        timed.append({"s": done - tick, "loss": float(loss), "tokens": len(sample.input_ids),
                      "video_tokens": 0 if batch.video_tokens is None else int(batch.video_tokens.shape[0]),
                      "audio_tokens": 0 if batch.audio_tokens is None else int(batch.audio_tokens.shape[0]),
                      "deepstack_levels": 0 if batch.deepstack is None else int(batch.deepstack.shape[0]),
                      "ids": _digest(sample.input_ids), "phases": parts})
    recipe.cleanup()
    result = {"steps": timed, "setup_s": setup_s, "samples": len(samples),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "torch_threads": torch.get_num_threads(), **memory.result(), **gpu_peak(device)}
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        result["profile"] = text.getvalue()
    return result


def raw_worker(job: dict) -> dict:
    """Decode, processor and the full thinker each step, as LLaMA-Factory / ms-swift train Omni."""
    began = time.perf_counter()
    import torch
    from peft import LoraConfig, get_peft_model
    from qwen_omni_utils.v2_5.audio_process import process_audio_info
    from qwen_vl_utils import fetch_video
    from transformers import AutoProcessor, Qwen2_5OmniForConditionalGeneration

    _quiet_transformers()
    processor = AutoProcessor.from_pretrained(job["model"])
    tokenizer = processor.tokenizer
    full = Qwen2_5OmniForConditionalGeneration.from_pretrained(job["model"], dtype=torch.float32)
    thinker = full.thinker  # LLaMA-Factory: `model = model.thinker` for qwen2_5_omni
    del full
    gc.collect()
    for tower in (thinker.model.visual, thinker.model.audio_tower):
        tower.requires_grad_(False)
    if job["gradient_checkpointing"]:
        thinker.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(SEED)
    model = get_peft_model(thinker, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_REGEX,
                                               bias="none"))
    if not job["tower_grad"]:
        # get_peft_model saw gradient checkpointing and called thinker.enable_input_require_grads(),
        # which in transformers 5 hooks every sub-model's input embedding: the audio tower's conv1
        # and the vision tower's patch embedding too, so autograd records the frozen towers and the
        # backward runs through them. Removed here: the towers are then out of autograd, as they
        # are (absent) on the cache path.
        thinker.disable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    pixels = PIXELS
    sampling = {"nframes": job["num_frames"]} if job["num_frames"] else {"fps": FPS}
    records = json.loads(Path(job["data"]).read_text())
    start_id, end_id = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")

    phases, tower_grad = Phases(), set()
    for tower in (thinker.model.visual, thinker.model.audio_tower):
        tower.forward = phases.timed("towers forward", tower.forward)
        tower.register_forward_hook(
            lambda module, inputs, output: tower_grad.add(getattr(output, "last_hidden_state", output).requires_grad))

    def conversation(record: dict, path: str) -> tuple[list[dict], dict]:
        element = {"type": "video", "video": path, **sampling, **pixels}
        messages = []
        for turn in record["conversations"]:
            text = turn["value"]
            if turn["from"] == "human" and "<video>" in text:
                messages.append({"role": "user", "content": [element, {"type": "text",
                                                                        "text": text.replace("<video>", "").strip()}]})
            else:
                role = "user" if turn["from"] == "human" else "assistant"
                messages.append({"role": role, "content": [{"type": "text", "text": text}]})
        return messages, element

    def labels_for(input_ids: torch.Tensor) -> torch.Tensor:
        """Loss on the assistant's answer and its <|im_end|> (as qprep's data builder)."""
        labels = torch.full_like(input_ids, -100)
        row = input_ids[0].tolist()
        begin = max(i for i, t in enumerate(row) if t == start_id) + 3  # <|im_start|> assistant \n
        end = row.index(end_id, begin)
        labels[0, begin:end + 1] = input_ids[0, begin:end + 1]
        return labels

    memory = StepMemory()
    setup_s = time.perf_counter() - began
    order = _train_order(len(records))
    steps = []
    model.train()
    for index in order:
        memory.start()
        record = records[index]
        path = str(Path(job["videos"]) / (record["id"] + ".mp4"))
        tick = time.perf_counter()
        messages, element = conversation(record, path)
        (frames, metadata), sample_fps = fetch_video(element, return_video_sample_fps=True,
                                                     return_video_metadata=True)
        if metadata.get("video_backend") != "decord":
            raise RuntimeError(f"qwen-vl-utils read {path} with {metadata.get('video_backend')}, not decord")
        decoded = time.perf_counter()
        waveform = process_audio_info(messages, use_audio_in_video=True)[0]
        audio = time.perf_counter()
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        inputs = processor(text=[text], videos=[frames], video_metadata=[metadata], audio=[waveform],
                           audio_from_video_indices=[0], use_audio_in_video=True, do_sample_frames=False,
                           fps=sample_fps, return_tensors="pt", **pixels)
        labels = labels_for(inputs["input_ids"])
        processed = time.perf_counter()
        loss = model(**inputs, labels=labels, use_audio_in_video=True).loss
        forwarded = time.perf_counter()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        parts = phases.take()
        towers = parts.get("towers forward", 0.0)
        steps.append({"s": done - tick, "loss": float(loss), "tokens": int(inputs["input_ids"].shape[1]),
                      "ids": _digest(inputs["input_ids"][0].tolist()),
                      "phases": {"decode (fetch_video, decord)": decoded - tick, "audio (audioread, librosa)":
                                 audio - decoded, "processor": processed - audio, "towers forward": towers,
                                 "language model forward": forwarded - processed - towers,
                                 "backward + optimizer": done - forwarded}})
    return {"steps": steps, "setup_s": setup_s, "samples": len(records), "tower_output_requires_grad": any(tower_grad),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "torch_threads": torch.get_num_threads(), **memory.result()}


def extract_worker(job: dict) -> dict:
    """Bring the cache up to date (Ray starts only if a video needs extracting)."""
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.schemas.settings import VideoSettings

    _quiet_transformers()
    began = time.perf_counter()
    settings = VideoSettings(**job["policy"], **job.get("pixels", PIXELS), audio=job.get("audio", True),
                             kinds=tuple(job.get("kinds", ("video",))))
    summary = extract(job["videos"], job["store"], job["model"], settings, dtype="float32",
                      options=ExtractOptions(progress=False))
    return {"wall_s": time.perf_counter() - began, **summary.to_dict()}


def compute_worker(job: dict) -> dict:
    """Matmul weights of the towers and the language model, the bench model's and Omni-7B's (meta device)."""
    import torch
    from transformers import Qwen2_5OmniConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    _quiet_transformers()

    def weights(config) -> dict:
        with torch.device("meta"):
            thinker = Qwen2_5OmniThinkerForConditionalGeneration(config)

        def matmul(module) -> int:  # Linear and Conv weights: what costs FLOPs per token
            return sum(m.weight.numel() for m in module.modules()
                       if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv3d)))

        visual, audio = thinker.model.visual, thinker.model.audio_tower
        return {  # the weights applied once per: patch, merged video token, mel frame, ... (see compute_table)
            "vision_patch": matmul(visual.patch_embed) + matmul(visual.blocks), "vision_merge": matmul(visual.merger),
            "audio_conv1": matmul(audio.conv1), "audio_conv2": matmul(audio.conv2),
            "audio_layers": matmul(audio.layers), "audio_proj": matmul(audio.proj),
            "language": matmul(thinker.model.language_model) + thinker.lm_head.weight.numel()}

    bench = Qwen2_5OmniConfig.from_pretrained(job["model"]).thinker_config
    real = Qwen2_5OmniConfig().to_dict()
    for key, name in (("text", "text_config"), ("vision", "vision_config"), ("audio", "audio_config")):
        real["thinker_config"][name].update(OMNI_7B[key])
    real["thinker_config"]["text_config"].pop("layer_types", None)
    seven = Qwen2_5OmniConfig(**real).thinker_config
    return {"bench": weights(bench), "omni_7b": weights(seven)}


WORKERS = {"cache": cache_worker, "floor": loop_worker, "cache-loop": loop_worker, "raw": raw_worker,
           "raw-stock": raw_worker, "extract": extract_worker, "compute": compute_worker}


def worker_main(job_json: str) -> None:
    job = json.loads(job_json)
    result = WORKERS[job["kind"]](job)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    others_cores: float
    result: dict


def run_worker(job: dict, measured: bool = True) -> Run:
    """This script in a fresh process doing one job; returns what it reported."""
    if measured:
        wait_for_quiet()
    env = {**os.environ, "FORCE_QWENVL_VIDEO_READER": "decord"}
    busy, children, own = system_busy_s(), children_cpu_s(), time.process_time()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    wall = time.perf_counter() - start
    cpu = children_cpu_s() - children
    others = max(0.0, system_busy_s() - busy - cpu - (time.process_time() - own)) / wall
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return Run(wall, cpu, others, json.loads(line[len(RESULT_TAG):]))
    raise RuntimeError(f"worker {job['kind']} exited {done.returncode}:\n{done.stderr[-4000:]}")


@dataclass
class Row:
    name: str
    steps: list[dict]  # measured steps (warm-up left out)
    run: Run
    warmup: int
    note: str = ""
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def times(self) -> list[float]:
        return [s["s"] for s in self.steps]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.times)


def make_row(name: str, run: Run, warmup: int) -> Row:
    measured = run.result["steps"][warmup:]
    phases = {}
    if measured and "phases" in measured[0]:
        phases = {k: statistics.median(s["phases"][k] for s in measured) for k in measured[0]["phases"]}
    return Row(name, measured, run, warmup, phases=phases)


def best(runs: list[Row]) -> Row:
    """The run with the lowest median step time, with the largest memory of any run."""
    chosen = min(runs, key=lambda r: r.median_s)
    for key in ("steps_peak_mb", "setup_peak_mb"):
        chosen.run.result[key] = max(r.run.result[key] for r in runs)
    return chosen


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def environment(workdir: Path) -> dict:
    return machine.environment(workdir, PACKAGES)


def fmt(value, pattern: str, suffix: str = "") -> str:
    return "" if value is None else format(value, pattern) + suffix


def markdown(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def main_table(rows: list[Row], base: Row, base_name: str) -> str:
    header = ("path", "steps", "median step s", "mean step s", "min / max s", "samples/s", f"vs {base_name} (median)",
              "tokens/step (median)", "setup s", "setup peak MB", "steps peak RSS MB", "RSS at step 1 MB",
              "steps' gain MB",
              "loss first → last", "others' cores", "note")
    out = []
    for r in rows:
        result = r.run.result
        losses = [s["loss"] for s in r.steps]
        out.append((r.name, len(r.steps), fmt(r.median_s, ".3f"), fmt(r.mean_s, ".3f"),
                    f"{min(r.times):.3f} / {max(r.times):.3f}", fmt(1 / r.mean_s, ".2f"),
                    fmt(r.median_s / base.median_s, ".2f", "x"),
                    int(statistics.median(s["tokens"] for s in r.steps)), fmt(result.get("setup_s"), ".1f"),
                    fmt(result["setup_peak_mb"], ".0f"), fmt(result["steps_peak_mb"], ".0f"),
                    fmt(result["baseline_mb"], ".0f"), fmt(result["steps_peak_mb"] - result["baseline_mb"], ".0f"),
                    f"{losses[0]:.4f} → {losses[-1]:.4f}",
                    fmt(r.run.others_cores, ".2f"),
                    "; ".join(filter(None, (r.note, gpu_note(result))))))
    return markdown(header, out)


def gpu_note(result: dict) -> str:
    return f"GPU peak allocated {result['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in result else ""


def phase_table(rows: list[Row]) -> str:
    header = ("path", "phase", "median s", "share of median step")
    out = []
    for r in rows:
        for name, seconds in r.phases.items():
            out.append((r.name, name, fmt(seconds, ".4f"), fmt(100 * seconds / r.median_s, ".1f", " %")))
    return markdown(header, out)


def compute_table(weights: dict, row: Row) -> str:
    """Forward FLOPs per sample (2 × matmul weights × tokens, the steps' mean shapes), for the bench
    model and for Omni-7B, and the raw/cache ratio compute alone would give."""
    mean = {k: statistics.fmean(s[k] for s in row.steps) for k in ("tokens", "video_tokens", "audio_tokens")}
    rows = []
    for name, w in (("bench model", weights["bench"]), ("Qwen2.5-Omni-7B", weights["omni_7b"])):
        # A merged video token is 4 patches (merge 2×2); an audio token is 4 mel frames (conv1, stride 1),
        # 2 frames after conv2 (stride 2: the encoder layers), pooled by 2 before proj.
        vision = w["vision_patch"] * 4 + w["vision_merge"]
        audio = w["audio_conv1"] * 4 + (w["audio_conv2"] + w["audio_layers"]) * 2 + w["audio_proj"]
        towers = 2 * (vision * mean["video_tokens"] + audio * mean["audio_tokens"])
        language = 2 * w["language"] * mean["tokens"]
        vision_weights = w["vision_patch"] + w["vision_merge"]
        audio_weights = w["audio_conv1"] + w["audio_conv2"] + w["audio_layers"] + w["audio_proj"]
        rows.append((name, f"{vision_weights / 1e6:.0f} M", f"{audio_weights / 1e6:.0f} M",
                     f"{w['language'] / 1e6:.0f} M", f"{towers / 1e9:.1f}", f"{language / 1e9:.1f}",
                     f"{(towers + 3 * language) / (3 * language):.2f}x"))
    header = ("model", "vision matmul weights", "audio matmul weights", "LM + lm_head matmul weights",
              "towers forward GFLOP/sample", "LM forward GFLOP/sample", "(towers + 3 LM) / (3 LM)")
    note = (f"\nPer sample: {mean['tokens']:.0f} tokens, of them {mean['video_tokens']:.0f} video and "
            f"{mean['audio_tokens']:.0f} audio (means over the measured steps). The last column is the raw/cache "
            f"ratio if a step were its matmuls alone, with the towers frozen (forward only) and the LM step ≈ 3 "
            f"forwards; decode, audio loading and the processor come on top on the raw side.")
    return markdown(header, rows) + "\n" + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=12, help="clips (5-10 s, 320x240, h264 + aac)")
    parser.add_argument("--steps", type=int, help="steps per path, warm-up included (default: 2 per video)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the statistics")
    parser.add_argument("--num-frames", type=int, help="a fixed frame count instead of fps 2")
    parser.add_argument("--text-hidden", type=int, default=512, help="language model width")
    parser.add_argument("--text-layers", type=int, default=4, help="language model layers")
    parser.add_argument("--family", default="qwen2_5_omni", choices=FAMILIES,
                        help="qwen3_vl: a Qwen3-VL checkpoint (vision at the 8B's width, deepstack), no audio; "
                             "qwen3_omni_moe: a Qwen3-Omni checkpoint (towers at the 30B-A3B's widths, deepstack, "
                             f"MoE language model), audio in video; both: paths {','.join(QWEN3_VL_PATHS)} only")
    parser.add_argument("--vision-depth", type=int,
                        help="vision blocks (default 2 for Qwen2.5-Omni, width 1280 as released; 3 for Qwen3-VL and "
                             "Qwen3-Omni, width 1152, one block per deepstack level)")
    parser.add_argument("--audio-layers", type=int, default=2,
                        help="audio encoder layers (width 1280, as released; Qwen2.5-Omni and Qwen3-Omni)")
    parser.add_argument("--mixed", type=int, default=0, metavar="IMAGES",
                        help="the mixed-media row: the clips and this many JPEG photos extracted with --media, "
                             "records cycling through a video, an image, an image + a video, two videos and "
                             f"text only; paths {','.join(QWEN3_VL_PATHS)}, goal cache / floor <= "
                             f"{MIXED_CACHE_OVER_FLOOR_GOAL}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help=f"where the cache paths train (the raw paths run on CPU only; on cuda the paths "
                             f"{','.join(QWEN3_VL_PATHS)} by default)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the cache paths' training dtype (bfloat16: autocast over float32 LoRA weights, as "
                             "`qprep train --dtype bfloat16`)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="off on every path")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qprep-bench-train"),
                        help="cache of clips, model and store")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each path; the fastest median is shown")
    parser.add_argument("--paths", help="which paths to run (default: cache,cache-loop,floor,raw,raw-stock; "
                                         f"Qwen3-VL, Qwen3-Omni: {','.join(QWEN3_VL_PATHS)})")
    parser.add_argument("--profile", action="store_true", help="cProfile the cache loop even within the goal")
    parser.add_argument("--quiet-wait", type=float, default=180,
                        help="before each measured run, wait up to this many seconds for the other processes "
                             "on the machine to go idle (0: never wait)")
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    steps = args.steps or 2 * args.videos
    if steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    qwen3_vl, qwen3_omni = args.family == "qwen3_vl", args.family == "qwen3_omni_moe"
    qwen3 = QWEN3_PATHS.get(args.family)  # the Qwen3 families' paths (None: Qwen2.5-Omni, every path)
    if args.mixed or args.device == "cuda":  # the raw paths read one video per sample, on CPU
        qwen3 = qwen3 or QWEN3_VL_PATHS
    if args.vision_depth is None:
        args.vision_depth = 3 if qwen3 else 2
    if args.paths is None:
        args.paths = ",".join(qwen3) if qwen3 else "cache,cache-loop,floor,raw,raw-stock"
    if qwen3 and set(args.paths.split(",")) - set(qwen3):
        parser.error(f"--family {args.family} runs the paths {','.join(qwen3)} only")
    floor_goal = (MIXED_CACHE_OVER_FLOOR_GOAL if args.mixed else
                  QWEN3_VL_CACHE_OVER_FLOOR_GOAL if qwen3_vl else CACHE_OVER_FLOOR_GOAL)
    workdir, repeats = args.workdir.resolve(), max(1, args.repeats)
    QUIET["max_wait_s"] = args.quiet_wait
    workdir.mkdir(parents=True, exist_ok=True)
    model = ensure_model(workdir, args)
    videos = ensure_media(workdir, args.videos, args.mixed) if args.mixed else ensure_videos(workdir, args.videos)
    frames = f"{args.num_frames} frames" if args.num_frames else f"fps {FPS:g}"
    store = workdir / "stores" / f"{model.name}-{videos.name}-{frames.replace(' ', '')}.zarr"
    data = (write_mixed_data(workdir / f"data-mixed-{args.videos}v{args.mixed}ix{steps}.json", args.videos,
                             args.mixed, steps) if args.mixed
            else write_data(workdir / f"data-{args.videos}x{steps}.json", args.videos, steps))
    facts = environment(workdir)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)

    print("extract (brings the cache up to date) …", file=sys.stderr, flush=True)
    media = {**QWEN3_MEDIA.get(args.family, {}), **({"kinds": ["video", "image"]} if args.mixed else {})}
    extracted = run_worker({"kind": "extract", "videos": str(videos), "store": str(store), "model": str(model),
                            "policy": policy(args), **media}, measured=False).result
    if extracted["failed"]:
        raise RuntimeError(f"extraction failed: {json.dumps(extracted)[:2000]}")
    # The compute split compares the raw path's towers with the LM (Qwen2.5-Omni only: no raw path for Qwen3).
    weights = None if qwen3 else run_worker({"kind": "compute", "model": str(model)}, measured=False).result

    common = {"model": str(model), "cache": str(store), "data": str(data), "videos": str(videos),
              "gradient_checkpointing": not args.no_gradient_checkpointing, "warmup": args.warmup,
              "num_frames": args.num_frames, "device": args.device, "dtype": args.dtype}
    names = {"cache": "cache: qprep train()", "cache-loop": "cache, phases (train()'s loop, instrumented)",
             "floor": "floor: LM step on batches in memory",
             "raw": "raw video: decode + processor + thinker (towers out of autograd)",
             "raw-stock": "raw video, stock peft + transformers 5 (backward runs through the frozen towers)"}
    rows: dict[str, Row] = {}
    for kind in args.paths.split(","):
        runs = []
        for attempt in range(repeats):
            print(f"{kind} ({attempt + 1}/{repeats}) …", file=sys.stderr, flush=True)
            job = {**common, "kind": kind, "out": str(workdir / "runs" / kind), "tower_grad": kind == "raw-stock"}
            runs.append(make_row(names[kind], run_worker(job), args.warmup))
        rows[kind] = best(runs)

    cache, floor, raw = rows.get("cache") or rows.get("cache-loop"), rows.get("floor"), rows.get("raw")
    # Checks that the paths did the same work.
    reference = rows.get("floor") or rows.get("cache-loop")
    for row in (rows.get("raw"), rows.get("raw-stock")):
        if row and reference:
            same = sum(a["ids"] == b["ids"] for a, b in zip(row.steps, reference.steps))
            row.note = (f"input_ids equal to the cached samples' in {same}/{len(row.steps)} steps; LoRA weights "
                        f"{row.run.result['trainable']:,} (cache path {reference.run.result['trainable']:,}); "
                        f"tower outputs require grad: {row.run.result['tower_output_requires_grad']}")
    if floor and rows.get("cache"):
        gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(floor.steps, rows["cache"].steps))
        floor.note = f"losses vs train()'s: max |diff| {gap:.2e}"

    ratios = {}
    if raw and cache:
        ratios["raw/cache"] = (raw.median_s / cache.median_s, raw.mean_s / cache.mean_s)
    if rows.get("raw-stock") and cache:
        stock = rows["raw-stock"]
        ratios["raw (stock)/cache"] = (stock.median_s / cache.median_s, stock.mean_s / cache.mean_s)
    if floor and cache:
        ratios["cache/floor"] = (cache.median_s / floor.median_s, cache.mean_s / floor.mean_s)
    profile = None
    if "cache/floor" in ratios and (ratios["cache/floor"][0] > floor_goal or args.profile):
        print("cache loop under cProfile …", file=sys.stderr, flush=True)
        profile = run_worker({**common, "kind": "cache-loop", "out": "", "profile": True}).result.get("profile")

    ordered = [rows[k] for k in ("raw-stock", "raw", "cache", "cache-loop", "floor") if k in rows]
    print()
    print(markdown(("machine", "value"), list(facts.items())))
    seconds = sum(SECONDS[i % len(SECONDS)] for i in range(args.videos))
    if qwen3_vl:
        import qwen3vl

        what = (f"Qwen3-VL, vision {args.vision_depth} blocks at the 8B's width 1152 with deepstack levels "
                f"{qwen3vl.deepstack_indexes(args.vision_depth)} (out {args.text_hidden}), language model "
                f"{args.text_layers} layers × {args.text_hidden}. Data: {args.videos} clips ({seconds} s, "
                f"{WIDTH}x{HEIGHT} h264 at {'/'.join(map(str, RATES))} fps), {frames}, no audio, "
                f"{QWEN3_VL_PIXELS['min_pixels']}..{QWEN3_VL_PIXELS['max_pixels']} pixels per clip")
    elif qwen3_omni:
        import qwen3omni

        what = (f"Qwen3-Omni, vision {args.vision_depth} blocks at the 30B-A3B's width 1152 with deepstack levels "
                f"{qwen3omni.deepstack_indexes(args.vision_depth)} and audio {args.audio_layers} layers at its width "
                f"1280 (both out {args.text_hidden}), MoE language model {args.text_layers} layers × "
                f"{args.text_hidden} ({qwen3omni.EXPERTS} experts, top {qwen3omni.EXPERTS_PER_TOKEN}). Data: "
                f"{args.videos} clips ({seconds} s, {WIDTH}x{HEIGHT} h264 + aac at {'/'.join(map(str, RATES))} fps), "
                f"{frames} + audio in the video block, {QWEN3_OMNI_PIXELS['min_pixels']}.."
                f"{QWEN3_OMNI_PIXELS['max_pixels']} pixels per frame")
    else:
        what = (f"vision {args.vision_depth} blocks and audio {args.audio_layers} layers at the released width 1280, "
                f"language model {args.text_layers} layers × {args.text_hidden}. Data: {args.videos} clips "
                f"({seconds} s, {WIDTH}x{HEIGHT} h264 + aac at {'/'.join(map(str, RATES))} fps), {frames} + audio")
    if args.mixed:
        what += (f"; mixed media: {args.mixed} JPEG photos ({', '.join(f'{w}x{h}' for w, h in IMAGE_SIZES)}) beside "
                 f"the clips, records cycling through a video, an image, an image + a video, two videos, text only")
    print(f"\nModel {model.name}: {what}, "
          f"{steps} steps per path (each clip {steps / args.videos:g}×, train()'s seeded order), first {args.warmup} "
          f"left out. Batch size 1, grad accum 1, {args.dtype}, {args.device.upper()}, gradient checkpointing "
          f"{'off' if args.no_gradient_checkpointing else 'on'}, "
          f"torch threads {ordered[0].run.result['torch_threads']}; "
          f"fastest of {repeats}.")
    if extracted["extracted"]:
        print(f"Cache built in this run: {extracted['extracted']} videos extracted in {extracted['wall_s']:.1f} s "
              f"(one-off, not in the step times).")
    else:
        print(f"Cache up to date ({extracted['videos']} videos; extract() took {extracted['wall_s']:.1f} s to check).")
    if qwen3:
        from qprep.store.status import store_status

        status = store_status(store)
        arrays, tokens = status["token_bytes"], status["tokens"]["video"] or None
        audio_tokens = status["tokens"]["audio"] or None
        visual = sum(size for kind, size in arrays.items() if kind != "audio")  # merged tokens + deepstack
        sample = statistics.fmean(s["video_tokens"] for s in reference.steps) if reference else None
        heard = statistics.fmean(s["audio_tokens"] for s in reference.steps) if reference and audio_tokens else 0
        step_mb = ((sample * visual / tokens + (heard * arrays["audio"] / audio_tokens if heard else 0)) / 1e6
                   if tokens and sample else None)
        print("Cache arrays: " + ", ".join(f"{kind} {size / 1e6:.1f} MB" for kind, size in arrays.items())
              + (f" ({visual / tokens / 1e3:.1f} kB per merged token with its deepstack levels" if tokens else "")
              + (f", {arrays['audio'] / audio_tokens / 1e3:.1f} kB per audio token" if audio_tokens else "")
              + (f"; a step reads {sample:.0f} merged tokens{f' and {heard:.0f} audio tokens' if heard else ''}, "
                 f"{step_mb:.2f} MB)" if step_mb is not None else ")" if tokens else ""))
    print()
    print(main_table(ordered, cache, "cache") if cache else main_table(ordered, ordered[-1], "floor"))
    print()
    print("Where a step's time goes (median over the measured steps of each phase):\n")
    print(phase_table([r for r in ordered if r.phases]))
    if reference and weights:
        print("\nHow the compute splits (matmuls only):\n")
        print(compute_table(weights, reference))
    print()
    for name, (median, mean) in ratios.items():
        over = name.startswith("raw")
        goal = RAW_OVER_CACHE_GOAL if over else floor_goal
        met = median >= goal if over else median <= goal
        sign = ">=" if over else "<="
        print(f"goal {name} step time {sign} {goal:g}x: median {median:.2f}x, mean {mean:.2f}x "
              f"({'MET' if met else 'NOT MET'})")
    print(f"\nwaited {QUIET['waited_s']:.0f} s in all for the machine to go idle (limit {args.quiet_wait:g} s a run)")
    if profile:
        print("\ncProfile of the cache loop's measured steps (top by own time):\n")
        print(profile)
    if args.json:
        args.json.write_text(json.dumps({
            "environment": facts, "args": {k: str(v) for k, v in vars(args).items()}, "extract": extracted,
            "weights": weights, "ratios": ratios,
            "rows": {k: {"name": r.name, "steps": r.steps, "wall_s": r.run.wall_s, "cpu_s": r.run.cpu_s,
                         "others_cores": r.run.others_cores, "phases": r.phases,
                         **{key: v for key, v in r.run.result.items() if key not in ("steps", "profile")}}
                     for k, r in rows.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
