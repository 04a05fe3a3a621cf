"""`qprep demo`: the whole job on generated inputs, on any machine, in a minute or two.

Makes a handful of short videos with speech-like audio and visible events at known times (a red
disc and a tone burst), a tiny Qwen2.5-Omni checkpoint (random weights, real structure and key
layout), and a LongVALE-style training file whose answers say when the events happen; then runs
`extract` through Ray, `status`, `train` from the store until the tiny model has learnt its five
answers by heart, `infer` with the adapter, `eval` of its answers against that same training file
(overfitting a handful of samples is the usual check that a pipeline can learn at all) and an
`extract` re-run that finds nothing to do, and prints where everything went and what each step took.
`--videos` and `--model` run the same steps on one's own inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from qprep.synth import VideoSpec, make_video

DEMO_VIDEOS = {  # short clips in the shapes real datasets have
    "landscape-30fps.mp4": VideoSpec(width=480, height=270, fps=30, seconds=8, events=((2.0, 3.5),)),
    "portrait-25fps.mp4": VideoSpec(width=270, height=480, fps=25, seconds=6, events=((1.0, 2.0), (4.0, 5.0))),
    "phone-rotated.mp4": VideoSpec(width=480, height=272, fps=30, seconds=5, rotation=90, events=((0.5, 1.5),)),
    "silent-24fps.mp4": VideoSpec(width=320, height=240, fps=24, seconds=7, audio=False, events=((3.0, 6.0),)),
    "short-b-frames.mp4": VideoSpec(width=320, height=180, fps=30, seconds=4, bframes=2, events=((1.0, 3.0),)),
}
DEMO_FRAMES = 16  # the clips are seconds long: the preset's 100 frames would mostly repeat
# Long enough, on the preset's LoRA, for the random tiny model to reproduce its five training answers
# (about half a minute on 2 cores): one sample per step, a learning rate a real model would not take.
DEMO_TRAIN = dict(epochs=50, lr=1e-2, grad_accum=1)
DEMO_ANSWER_TOKENS = 80  # the longest answer (two events) is 67 of the tiny tokenizer's tokens


@dataclass
class DemoResult:
    workdir: Path
    videos: Path
    model: str
    store: Path
    data: Path
    run: Path
    first_extract: object = None  # qprep.extraction.run.Summary
    re_run: object = None
    training: object = None  # qprep.train.loop.TrainSummary
    evaluation: object = None  # qprep.eval.score.EvalReport
    seconds: dict[str, float] = field(default_factory=dict)  # step → wall seconds


def run_demo(workdir: Path | None = None, videos: Path | None = None, model: str | None = None,
             job: str = "seed-omni-100f", keep: bool = False, echo=print) -> DemoResult:
    """Run every step on generated (or the given) videos and model; returns what each step made."""
    owned = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="qprep-demo-"))
    if not model:  # transformers validates the tiny config's sub-configs against its 8k vocabulary before
        # applying the saved token ids, and warns about its own defaults; real checkpoints do not
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # (Ray's local workers inherit it)
    result = DemoResult(workdir=workdir, videos=Path(videos) if videos else workdir / "videos", model=model or "",
                        store=workdir / "store.zarr", data=workdir / "train.json", run=workdir / "run")
    try:
        _steps(result, job, echo)
        echo(_report(result))
        return result
    finally:
        if owned and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif owned:
            echo(f"kept {workdir}")


def _steps(result: DemoResult, job: str, echo) -> None:
    from qprep.eval.report import format_report, plot_timelines
    from qprep.eval.score import evaluate
    from qprep.extraction.run import extract, format_summary
    from qprep.models.tiny import DEMO_KIND, make_tiny_model
    from qprep.schemas.jobs import load_job
    from qprep.store.status import format_status, store_status
    from qprep.train.infer import infer
    from qprep.train.loop import train
    from qprep.train.run_folder import RunFolder

    preset = load_job(job)
    settings = preset.video_settings(num_frames=DEMO_FRAMES)
    with _timed(result, "make videos", echo):
        if not result.videos.exists():
            for name, spec in DEMO_VIDEOS.items():
                make_video(result.videos / name, spec)
    with _timed(result, "make a tiny model", echo):
        if not result.model:
            result.model = str(make_tiny_model(DEMO_KIND, result.workdir / f"tiny-{DEMO_KIND}"))
    echo(f"\n$ qprep extract --videos {result.videos} --out {result.store} --model {result.model} "
         f"--job {preset.name} --num-frames {DEMO_FRAMES}")
    with _timed(result, "extract", echo):
        result.first_extract = extract(result.videos, result.store, result.model, settings, shards=8)
    echo(format_summary(result.first_extract, result.store))
    echo(f"\n$ qprep status {result.store}")
    with _timed(result, "status", echo):
        echo(format_status(store_status(result.store)))
    write_demo_data(result.data, result.store)
    flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in DEMO_TRAIN.items())
    echo(f"\n$ qprep train --cache {result.store} --data {result.data} --model {result.model} --out {result.run} "
         f"--job {preset.name} {flags} --report-to none")
    with _timed(result, "train", echo):
        result.training = train(result.store, result.data, result.model, result.run,
                                preset.train_settings(**DEMO_TRAIN, report_to="none"), echo=echo)
    training = result.training
    echo(f"{training.steps} optimizer steps from the cache (no tower loaded, no video decoded): loss "
         f"{training.first_loss:.3f} → {training.last_loss:.3f}; the curves: {RunFolder(result.run).loss_plot}")
    answers = result.workdir / "answers.jsonl"
    echo(f"\n$ qprep infer --cache {result.store} --adapter {RunFolder(result.run).adapter} --data {result.data} "
         f"--max-new-tokens {DEMO_ANSWER_TOKENS} --out {answers}")
    with _timed(result, "infer", echo):
        infer(result.store, result.model, answers, adapter=RunFolder(result.run).adapter, data=result.data,
              max_new_tokens=DEMO_ANSWER_TOKENS, progress=False, echo=echo)
    echo(f"{answers.read_text().splitlines()[0]}   (the tiny model repeats the answer it was trained on)")
    picture = result.workdir / "eval.png"
    echo(f"\n$ qprep eval --answers {answers} --data {result.data} --plot {picture}")
    with _timed(result, "eval", echo):
        result.evaluation = evaluate(answers, result.data)
        echo(format_report(result.evaluation))
        shown = min(6, len(result.evaluation.videos))
        echo(f"picture of {shown} videos → {plot_timelines(result.evaluation, picture)}")
        echo("scored on its own training set: the tiny model learnt these five answers by heart, which shows "
             "that the pipeline learns, and says nothing of how well a model answers videos it has not seen")
    echo("\n$ qprep extract ... (again: nothing changed, so nothing is decoded and Ray does not start)")
    with _timed(result, "extract again", echo):
        result.re_run = extract(result.videos, result.store, result.model, settings)
    echo(format_summary(result.re_run, result.store))


def write_demo_data(path: Path, store: Path) -> Path:
    """One dense-captioning conversation per cached video, in the LongVALE form the trainer reads.
    Generated clips are described by their known events; other videos by their duration."""
    from qprep.store.reader import open_cache
    from qprep.train.infer import DENSE_CAPTION_PROMPT

    cache = open_cache(store)
    records = []
    for video_id in cache.ids():
        row = cache.row(video_id)
        spec = DEMO_VIDEOS.get(row.path)
        events = spec.events if spec else ((0.0, round(row.duration or 0.0, 1)),)
        answer = " ".join(f"From {start:.1f} to {end:.1f}, {'a red disc appears' if spec else 'the video plays'}."
                          for start, end in events)
        records.append({"id": video_id, "conversations": [
            {"from": "human", "value": f"<video>\n{DENSE_CAPTION_PROMPT}"}, {"from": "gpt", "value": answer}]})
    path.write_text(json.dumps(records, indent=1))
    return path


class _timed:
    def __init__(self, result: DemoResult, step: str, echo):
        self.result, self.step, self.echo = result, step, echo

    def __enter__(self):
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        self.result.seconds[self.step] = time.perf_counter() - self.started


def _report(result: DemoResult) -> str:
    from qprep.train.run_folder import RunFolder

    run = RunFolder(result.run)
    lines = ["", "what each step took:"]
    lines += [f"  {step:<20} {seconds:6.1f} s" for step, seconds in result.seconds.items()]
    lines += [f"  {'total':<20} {sum(result.seconds.values()):6.1f} s", "", "where everything went:"]
    places = [("videos", result.videos), ("tiny model", result.model), ("store (Zarr + Parquet)", result.store),
              ("training data", result.data), ("adapter (peft format)", run.adapter),
              ("metrics, loss curve", f"{run.metrics}, {run.loss_plot}"),
              ("effective settings", run.run_file), ("answers", result.workdir / "answers.jsonl"),
              ("scores' picture", result.workdir / "eval.png")]
    lines += [f"  {name:<24} {place}" for name, place in places]
    return "\n".join(lines)
