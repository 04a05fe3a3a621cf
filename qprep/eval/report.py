"""The eval report as a table, and the timeline picture: true and predicted segments of a few
videos with their captions, so that a person sees at a glance what the model gets wrong."""

from __future__ import annotations

from pathlib import Path

from qprep.eval.score import EvalReport

PANEL_HEIGHT, WIDTH, MARGIN = 150, 1100, 70
TRUE_COLOUR, PREDICTED_COLOUR = (60, 150, 80), (50, 90, 190)


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


def plot_timelines(report: EvalReport, out: str | Path, videos: int = 6) -> Path:
    """A PNG of the first `videos` videos: true segments (green) above the predicted ones (blue),
    on each video's time axis, captions written in the bars."""
    from PIL import Image, ImageDraw, ImageFont

    chosen = report.videos[:videos]
    image = Image.new("RGB", (WIDTH, max(1, len(chosen)) * PANEL_HEIGHT + 10), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for row, video in enumerate(chosen):
        top = row * PANEL_HEIGHT + 10
        end = max([s.end for s in video.truth + video.predicted] + [1e-9])
        left, right = MARGIN, WIDTH - 20
        scale = (right - left) / end
        p5 = video.precision.get(0.5)
        draw.text((8, top), f"{video.id}" + (f"   P@0.5 {p5:.2f}  R@0.5 {video.recall[0.5]:.2f}  best tIoU "
                                             f"{video.best_tiou:.2f}" if p5 is not None else ""), fill="black", font=font)
        for lane, (name, segments, colour) in enumerate((("true", video.truth, TRUE_COLOUR),
                                                         ("predicted", video.predicted, PREDICTED_COLOUR))):
            y = top + 22 + lane * 48
            draw.text((8, y + 12), name if segments else f"{name}: none", fill="black", font=font)
            for index, segment in enumerate(segments):
                x0, x1 = left + segment.start * scale, max(left + segment.end * scale, left + segment.start * scale + 2)
                offset = (index % 2) * 20  # alternate heights, so that neighbours' captions do not overlap
                draw.rectangle((x0, y + offset, x1, y + offset + 16), fill=colour, outline="white")
                draw.text((x0 + 2, y + offset + 3), segment.text[: max(0, int((x1 - x0) / 6))], fill="white", font=font)
        axis = top + 22 + 2 * 48 + 4
        draw.line((left, axis, right, axis), fill="grey")
        for tick in range(6):
            x = left + (right - left) * tick / 5
            draw.text((x - 10, axis + 3), f"{end * tick / 5:.1f}s", fill="grey", font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
