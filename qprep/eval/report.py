"""The eval report as a table, and the timeline picture: true and predicted segments of a few
videos with their captions, so that a person sees at a glance what the model gets wrong. The
picture is a matplotlib `Figure` (no pyplot, no display), rendered with Agg."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qprep.eval.score import EvalReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TRUE_COLOUR, PREDICTED_COLOUR = "tab:green", "tab:blue"


def format_report(report: EvalReport, per_video: bool = False) -> str:
    lines = []
    if "captioning" in report.tasks:
        lines += _captioning_lines(report, per_video)
    if report.grounding is not None:
        lines += ([""] if lines else []) + _grounding_lines(report, per_video)
    lines += [f"note: {note}" for note in report.notes]
    unparsed = [(v.id, line) for v in report.videos for line in v.unparsed]
    if unparsed:
        lines += ["", f"{len(unparsed)} answer lines hold no time range:"]
        lines += [f"  {video_id}: {line[:100]}" for video_id, line in unparsed[:20]]
        if len(unparsed) > 20:
            lines.append(f"  ... {len(unparsed) - 20} more (--json lists them all)")
    if report.problems:
        lines += ["", f"{len(report.problems)} problems in the input:"] + [f"  {p}" for p in report.problems]
    return "\n".join(lines)


def _captioning_lines(report: EvalReport, per_video: bool) -> list[str]:
    answered = sum(v.answered for v in report.videos)
    lines = [f"{len(report.videos)} videos in {report.data}, {answered} answered in {report.answers}"
             f"{_units(report)}", ""]
    header = "".join(f"{f'tIoU {t:g}':>10}" for t in report.tious) + f"{'mean':>10}"
    lines.append(f"{'':12}{header}")
    rows = [("precision", report.precision), ("recall", report.recall), ("F1", report.f1)]
    rows += list(report.captions.items())
    for name, values in rows:
        lines.append(f"{name:12}" + "".join(f"{values[t]:10.4f}" for t in report.tious) + f"{report.mean(values):10.4f}")
    lines.append(f"mean best tIoU per true segment: {report.best_tiou:.4f}")
    if report.soda is not None:
        lines.append(f"SODA_c: {report.soda.f1:.4f} (precision {report.soda.precision:.4f}, "
                     f"recall {report.soda.recall:.4f})")
    if report.tokenizer:
        lines.append(f"captions tokenized by {report.tokenizer}")
    if per_video:
        lines += ["", f"{'video':24}{'true':>6}{'pred':>6}{'P@0.5':>8}{'R@0.5':>8}{'best tIoU':>11}  unparsed lines"]
        for v in report.videos:
            p, r = v.precision.get(0.5, float("nan")), v.recall.get(0.5, float("nan"))
            lines.append(f"{v.id[:24]:24}{len(v.truth):6}{len(v.predicted):6}{p:8.3f}{r:8.3f}{v.best_tiou:11.3f}  "
                         f"{len(v.unparsed)}" + ("" if v.answered else "  (no answer)"))
    return lines


def _grounding_lines(report: EvalReport, per_query: bool) -> list[str]:
    grounding = report.grounding
    answered = sum(q.answered for q in grounding.queries)
    lines = [f"grounding: {len(grounding.queries)} queries in {report.data}, {answered} answered{_units(report)}"]
    lines.append("  ".join(f"{name} {value:.4f}" for name, value in grounding.metrics().items()))
    if per_query:
        lines += ["", f"{'query':28}{'true':>17}{'predicted':>17}{'IoU':>8}"]
        for q in grounding.queries:
            shown = f"{q.predicted.start:.1f}-{q.predicted.end:.1f}" if q.predicted else ("none" if q.answered else
                                                                                         "(no answer)")
            lines.append(f"{q.id[:28]:28}{f'{q.truth.start:.1f}-{q.truth.end:.1f}':>17}{shown:>17}{q.iou:8.3f}")
    return lines


def _units(report: EvalReport) -> str:
    return " (times in LongVALE's relative units)" if report.units == "relative" else ""


def timeline_figure(report: EvalReport, videos: int = 6) -> Figure:
    """The first `videos` videos, one panel each: the true segments (green) above the predicted ones
    (blue) on the video's time axis in seconds, each bar captioned; the panel's title gives its scores."""
    from matplotlib.figure import Figure  # here: `qprep eval` without --plot does without it

    chosen = report.videos[:videos]
    figure = Figure(figsize=(11, 0.5 + 1.9 * max(1, len(chosen))), layout="constrained")
    for axes, video in zip(figure.subplots(max(1, len(chosen)), 1, squeeze=False)[:, 0], chosen):
        end = max([s.end for s in video.truth + video.predicted] + [1e-9])
        for lane, (name, segments, colour) in enumerate((("predicted", video.predicted, PREDICTED_COLOUR),
                                                         ("true", video.truth, TRUE_COLOUR))):
            axes.broken_barh([(s.start, max(s.end - s.start, end / 400)) for s in segments], (lane - 0.35, 0.7),
                             facecolors=colour, edgecolors="white", label=name)
            for index, segment in enumerate(segments):
                # alternately above and below the bar's middle, so that neighbours' captions do not overlap
                axes.text(segment.start + end / 200, lane + (0.12 if index % 2 == 0 else -0.12), segment.text,
                          fontsize=8, color="white", va="center", clip_on=True)
            if not segments:
                axes.text(end / 200, lane, f"no {name} segment", fontsize=8, va="center")
        axes.set_xlim(0, end * 1.01)
        axes.set_ylim(-0.6, 1.6)
        axes.set_yticks([0, 1], ["predicted", "true"])
        axes.set_xlabel("seconds")
        p5 = video.precision.get(0.5)
        scores = (f"   P@0.5 {p5:.2f}  R@0.5 {video.recall[0.5]:.2f}  best tIoU {video.best_tiou:.2f}"
                  if p5 is not None else "")
        axes.set_title(f"{video.id}{scores}", loc="left", fontsize=10)
        axes.grid(axis="x", alpha=0.3)
    return figure


def plot_timelines(report: EvalReport, out: str | Path, videos: int = 6) -> Path:
    """The timeline picture (`timeline_figure`) as a PNG."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    timeline_figure(report, videos).savefig(out, dpi=100)
    return out
