"""The `qprep` command line. It parses and delegates; the work lives in the library.

Exit codes: 0 success, 2 usage error, 3 bad settings, 4 a video that cannot be prepared,
5 `qprep verify` found a cached video that differs from transformers' reference beyond the tolerance,
6 a data-parallel training rank died or failed.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from qprep.datasets.detect import FORMATS
from qprep.errors import RankFailed, SettingsError, VideoError
from qprep.schemas.dtypes import DTYPE_NAMES
from qprep.schemas.metrics import metrics_json
from qprep.schemas.towers import LEVELS, MERGED
from qprep.schemas.training import GRPO_LOSS_TYPES, METHODS
from qprep.store.fs import is_url

EXIT_SETTINGS, EXIT_VIDEO = 3, 4
EXIT_MISMATCH = 5  # qprep verify: the cache differs from the reference
EXIT_RANK = 6  # qprep train: a data-parallel rank died or failed


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        height, width = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter("expected HEIGHTxWIDTH, e.g. 224x224") from None
    return height, width


class StoreLocation(click.ParamType):
    """A store's directory, or its URL (s3://bucket/prefix/store.zarr), which is kept as given."""

    name = "store"

    def __init__(self, exists: bool):
        self._path = click.Path(exists=exists, file_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and is_url(value):
            return value
        return self._path.convert(value, param, ctx)


def video_options(command):
    """The CPU-stage flags, shared by every command that prepares video."""
    options = [
        click.option("--job", default=None, help="Named preset (see `qprep jobs`) or a TOML file; flags override it."),
        click.option("--model", default=None,
                     help="Model directory or hub id whose preprocessor config to follow "
                          "(default: transformers' Qwen2-VL processor defaults)."),
        click.option("--fps", type=float, default=None, help="Frames per second to sample (Qwen's rule; default 2)."),
        click.option("--num-frames", type=int, default=None, help="Sample this many frames uniformly instead of --fps."),
        click.option("--min-frames", type=int, default=None, help="Lower bound on frames with --fps (default 4)."),
        click.option("--max-frames", type=int, default=None, help="Upper bound on frames with --fps (default 768)."),
        click.option("--video-start", type=float, default=None, help="Window start, seconds."),
        click.option("--video-end", type=float, default=None, help="Window end, seconds."),
        click.option("--min-pixels", type=int, default=None,
                     help="Pixel floor per frame, or for the whole clip where the model's processor bounds "
                          "the clip (default: the model's)."),
        click.option("--max-pixels", type=int, default=None,
                     help="Pixel ceiling per frame, or budget for the whole clip where the model's "
                          "processor bounds the clip (default: the model's)."),
        click.option("--size", callback=_size, default=None, metavar="HxW", help="Resize every frame to HxW, e.g. 224x224."),
        click.option("--audio/--no-audio", default=None, help="Featurize the audio track (Omni models; default on)."),
        click.option("--long-audio", type=click.Choice(["window", "error"]), default=None,
                     help="Audio longer than the feature extractor's window (300 s), where the model's processor "
                          "would cut it: encode it in windows, or fail. (Where the processor takes any track "
                          "whole, so does qprep.)"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _warn(line: str) -> None:
    click.echo(f"warning: {line}", err=True)


def _preset(job):
    """--job's preset, or an empty one (defaults, then the flags)."""
    from qprep.schemas.jobs import Job, load_job

    return load_job(job) if job else Job(name="flags", version=1)


def _model(model, preset) -> str:
    """--model, else the one the preset names; one of them is required."""
    if not (model or preset.model):
        raise click.UsageError("--model is required (or a --job that names one)")
    return model or preset.model


def data_file_options(command):
    """--format, --media-dir and the readers' options, shared by the commands that read --data."""
    options = [
        click.option("--format", "data_format", type=click.Choice(FORMATS), default=None,
                     help="The --data file's format (default: detected from its content; README, \"Bring your "
                          "dataset\")."),
        click.option("--media-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="Where the file's media paths and ids are resolved (the folder `qprep extract --videos` "
                          "read; default: the file's folder); given, a record whose file is missing is left out."),
        click.option("--times", type=click.Choice(["seconds", "relative"]), default="seconds", show_default=True,
                     help="LongVALE's <sN>/<eN> written as seconds, or as its 2-digit share of the clip."),
        click.option("--annotations-as", type=click.Choice(["grounding", "captions"]), default="grounding",
                     show_default=True, help="A {video: {timestamps, sentences}} file: a grounding sample per "
                                             "sentence, or one dense-captioning sample per video."),
        click.option("--grounding-prompt", default=None,
                     help="The question of a grounding sample, {sentence} standing for its sentence."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _data_file(path, data_format, media_dir, times, annotations_as, grounding_prompt):
    """--data and its reader options as one `DataFile` (every training rank reads it as given)."""
    from qprep.datasets import DataFile

    return DataFile(path, format=data_format, media_dir=media_dir, check_files=media_dir is not None, times=times,
                    task=annotations_as, prompt=grounding_prompt)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="qprep")
def main():
    """qprep prepares video for fine-tuning Qwen multimodal models once, then trains from the cache.

    \b
    Start with:
      qprep demo                      the whole job on generated videos
      qprep prepare clip.mp4          what the model would see of one video
      qprep extract --videos DIR --out store.zarr --model MODEL
                                      cache the towers' output for a folder of videos
      qprep status store.zarr         what a store holds and what a re-run would do
      qprep verify store.zarr         recompute a sample with transformers and compare with the cache
      qprep train --cache store.zarr --data train.json --model MODEL --out run/
                                      LoRA on the language model from the cache
      qprep infer --cache store.zarr --adapter run/adapter --out answers.jsonl
                                      answer from the cache with a trained adapter
      qprep eval --answers answers.jsonl --data test.json
                                      score the answers' timed captions against the truth
      qprep plot run-a/ run-b/ --out compare.png
                                      several training runs' curves on one figure
      qprep jobs                      the named presets
    """
    _exit_cleanly_on_sigterm()
    _exit_without_a_last_collection()


def _exit_without_a_last_collection() -> None:
    """At exit, freeze what is alive instead of letting the interpreter's shutdown walk it for cycles:
    with torch and transformers loaded that walk took 3.0 s of every command that ran a model
    (0.7 s frozen). Nothing is left unfinished: qprep closes its files and stores before it returns,
    and atexit handlers (multiprocessing's, logging's) still run first."""
    import atexit
    import gc

    atexit.unregister(gc.freeze)  # once, however many commands a process runs (tests)
    atexit.register(gc.freeze)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (a scheduler's timeout, `kill`, a closed terminal session) unwinds like Ctrl-C: the
    writer's lock is released and partial files are removed. Python's default dies on the spot,
    which on an object store leaves a lock object that refuses every later run."""
    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


@main.command()
@click.argument("video", type=click.Path(path_type=Path))
@video_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def prepare(video, job, model, as_json, **flags):
    """Prepare one VIDEO exactly as the model's processor would, and report what came out.

    \b
    Examples:
      qprep prepare clip.mp4
      qprep prepare clip.mp4 --job seed-omni-100f --model ./Qwen2.5-Omni-3B
      qprep prepare clip.mp4 --num-frames 100 --size 224x224 --json
    """
    from qprep.pipeline.prepare import prepare as prepare_video
    from qprep.report import format_prepared, prepared_summary, to_json
    from qprep.schemas.settings import load_model_spec

    with _errors_to_exit_codes():
        settings = _preset(job).video_settings(**flags)
        prepared = prepare_video(video, settings, load_model_spec(model))
    click.echo(to_json(prepared_summary(prepared)) if as_json else format_prepared(prepared))


@main.command()
@click.option("--videos", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of videos (searched recursively). A video's id is its path in it, minus the extension.")
@click.option("--media", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of videos, images (jpg, png, webp, bmp, tiff, gif) and, for a model with an audio tower, "
                   "audio files (wav, flac, mp3, ogg, m4a), searched recursively; ids as for --videos (an audio "
                   "file's keeps its extension). Images go through the checkpoint's own image processor and "
                   "get_image_features, audio files through its feature extractor and get_audio_features.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A dataset (any format --format names): extract exactly the videos, images and video windows "
                   "its records name, each once, with the ids training reads; paths resolved under --media-dir "
                   "(default: the file's folder). Media not found are listed first and left out.")
@data_file_options
@click.option("--strict", is_flag=True,
              help="With --data: stop before any work when a medium is not found or a record cannot be read.")
@click.option("--out", required=True, type=StoreLocation(exists=False),
              help="The store to create or update, e.g. store.zarr or s3://bucket/prefix/store.zarr.")
@video_options
@click.option("--dtype", type=click.Choice(["auto", *DTYPE_NAMES]), default="auto", show_default=True,
              help="Tower dtype and token dtype; auto = the checkpoint's (bf16 for Qwen's releases), or the store's.")
@click.option("--shards", type=click.IntRange(1, 1 << 20), default=None,
              help="Shard count of a new store (default: about 256 entries a shard, at least 256 shards). "
                   "A changed medium re-writes one shard.")
@click.option("--level", type=click.Choice(LEVELS), default=MERGED, show_default=True,
              help="What of the vision tower is stored. merged: the merger's output (serves runs whose merger "
                   "is frozen); merger-input: the merger's input (and each deepstack merger's), 4 patches of the "
                   "vision width per token, for runs that train the merger (train --train-merger) or not.")
@click.option("--rebuild", is_flag=True, help="Delete the store and extract everything again (needed to change settings).")
@click.option("--ray-address", envvar="RAY_ADDRESS", default=None,
              help="Run on this Ray cluster (env RAY_ADDRESS); default: a Ray of this run's own when Ray runs the "
                   "stages (see --executor).")
@click.option("--executor", type=click.Choice(["auto", "local", "ray"]), default="auto", show_default=True,
              help="What runs the stages. local: a process per core for the CPU stage and the towers in this "
                   "process, no Ray (fastest start, one machine, one GPU); ray: Ray Data over the cluster; auto: "
                   "local for a plan of up to 256 videos when no cluster is named, else ray. The store is the "
                   "same bytes either way.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Where the towers run (default: one actor per GPU when the cluster has GPUs, else the CPU).")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Videos per tower-stage batch handed to the tower actor (each video is its own tower call).")
@click.option("--image-call-rows", type=click.IntRange(0), default=0,
              help="Images per vision-tower call up to this many patch rows (a power of two, e.g. 16384), every "
                   "call filled to exactly that size so an image's tokens do not depend on the images beside it; "
                   "for GPUs, which one small image a call leaves idle (on CPU it gains nothing). Part of the "
                   "store's settings. Default 0: one image a call.")
@click.option("--revision", default=None, help="Hub revision of --model.")
@click.option("--follow-links", is_flag=True,
              help="Also follow links that lead out of --videos (links inside it are always followed; links "
                   "not followed are listed in the summary).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(videos, media, data, data_format, media_dir, times, annotations_as, grounding_prompt, strict, out, job,
            model, dtype, shards, level, rebuild, ray_address, executor, device, batch_size, image_call_rows, revision,
            follow_links, as_json, quiet, **flags):
    """Cache the frozen towers' output for every video under --videos (every video and image under
    --media, or the media a --data set names) in the store --out.

    The CPU stage (decode, sample, resize, patchify, log-mel) runs as Ray tasks, or in a pool of
    local processes for small runs (--executor); the vision and audio towers run in one actor per
    GPU (or on the CPU), or in this process; each shard of the store is committed
    atomically. Re-running extracts only new, changed and previously failed videos: an
    up-to-date store is checked in seconds without decoding anything or starting Ray. A video
    that cannot be read is recorded as failed with its cause, and the run goes on.

    \b
    Examples:
      qprep extract --videos clips/ --out clips.zarr --model ./Qwen2.5-Omni-3B
      qprep extract --videos clips/ --out clips.zarr --job seed-omni-100f
      qprep extract --videos clips/ --out clips.zarr --model Qwen/Qwen2.5-VL-7B-Instruct --ray-address auto
      qprep extract --media photos_and_clips/ --out mixed.zarr --model ./Qwen2.5-VL-7B-Instruct
      qprep extract --data train.json --media-dir /data/charades --out charades.zarr --model ./Qwen3-VL-8B
    """
    import dataclasses
    import json

    from qprep.extraction.run import ExtractOptions, extract as run_extract, format_summary
    from qprep.schemas.settings import MEDIA_KINDS
    from qprep.schemas.towers import Budget

    if sum(given is not None for given in (videos, media, data)) != 1:
        raise click.UsageError("give one source: --videos DIR (videos alone), --media DIR (videos, images, audio) or "
                               "--data FILE (the media a dataset names)")
    if data is None and (media_dir is not None or data_format is not None or strict):
        raise click.UsageError("--media-dir, --format and --strict go with --data")
    with _errors_to_exit_codes():
        preset = _preset(job)
        settings, model = preset.video_settings(**flags), _model(model, preset)
        if media is not None:
            videos, settings = media, dataclasses.replace(settings, kinds=MEDIA_KINDS)
        if data is not None:
            videos = _data_file(data, data_format, media_dir, times, annotations_as, grounding_prompt)
        options = ExtractOptions(ray_address=ray_address, executor=executor, device=device, batch_size=batch_size,
                                 budget=Budget(image_rows=image_call_rows), progress=not quiet,
                                 follow_links=follow_links, strict=strict,
                                 notify=lambda text: click.echo(text, err=True))
        try:
            summary = run_extract(videos, out, model, settings, dtype=dtype, shards=shards, rebuild=rebuild,
                                  revision=revision, level=level, options=options)
        except KeyboardInterrupt:
            click.echo("interrupted: the shards committed so far are kept; run the same command to finish.", err=True)
            sys.exit(130)
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else format_summary(summary, out))


@main.command("data")
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@data_file_options
@video_options
@click.option("--max-length", type=click.IntRange(1), default=None,
              help="With --model: count the samples longer than this many tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def data_command(data, data_format, media_dir, times, annotations_as, grounding_prompt, job, model, max_length,
                 as_json, **flags):
    """Look at a dataset before extracting or training on it: its records by kind, the media found
    and missing (record, path, where it looked), the records left out and why, the windows; with
    --model (or a --job naming one), each sample's token length at these settings, from the media's
    probes (nothing is decoded).

    \b
    Examples:
      qprep data train.json
      qprep data dataset_info.json --model ./Qwen2.5-VL-7B-Instruct --max-length 4096
      qprep data charades_train.json --media-dir /data/charades --job seed-omni-100f --json
    """
    import json

    from qprep.datasets.inspect import inspect_data

    with _errors_to_exit_codes():
        preset = _preset(job)
        report = inspect_data(_data_file(data, data_format, media_dir, times, annotations_as, grounding_prompt),
                              model=model or preset.model, settings=preset.video_settings(**flags),
                              max_length=max_length)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else "\n".join(report.lines()))


@main.command()
@click.argument("store", type=StoreLocation(exists=True))
@click.option("--videos", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Compare with this folder (default: the one the last extract used).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def status(store, videos, as_json):
    """What STORE holds (shards, videos ok/failed/pending, tokens, bytes, config, model).

    Nothing is decoded: pending videos are found by size and modification time.

    \b
    Examples:
      qprep status clips.zarr
      qprep status clips.zarr --videos ~/clips --json | jq .videos
    """
    import json

    from qprep.store.status import format_status, store_status

    with _errors_to_exit_codes():
        report = store_status(store, videos)
    click.echo(json.dumps(report, indent=2) if as_json else format_status(report))


@main.command()
@click.option("--cache", "cache_path", required=True, type=StoreLocation(exists=True),
              help="A store written by `qprep extract` (a directory or a URL).")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Training records: qprep\'s {"id", "conversations", "media"} list, or a published format '
                   '(--format).')
@data_file_options
@click.option("--model", default=None,
              help="The model the cache was extracted with (directory or hub id; default: the --job's).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoint-*/, adapter/, metrics.jsonl, loss.png, run.json.")
@click.option("--job", default=None, help="Preset (see `qprep jobs`) or TOML file whose [train] table to start from.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Passes over the data (default 2).")
@click.option("--lr", type=float, default=None, help="AdamW peak learning rate (default 1e-4).")
@click.option("--train-merger", type=click.Choice(["none", "full"]), default=None,
              help="The vision tower's merger (projector): none (frozen, default) or full (trained beside the "
                   "LoRA). Needs a store extracted with --level merger-input; saved beside the adapter as "
                   "merger.safetensors under the checkpoint's own key names.")
@click.option("--merger-lr", type=float, default=None,
              help="Peak learning rate of a trained merger (Qwen's mm_projector_lr; default: --lr).")
@click.option("--lr-scheduler", type=click.Choice(["linear", "cosine", "constant", "constant-with-warmup"]),
              default=None, help="How the learning rate moves over the run's optimizer steps, transformers' "
                                 "schedules (default linear: the Trainer's, down to 0).")
@click.option("--warmup-steps", type=click.IntRange(0), default=None,
              help="Optimizer steps of linear warmup from 0 (default 0; 0 lets --warmup-ratio decide).")
@click.option("--warmup-ratio", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Warmup as a fraction of the run's optimizer steps, rounded up (default 0).")
@click.option("--weight-decay", type=click.FloatRange(0), default=None,
              help="AdamW weight decay, never on biases and norms (default 0, the Trainer's).")
@click.option("--max-grad-norm", type=click.FloatRange(0), default=None,
              help="Clip the global gradient norm to this (default 1.0, the Trainer's; 0: no clipping).")
@click.option("--adam-beta1", type=click.FloatRange(0, 1), default=None, help="AdamW β1 (default 0.9).")
@click.option("--adam-beta2", type=click.FloatRange(0, 1), default=None, help="AdamW β2 (default 0.999).")
@click.option("--adam-eps", type=click.FloatRange(0), default=None, help="AdamW ε (default 1e-8).")
@click.option("--loss-weighting", type=click.Choice(["tokens", "batches"]), default=None,
              help="tokens: a step's loss is the mean over all its label tokens (the Trainer's, default); "
                   "batches: the mean of its batches' means.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Samples per batch, right-padded; audio and no-audio videos are batched apart (default 1).")
@click.option("--grad-accum", type=click.IntRange(1), default=None, help="Batches per optimizer step (default 2).")
@click.option("--max-length", type=click.IntRange(1), default=None,
              help="Leave out samples longer than this many tokens, video included (reported before training).")
@click.option("--packing", "packing", is_flag=True, default=None,
              help="Fill each row with several samples up to --max-length tokens (first fit over the seeded order, "
                   "never cut), attention kept within each sample: no step pays for padding.")
@click.option("--attn-implementation", type=click.Choice(["sdpa", "flash_attention_2", "eager"]), default=None,
              help="The language model's attention (default sdpa). With --packing, both attend within each "
                   "sample: sdpa one call per sample, flash_attention_2 (GPU, flash-attn installed) its "
                   "variable-length kernel; eager masks the whole row.")
@click.option("--shard", "shard", is_flag=True, default=None,
              help="Shard the language model, the adapter and the optimizer state over the ranks (FSDP2), for "
                   "models that do not fit one GPU: each rank holds 1/N of them and gathers a layer at a time.")
@click.option("--cut-to-max-length", "cut_to_max_length", is_flag=True, default=None,
              help="Cut longer samples' text at --max-length instead of leaving them out; a sample whose "
                   "video block itself reaches past it is still left out.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), default=None,
              help="Start the LoRA from this adapter (a folder written by `qprep train`: run/adapter, "
                   "run/checkpoint-*, run/best-adapter) instead of a fresh init: SFT then GRPO. Its rank, alpha "
                   "and targets must be the run's (pass its --lora-r and --lora-alpha); with --method grpo and "
                   "--beta > 0 it is the frozen reference. run.json records it and its weights' digest.")
@click.option("--lora-r", type=click.IntRange(1), default=None, help="LoRA rank (default 16).")
@click.option("--lora-alpha", type=click.IntRange(1), default=None, help="LoRA alpha (default 16).")
@click.option("--lora-dropout", type=click.FloatRange(0, 1), default=None, help="LoRA dropout (default 0.05).")
@click.option("--save-every", type=click.IntRange(0), default=None,
              help="Checkpoint every N optimizer steps, as well as at each epoch's end (default 0: epoch ends only).")
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Held-out records (as --data's): their loss from the cache, the training loss's token-level "
                   "mean, at each epoch's end and every --eval-every steps; in metrics.jsonl, loss.png and the bar.")
@click.option("--eval-every", type=click.IntRange(0), default=None,
              help="Validate every N optimizer steps as well as at epoch ends (default 0: epoch ends only).")
@click.option("--save-best", "save_best", is_flag=True, default=None,
              help="Keep the adapter with the lowest validation loss in OUT/best-adapter/ (needs --eval-data).")
@click.option("--seed", type=int, default=None, help="Fixes the data order and the LoRA init (default 0).")
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Processes reading the cache ahead of the model; 0 reads in-process (default: 2 on GPU, "
                   "0 on CPU, where workers would take cores from the compute). The result does not depend on it.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in the backward: less memory, slower (default on).")
@click.option("--report-to", multiple=True, callback=lambda ctx, param, value: value or None,
              metavar="TRACKER[,TRACKER]",
              help="Experiment trackers to report metrics.jsonl's numbers and the settings to, as the Trainer's "
                   "report_to: tensorboard (OUT/tensorboard), wandb (offline without credentials), mlflow, all "
                   "(every installed one) or none; repeat or comma-separate (default: tensorboard when installed). "
                   "Each is an extra: pip install 'qprep[wandb]'.")
@click.option("--gpus", type=click.IntRange(1), default=None,
              help="Data-parallel over N GPUs of this machine: N processes through torch's elastic launcher, "
                   "one GPU each; --batch-size is per GPU (torchrun --nproc-per-node N -m qprep train ... works too).")
@click.option("--cpu-ranks", type=click.IntRange(1), default=None,
              help="Data-parallel over N CPU processes (gloo): what --gpus does, without GPUs (for tests and "
                   "CPU-only machines).")
@click.option("--ray-address", default=None,
              help="Run the --gpus (or --cpu-ranks) ranks as Ray Train workers on this Ray cluster ('auto': the "
                   "running one), across its nodes; OUT must then be on storage every node reaches.")
@click.option("--ray-restarts", type=click.IntRange(0), default=2, show_default=True,
              help="Under Ray: restart the workers from the last checkpoint this many times when one dies.")
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="sft: next-token loss on the records' answers (default); grpo: G answers sampled per prompt "
                   "from the cache, scored by --reward, the policy moved towards the better ones of each group.")
@click.option("--reward", "rewards", multiple=True, callback=lambda ctx, param, value: value or None,
              metavar="NAME|MODULE:FUNCTION",
              help="GRPO: a reward, logged under its name; repeat for several (summed). Built in: tiou (default), "
                   "iou_v2, dense_f1, dense_tiou, format; or a function by import path, given (prompts, "
                   "completions, records), returning one float per completion.")
@click.option("--num-generations", type=int, default=None, help="GRPO: completions per prompt, G (default 8).")
@click.option("--temperature", type=float, default=None, help="GRPO: sampling temperature (default 1.0).")
@click.option("--top-p", type=float, default=None, help="GRPO: nucleus sampling's probability mass (default 1.0).")
@click.option("--max-new-tokens", type=int, default=None, help="GRPO: a completion's most tokens (default 512).")
@click.option("--beta", type=float, default=None,
              help="GRPO: weight of the KL term against the model with the adapter disabled, or with --adapter's "
                   "weights frozen when the run starts from one (default 0: none).")
@click.option("--epsilon", type=float, default=None, help="GRPO: the ratio's clip range (default 0.2).")
@click.option("--epsilon-high", type=float, default=None, help="GRPO: its upper side (default: --epsilon).")
@click.option("--loss-type", type=click.Choice(GRPO_LOSS_TYPES), default=None,
              help="GRPO: how the per-token loss is reduced, as TRL names it (default dapo, TRL's default).")
@click.option("--scale-rewards/--no-scale-rewards", default=None,
              help="GRPO: divide each group's centred rewards by their std (default on, TRL's 'group').")
@click.option("--num-iterations", type=int, default=None,
              help="GRPO: optimizer steps on each step's rollouts, the ratio clipped against the policy that "
                   "sampled them (TRL's num_iterations; default 1). Checkpoints fall after a step's last one.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out, with the same data order.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(cache_path, data, data_format, media_dir, times, annotations_as, grounding_prompt, model, out, job, eval_data,
          gpus, cpu_ranks, ray_address, ray_restarts, resume, as_json, quiet, **flags):
    """Train LoRA adapters on the language model from a cache: no tower loaded, no video decoded.

    Settings come from the defaults (the research recipe), then --job's [train] table, then the
    flags; the effective ones are written to OUT/run.json. Samples whose video is missing or
    failed in the cache are reported and left out before the first step.

    \b
    Examples:
      qprep train --cache clips.zarr --data train.json --model ./Qwen2.5-Omni-3B --out run/
      qprep train --cache clips.zarr --data train.json --job seed-omni-100f --out run/ --epochs 3
      qprep train --cache clips.zarr --data train.json --eval-data val.json --save-best --out run/
      qprep train --cache clips.zarr --data train.json --job seed-omni-100f --out run/ --report-to wandb
      qprep train --cache clips.zarr --data train.json --job seed-omni-100f --out run/ --gpus 3
      qprep train --cache s3://b/clips.zarr --data train.json --out /shared/run --ray-address auto --gpus 8
      qprep train --cache clips.zarr --data train.json --model ./Qwen2.5-Omni-3B --out run/ --resume
      qprep train --method grpo --cache clips.zarr --data grounding.json --model ./Qwen2.5-VL-7B --out rl/ \\
          --reward tiou --reward format --num-generations 8
      qprep train --method grpo --adapter sft/adapter --cache clips.zarr --data grounding.json \\
          --model ./Qwen2.5-VL-7B --out rl/ --beta 0.04
    """
    from qprep.train.loop import train as run_train
    from qprep.train.run_folder import RunFolder

    with _errors_to_exit_codes():
        preset = _preset(job)
        settings, model = preset.train_settings(**flags), _model(model, preset)
        if gpus and cpu_ranks:
            raise SettingsError("--gpus and --cpu-ranks: choose one")
        if ray_address and not (gpus or cpu_ranks):
            raise SettingsError("--ray-address needs --gpus N (or --cpu-ranks N): how many workers to run")
        reading = (data_format, media_dir, times, annotations_as, grounding_prompt)
        data, eval_data = _data_file(data, *reading), eval_data and _data_file(eval_data, *reading)
        summary = run_train(cache_path, data, model, out, settings, resume=resume, eval_data=eval_data,
                            ranks=gpus or cpu_ranks or 1, device="cuda" if gpus else ("cpu" if cpu_ranks else None),
                            ray_address=ray_address, ray_restarts=ray_restarts,
                            progress=not quiet, echo=(lambda line: click.echo(line, err=True)) if as_json else click.echo)
    if summary is None:  # a rank other than 0 (under torchrun): rank 0 reports
        return
    if as_json:
        click.echo(metrics_json({**summary.__dict__, "adapter": str(RunFolder(out).adapter)}, indent=2,
                                warn=_warn))
    else:
        measured, best_of = ("reward", "highest") if settings.method == "grpo" else ("loss", "lowest")
        validation = "" if summary.last_val_loss is None else f", validation {measured} {summary.last_val_loss:.4f}"
        best = "" if summary.best_val_loss is None else f"; {best_of} validation {measured} " \
                                                       f"{summary.best_val_loss:.4f} in {RunFolder(out).best_adapter}"
        click.echo(f"{summary.steps} steps, loss {summary.first_loss:.4f} → {summary.last_loss:.4f}{validation} in "
                   f"{summary.seconds:.1f} s; adapter in {RunFolder(out).adapter}{best}")


@main.command()
@click.argument("store", type=StoreLocation(exists=True))
@click.option("--sample", type=click.IntRange(1), default=3, show_default=True,
              help="Check this many media, drawn at random (see --seed) among those extracted ok.")
@click.option("--all", "check_all", is_flag=True, help="Check every medium extracted ok.")
@click.option("--ids", default=None, help="Check these media (comma-separated ids) instead of a sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@click.option("--tolerance", type=click.FloatRange(0), default=None,
              help="Largest token difference allowed, relative to the reference tokens' largest magnitude "
                   "(default: 0 for float32 stores, 2^-6 for bfloat16, 2^-9 for float16; 0 = bit-exact).")
@click.option("--videos", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The media folder (default: the one the last extract used).")
@click.option("--model", default=None, help="Where the store's model is now (default: where it was at extraction).")
@click.option("--revision", default=None, help="Hub revision of the model.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Where the reference towers run (default: cuda when the videos were extracted there and "
                   "one is present, else cpu).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(store, sample, check_all, ids, seed, tolerance, videos, model, revision, device, as_json, quiet):
    """Recompute some of STORE's media with transformers' own processor and model, and compare.

    Each checked video is decoded plainly, its frame plan re-derived, its pixels and audio features
    made by the model's AutoProcessor, and its tokens by the model class loaded with from_pretrained
    (the towers are loaded for this check only); an image or an audio file likewise, through the
    processor and get_image_features or get_audio_features. On a CPU each medium is recomputed at
    the torch threads its extraction ran at (an ulp can depend on them). The report gives, per
    medium, the largest difference of its visual and audio tokens and whether the grid, frame count,
    frame indices, frame times, second_per_grid and mel length agree with the cache.

    Exit status 5 when any checked medium differs beyond the tolerance; the report names the medium
    and what differed.

    \b
    Examples:
      qprep verify clips.zarr                      three media drawn at random
      qprep verify clips.zarr --all --json
      qprep verify clips.zarr --ids talk/a,c --videos /data/clips --model ./Qwen2.5-Omni-3B
    """
    import json

    from qprep.audit.verify import format_report, verify as run_verify

    with _errors_to_exit_codes():
        report = run_verify(store, model=model, videos=videos, revision=revision,
                            ids=[i.strip() for i in ids.split(",") if i.strip()] if ids else None,
                            sample=None if check_all else sample, seed=seed, tolerance=tolerance, device=device,
                            progress=not quiet)
    click.echo(metrics_json(report.to_dict(), indent=2, warn=_warn)
               if as_json else format_report(report))
    if not report.ok:
        sys.exit(EXIT_MISMATCH)


@main.command()
@click.option("--cache", "cache_path", required=True, type=StoreLocation(exists=True),
              help="A store written by `qprep extract` (a directory or a URL).")
@click.option("--model", default=None,
              help="The base model (directory or hub id; default: the one the cache was extracted with).")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="LoRA adapter folder written by `qprep train` (run/adapter or run/checkpoint-*); "
                   "without it the base model answers.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help='JSON lines file to write, one {"id", "answer"} per video.')
@click.option("--ids", default=None, help="Answer for these videos (comma-separated ids).")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Answer for the records of this file (any --format); each record's turns before its "
                   "first answer are its prompt.")
@data_file_options
@click.option("--prompt", default=None,
              help="The question to ask about every video (default: the recipe's dense-captioning prompt, "
                   "or the --data records' own turns).")
@click.option("--grounding", is_flag=True,
              help="Ask where each true sentence of --data happens (a Charades-STA, ActivityNet or "
                   "LongVALE annotation dict, or a qprep data file): one answer per sentence, id "
                   "{video_id}#{i}, which `qprep eval` scores as grounding. --prompt is then the "
                   "question's template, {sentence} standing for the sentence.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True,
              help="Longest answer, in tokens.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Where the model runs (default: cuda when present).")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help="Model dtype (default: bfloat16 on cuda, float32 on cpu).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def infer(cache_path, model, adapter, out, ids, data, data_format, media_dir, times, annotations_as, grounding_prompt,
          prompt, grounding, max_new_tokens, device, dtype, as_json, quiet):
    """Answer from a cache with the base model and a trained adapter: no tower loaded, no video decoded.

    Every video extracted ok is asked the recipe's dense-captioning question ("Could you detail
    events during different time segments? ...") unless --ids, --data or --prompt say otherwise.
    Decoding is greedy; the answers go to --out as JSON lines.

    \b
    Examples:
      qprep infer --cache clips.zarr --adapter run/adapter --out answers.jsonl
      qprep infer --cache clips.zarr --adapter run/adapter --data test.json --out answers.jsonl
      qprep infer --cache clips.zarr --ids talk/a --prompt "What happens first?" --out a.jsonl
      qprep infer --cache charades.zarr --adapter run/adapter --data charades_test.json --grounding --out g.jsonl
    """
    import json

    from qprep.train.infer import infer as run_infer

    with _errors_to_exit_codes():
        summary = run_infer(cache_path, model, out, adapter=adapter,
                            ids=[i.strip() for i in ids.split(",") if i.strip()] if ids else None,
                            data=data and _data_file(data, data_format, media_dir, times, annotations_as,
                                                     grounding_prompt),
                            prompt=prompt, max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                            grounding=grounding, progress=not quiet, echo=(lambda line: click.echo(line, err=True)))
    if as_json:
        click.echo(json.dumps({**summary.__dict__, "out": str(out)}, indent=2))
    else:
        click.echo(f"{summary.answers} answers ({summary.new_tokens} tokens) in {summary.seconds:.1f} s → {out}")


@main.command("eval")
@click.option("--answers", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSON lines of {"id", "answer"}, as `qprep infer` writes them.')
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The truth: an annotation dict as LongVALE, Charades-STA and ActivityNet publish it "
                   "({video_id: {duration, timestamps, sentences}}), or a data file in any format --format "
                   "names (each record's first assistant turn; LongVALE's <s0>/<e0> as seconds).")
@click.option("--format", "data_format", type=click.Choice(FORMATS), default=None,
              help="The --data file's format (default: detected from its content).")
@click.option("--units", type=click.Choice(["seconds", "relative"]), default="seconds", show_default=True,
              help="The answers' times: seconds, or LongVALE's relative units (hundredths of the video's "
                   "duration, as LongVALE's evaluator reads them).")
@click.option("--task", type=click.Choice(["auto", "captioning", "grounding"]), default="auto", show_default=True,
              help="What to score: answers keyed by a video's id are dense captions, those keyed "
                   "{video_id}#{i} ground the video's i-th sentence; auto scores what the answers hold.")
@click.option("--per-video", is_flag=True, help="Also a row per video (and per grounding query).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw the true and predicted segments of the first --plot-videos videos to this PNG.")
@click.option("--plot-videos", type=click.IntRange(1), default=6, show_default=True,
              help="How many videos the picture shows.")
@click.option("--no-captions", is_flag=True, help="Temporal metrics only (no BLEU-4, CIDEr, METEOR, SODA_c).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (with every video).")
def evaluate(answers, data, data_format, units, task, per_video, plot, plot_videos, no_captions, as_json):
    """Score timed event captions ("From 0 to 4.5, a man talks. ...") and grounding answers against
    the true segments.

    Each answer is parsed into (start, end, caption) segments, leniently ("From 0.0s to 4.5s:",
    "0 - 4.5 seconds", "[0, 4.5]", reversed ranges, several on a line) and with every line it
    could not read listed. Then, as the ActivityNet dense-captioning evaluator computes them:
    precision, recall and F1 at tIoU 0.3 / 0.5 / 0.7 / 0.9 and their mean, and BLEU-4, CIDEr and
    METEOR (pycocoevalcap; METEOR and the PTB tokenizer need Java) of the matched captions; SODA_c
    (fujiso/SODA's, with METEOR); also the mean best tIoU per true segment. Grounding answers (ids
    {video_id}#{i}, the first range of each): R1@0.3, R1@0.5, R1@0.7 and mIoU. A missing, empty or
    duplicate answer, or a line that is not JSON, is reported with its file and line; the rest is
    scored.

    \b
    Examples:
      qprep eval --answers answers.jsonl --data test.json
      qprep eval --answers answers.jsonl --data test.json --per-video --plot eval.png
      qprep eval --answers answers.jsonl --data test.json --json > scores.json
      qprep eval --answers grounding.jsonl --data charades_test.json
      qprep eval --answers answers.jsonl --data longvale-annotations-eval.json --units relative
    """
    from qprep.eval.report import format_report, plot_timelines
    from qprep.eval.score import evaluate as score

    with _errors_to_exit_codes():
        report = score(answers, data, captions=not no_captions, units=units, task=task, format=data_format)
    if as_json:
        click.echo(metrics_json(report.to_dict(), indent=2, warn=_warn))
    else:
        click.echo(format_report(report, per_video=per_video))
    if plot:
        click.echo(f"picture of {min(plot_videos, len(report.videos))} videos → {plot_timelines(report, plot, plot_videos)}",
                   err=as_json)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The PNG to write.")
def plot(runs, out):
    """Draw several training RUNS' curves on one figure: each run's smoothed loss and validation
    loss, and their learning rates, against the batches trained.

    \b
    Examples:
      qprep plot run-a/ run-b/ --out compare.png
      qprep plot runs/* --out all.png
    """
    from qprep.train.plot import plot_runs

    with _errors_to_exit_codes():
        click.echo(f"{len(runs)} runs → {plot_runs(list(runs), out)}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print every preset's settings as JSON.")
def jobs(as_json):
    """List the named presets that --job accepts.

    A TOML file can build on one (`preset = "seed-omni-100f"`, then its own [video] / [train]
    tables); flags override both.

    \b
    Examples:
      qprep jobs
      qprep extract --videos clips/ --out clips.zarr --job seed-omni-100f
    """
    import json

    from qprep.schemas.jobs import available_jobs, load_job

    presets = [load_job(name) for name in available_jobs()]
    if as_json:
        click.echo(json.dumps([{"name": j.name, "version": j.version, "model": j.model, "video": j.video,
                                "train": j.train} for j in presets], indent=2))
        return
    for job in presets:
        video = ", ".join(f"{k}={v}" for k, v in job.video.items())
        train = ", ".join(f"{k}={v}" for k, v in job.train.items() if k != "lora_targets")
        click.echo(f"{job.name:<18} v{job.version}  model={job.model or '-'}\n    video: {video}"
                   + (f"\n    train: {train}" if train else ""))


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where to write videos and outputs (default: a temporary folder, removed after).")
@click.option("--videos", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Use these videos instead of generated ones.")
@click.option("--model", default=None, help="Model directory or hub id (default: built-in Qwen defaults).")
@click.option("--job", default="seed-omni-100f", show_default=True, help="Preset to run.")
@click.option("--keep", is_flag=True, help="Keep the work folder.")
def demo(workdir, videos, model, job, keep):
    """Run the whole job on generated videos: the quickest way to see qprep work.

    \b
    Examples:
      qprep demo
      qprep demo --videos ~/clips --model ./Qwen2.5-Omni-3B --keep
    """
    from qprep.demo import run_demo

    with _errors_to_exit_codes():
        run_demo(workdir=workdir, videos=videos, model=model, job=job, keep=keep, echo=click.echo)


class _errors_to_exit_codes:
    """Turn qprep's typed errors into a one-line message and a stable exit code."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, SettingsError):
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_SETTINGS)
        if isinstance(error, VideoError):
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_VIDEO)
        if isinstance(error, RankFailed):
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_RANK)
        return False


if __name__ == "__main__":
    main()
