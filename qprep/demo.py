"""`qprep demo`: the whole job on generated inputs, on any machine, in a minute or two.

Makes a handful of short videos with speech-like audio and visible events at known times (a red
disc and a tone burst), a tiny Qwen2.5-Omni checkpoint (random weights, real structure and key
layout), and a training set as LLaMA-Factory publishes its own (a sharegpt file named by a
`dataset_info.json`, media paths under a media folder): per video a dense-captioning question
answered "From s to e, ..." and a grounding question answered "From s to e."; then runs `extract
--data` (exactly the videos the set names), `status`, `train` from the store until the tiny model
has learnt its answers by heart, `infer` with the adapter, `eval` of its answers against that same
file (dense-captioning metrics and R1@m / mIoU; overfitting a handful of samples is the usual check
that a pipeline can learn at all) and an `extract` re-run that finds nothing to do, and prints
where everything went and what each step took. `--videos` and `--model` run the same steps on
one's own inputs.
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
# Long enough, on the preset's LoRA, for the random tiny model to reproduce its ten training answers
# (about 45 s on 2 cores): two samples a step, each seen 50 times, a learning rate a real model would
# not take.
DEMO_TRAIN = dict(epochs=50, lr=1e-2, batch_size=2, grad_accum=1)
DEMO_EVENT = "a red disc appears"
# LLaMA-Factory's description of the set (its dataset_info.json), in the OpenAI message style
DATASET_INFO = {"qprep_demo": {"file_name": "demo.json", "formatting": "sharegpt",
                               "columns": {"messages": "messages", "videos": "videos"},
                               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                        "assistant_tag": "assistant"}}}
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
                        store=workdir / "store.zarr", data=workdir / "data" / "dataset_info.json", run=workdir / "run")
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
    from qprep.datasets import DataFile
    from qprep.datasets.inspect import inspect_data
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
    data = DataFile(write_demo_data(result.data.parent, result.videos), media_dir=result.videos)
    echo(f"\n$ qprep data {result.data} --media-dir {result.videos}")
    with _timed(result, "data", echo):
        echo("\n".join(inspect_data(data).lines()))
    echo(f"\n$ qprep extract --data {result.data} --media-dir {result.videos} --out {result.store} "
         f"--model {result.model} --job {preset.name} --num-frames {DEMO_FRAMES}")
    with _timed(result, "extract", echo):
        result.first_extract = extract(data, result.store, result.model, settings, shards=8)
    echo(format_summary(result.first_extract, result.store))
    echo(f"\n$ qprep status {result.store}")
    with _timed(result, "status", echo):
        echo(format_status(store_status(result.store)))
    flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in DEMO_TRAIN.items())
    echo(f"\n$ qprep train --cache {result.store} --data {result.data} --media-dir {result.videos} --model "
         f"{result.model} --out {result.run} --job {preset.name} {flags} --report-to none")
    with _timed(result, "train", echo):
        result.training = train(result.store, data, result.model, result.run,
                                preset.train_settings(**DEMO_TRAIN, report_to="none"), echo=echo)
    training = result.training
    echo(f"{training.steps} optimizer steps from the cache (no tower loaded, no video decoded): loss "
         f"{training.first_loss:.3f} → {training.last_loss:.3f}; the curves: {RunFolder(result.run).loss_plot}")
    answers = result.workdir / "answers.jsonl"
    echo(f"\n$ qprep infer --cache {result.store} --adapter {RunFolder(result.run).adapter} --data {result.data} "
         f"--media-dir {result.videos} --max-new-tokens {DEMO_ANSWER_TOKENS} --out {answers}")
    with _timed(result, "infer", echo):
        infer(result.store, result.model, answers, adapter=RunFolder(result.run).adapter, data=data,
              max_new_tokens=DEMO_ANSWER_TOKENS, progress=False, echo=echo)
    echo(f"{answers.read_text().splitlines()[0]}   (the tiny model repeats the answer it was trained on)")
    picture = result.workdir / "eval.png"
    echo(f"\n$ qprep eval --answers {answers} --data {result.data} --plot {picture}")
    with _timed(result, "eval", echo):
        result.evaluation = evaluate(answers, data)
        echo(format_report(result.evaluation))
        shown = min(6, len(result.evaluation.videos))
        echo(f"picture of {shown} videos → {plot_timelines(result.evaluation, picture)}")
        echo("scored on its own training set: the tiny model learnt these answers by heart, which shows "
             "that the pipeline learns, and says nothing of how well a model answers videos it has not seen")
    echo("\n$ qprep extract ... (again: nothing changed, so nothing is decoded and Ray does not start)")
    with _timed(result, "extract again", echo):
        result.re_run = extract(data, result.store, result.model, settings)
    echo(format_summary(result.re_run, result.store))


def write_demo_data(folder: Path, videos: Path) -> Path:
    """The demo's training set in LLaMA-Factory's layout: `folder/demo.json` (sharegpt records, video
    paths under `videos`) and the `folder/dataset_info.json` that names it; returns the latter.

    Per video two records: the recipe's dense-captioning question, answered with every event ("From
    s to e, a red disc appears. ..."), named by the video's id; and a grounding question about its
    first event, answered "From s to e.", named `{id}#0` (as a grounding dict's first sentence is).
    Generated clips are described by their known events; other videos by their probed duration."""
    from qprep.datasets.grounding import CAPTIONS_PROMPT, GROUNDING_PROMPT
    from qprep.extraction.discover import discover

    records = []
    for found in discover(videos, shard_count=1):  # the videos `extract --videos` would take, in id order
        name, video_id = found.path, found.id
        described = _events(videos / name, name)
        if described is None:
            continue  # not a video FFmpeg can read: nothing to ask about it
        events, event = described
        answer = " ".join(f"From {start:.1f} to {end:.1f}, {event}." for start, end in events)
        start, end = events[0]
        sentence = f"{event} for the first time" if len(events) > 1 else event
        for record_id, question, reply in ((video_id, CAPTIONS_PROMPT, answer),
                                           (f"{video_id}#0", GROUNDING_PROMPT.format(sentence=sentence),
                                            f"From {start:.1f} to {end:.1f}.")):
            records.append({"id": record_id, "messages": [{"role": "user", "content": f"<video>{question}"},
                                                         {"role": "assistant", "content": reply}],
                            "videos": [name]})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DATASET_INFO["qprep_demo"]["file_name"]).write_text(json.dumps(records, indent=1))
    (folder / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=1))
    return folder / "dataset_info.json"


def _events(video: Path, name: str) -> tuple[tuple, str] | None:
    """(its events in seconds, what happens in them); None for a file that cannot be probed."""
    from qprep.errors import VideoError
    from qprep.pipeline.probe import probe

    spec = DEMO_VIDEOS.get(name)
    if spec:
        return spec.events, DEMO_EVENT
    try:
        return ((0.0, round(probe(video).duration, 1)),), "the video plays"
    except VideoError:
        return None


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
