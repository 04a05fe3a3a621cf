"""`qprep demo`: the whole job on generated inputs, on any machine, in a minute or two.

Makes a handful of short videos with speech-like audio and visible events at known times and a
tiny Qwen2.5-Omni checkpoint (random weights, real structure), then runs every stage that exists on
them: the CPU stage video by video, `extract` into a store, a no-op re-run, the store's status, and
LoRA training from the store on a question about each video.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qprep.extraction.run import extract, format_summary
from qprep.models.tiny import make_tiny_model
from qprep.pipeline.prepare import prepare
from qprep.schemas.jobs import load_job
from qprep.schemas.settings import load_model_spec
from qprep.store.status import format_status, store_status
from qprep.schemas.training import TrainSettings
from qprep.train.loop import train
from qprep.synth import VideoSpec, make_video

# (name, spec, events): short clips in the shapes real datasets have.
DEMO_VIDEOS = {
    "landscape-30fps.mp4": VideoSpec(width=480, height=270, fps=30, seconds=8, events=((2.0, 3.5),)),
    "portrait-25fps.mp4": VideoSpec(width=270, height=480, fps=25, seconds=6, events=((1.0, 2.0), (4.0, 5.0))),
    "phone-rotated.mp4": VideoSpec(width=480, height=272, fps=30, seconds=5, rotation=90, events=((0.5, 1.5),)),
    "silent-24fps.mp4": VideoSpec(width=320, height=240, fps=24, seconds=7, audio=False, events=((3.0, 6.0),)),
}


@dataclass
class DemoResult:
    workdir: Path
    rows: list[dict]


def write_demo_data(path: Path, video_dir: Path) -> Path:
    """One conversation per video, in the LongVALE form the trainer reads: when is the red disc shown?"""
    records = []
    for video in sorted(p for p in video_dir.iterdir() if p.is_file()):
        spec = DEMO_VIDEOS.get(video.name)
        events = spec.events if spec else ()
        answer = "; ".join(f"from {start:.1f} s to {end:.1f} s" for start, end in events) or "never"
        records.append({"id": video.stem, "conversations": [
            {"from": "human", "value": "<video>\nWhen is the red disc shown?"}, {"from": "gpt", "value": answer}]})
    path.write_text(json.dumps(records, indent=1))
    return path


def make_demo_videos(folder: Path) -> list[Path]:
    return [make_video(folder / name, spec) for name, spec in DEMO_VIDEOS.items()]


def run_demo(workdir: Path | None = None, videos: Path | None = None, model: str | None = None,
             job: str = "seed-omni-100f", keep: bool = False, echo=print) -> DemoResult:
    """Generate videos (unless `videos` is given) and run the CPU stage on each with `job`."""
    owned = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="qprep-demo-"))
    try:
        started = time.perf_counter()
        if videos is None:
            paths = make_demo_videos(workdir / "videos")
            echo(f"made {len(paths)} videos in {workdir / 'videos'} ({time.perf_counter() - started:.1f} s)")
        else:
            paths = sorted(p for p in Path(videos).iterdir() if p.is_file())
        preset = load_job(job)
        settings = preset.video_settings(num_frames=16)  # the demo clips are seconds long
        if model is None:
            model = str(make_tiny_model("qwen2_5_omni", workdir / "tiny-qwen2.5-omni"))
            echo(f"made a tiny random Qwen2.5-Omni checkpoint in {model}")
        spec = load_model_spec(model)
        rows = []
        for path in paths:
            t0 = time.perf_counter()
            prepared = prepare(path, settings, spec)
            grid = prepared.video_grid_thw[0].tolist()
            rows.append({"video": path.name, "grid_thw": grid, "second_per_grid": prepared.second_per_grid,
                         "mel": prepared.mel_length, "seconds": time.perf_counter() - t0})
            echo(f"  {path.name:<22} grid_thw {grid}  second_per_grid {prepared.second_per_grid:.3f}  "
                 f"mel {prepared.mel_length:>5}  {rows[-1]['seconds']:.2f} s")
        echo(f"prepared {len(rows)} videos with job {preset.name} in {time.perf_counter() - started:.1f} s")
        video_dir = Path(videos) if videos is not None else workdir / "videos"
        store = workdir / "store.zarr"
        echo(f"\nqprep extract --videos {video_dir} --out {store} --model {model}")
        echo(format_summary(extract(video_dir, store, model, settings, shards=8), store))
        echo("\nthe same again (nothing changed, so nothing is decoded):")
        echo(format_summary(extract(video_dir, store, model, settings), store))
        echo(f"\nqprep status {store}")
        echo(format_status(store_status(store)))
        data = write_demo_data(workdir / "train.json", video_dir)
        echo(f"\nqprep train --cache {store} --data {data} --model {model} --out {workdir / 'run'}")
        summary = train(store, data, model, workdir / "run", TrainSettings(epochs=2, lr=1e-3), echo=echo)
        echo(f"{summary.steps} optimizer steps from the cache (no tower loaded, no video decoded): loss "
             f"{summary.first_loss:.3f} → {summary.last_loss:.3f} in {summary.seconds:.1f} s; "
             f"adapter in {workdir / 'run' / 'adapter'}")
        return DemoResult(workdir=workdir, rows=rows)
    finally:
        if owned and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif keep:
            echo(f"kept {workdir}")
