"""`qprep eval` / `qprep.evaluate`: answers (`qprep infer`'s JSON lines) scored against a data file.

The true segments come from the data file: LongVALE-style records (`{"id", "conversations"}`, the
first assistant turn parsed as the answers are) or ActivityNet-style ones (`timestamps` and
`sentences`, a list of records with an `id` or a dict keyed by id). Every video of the data is
scored; one without an answer scores 0 and is listed. Bad input never stops the rest: a line that
is not JSON, one without an id or answer, a duplicate id (the first answer counts), an empty
answer and an answer for an id the data lacks are each reported with the file and line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qprep.errors import SettingsError
from qprep.eval import temporal
from qprep.eval.segments import ParsedAnswer, Segment, parse_answer


@dataclass
class VideoResult:
    id: str
    truth: list[Segment]
    predicted: list[Segment]
    answered: bool
    unparsed: list[str] = field(default_factory=list)
    reversed: int = 0
    precision: dict[float, float] = field(default_factory=dict)  # tIoU → value
    recall: dict[float, float] = field(default_factory=dict)
    captions: dict[str, dict[float, float]] = field(default_factory=dict)  # metric → tIoU → value
    best_tiou: float = 0.0


@dataclass
class EvalReport:
    answers: str
    data: str
    tious: tuple[float, ...]
    videos: list[VideoResult]
    precision: dict[float, float]
    recall: dict[float, float]
    f1: dict[float, float]
    captions: dict[str, dict[float, float]]  # metric → tIoU → mean over videos
    best_tiou: float
    problems: list[str]  # file:line: what was wrong
    notes: list[str]  # what was left out or how it was computed
    tokenizer: str = ""

    def mean(self, values: dict[float, float]) -> float:
        return sum(values[t] for t in self.tious) / len(self.tious)

    def to_dict(self, per_video: bool = True) -> dict:
        def by_tiou(values):
            return {**{f"{t:g}": v for t, v in values.items()}, "mean": self.mean(values)}

        out = {"answers": self.answers, "data": self.data, "videos": len(self.videos),
               "answered": sum(v.answered for v in self.videos), "tious": list(self.tious),
               "precision": by_tiou(self.precision), "recall": by_tiou(self.recall), "f1": by_tiou(self.f1),
               "captions": {name: by_tiou(values) for name, values in self.captions.items()},
               "mean_best_tiou": self.best_tiou, "problems": self.problems, "notes": self.notes,
               "tokenizer": self.tokenizer}
        if per_video:
            out["per_video"] = [{
                "id": v.id, "answered": v.answered, "true_segments": len(v.truth), "predicted_segments": len(v.predicted),
                "unparsed_lines": v.unparsed, "reversed_ranges": v.reversed,
                "precision": {f"{t:g}": x for t, x in v.precision.items()},
                "recall": {f"{t:g}": x for t, x in v.recall.items()},
                "captions": {name: {f"{t:g}": x for t, x in values.items()} for name, values in v.captions.items()},
                "mean_best_tiou": v.best_tiou,
                "truth": [asdict(s) for s in v.truth], "predicted": [asdict(s) for s in v.predicted]}
                for v in self.videos]
        return out


def evaluate(answers: str | Path, data: str | Path, *, tious: tuple[float, ...] = temporal.TIOUS,
             captions: bool = True, meteor: bool | None = None) -> EvalReport:
    """Score `answers` (JSON lines `{"id", "answer"}`) against the true segments of `data`.

    `captions`: also BLEU-4, CIDEr and METEOR (pycocoevalcap; METEOR when a Java runtime is there,
    or as `meteor` says)."""
    problems: list[str] = []
    truth = load_truth(data, problems)
    given = load_answers(answers, problems)
    for video_id, (line, _) in given.items():
        if video_id not in truth:
            problems.append(f"{answers}:{line}: id {video_id!r} is not in {data}; not scored")
    videos = []
    for video_id, segments in truth.items():
        line, text = given.get(video_id, (None, None))
        if line is None:
            problems.append(f"{answers}: no answer for {video_id!r} (scored 0)")
        elif not text.strip():
            problems.append(f"{answers}:{line}: the answer for {video_id!r} is empty (scored 0)")
        parsed = parse_answer(text) if text else ParsedAnswer()
        if text and text.strip() and parsed.empty:
            problems.append(f"{answers}:{line}: no time range in the answer for {video_id!r} (scored 0)")
        videos.append(_score_video(video_id, segments, parsed, answered=line is not None, tious=tious))
    notes: list[str] = []
    report = EvalReport(answers=str(answers), data=str(data), tious=tuple(tious), videos=videos,
                        precision={t: _mean([v.precision[t] for v in videos]) for t in tious},
                        recall={t: _mean([v.recall[t] for v in videos]) for t in tious}, f1={}, captions={},
                        best_tiou=_mean([v.best_tiou for v in videos]), problems=problems, notes=notes)
    report.f1 = {t: temporal.f1(report.precision[t], report.recall[t]) for t in tious}
    if captions and videos:
        _score_captions(report, meteor)
    return report


def _score_video(video_id, truth, parsed: ParsedAnswer, answered: bool, tious) -> VideoResult:
    result = VideoResult(id=video_id, truth=truth, predicted=parsed.segments, answered=answered,
                         unparsed=parsed.unparsed, reversed=parsed.reversed)
    for t in tious:
        result.precision[t], result.recall[t] = temporal.precision_recall(parsed.segments, truth, t)
    result.best_tiou = _mean(temporal.best_tious(parsed.segments, truth)) if truth else 0.0
    return result


def _score_captions(report: EvalReport, meteor: bool | None) -> None:
    from qprep.eval.captions import NO_MATCH, CaptionScorer, ascii_only, tokenize

    scorer = CaptionScorer(meteor=meteor)
    report.notes.extend(scorer.notes)
    texts = [ascii_only(s.text) for v in report.videos for s in v.truth + v.predicted] + [NO_MATCH]
    tokens, report.tokenizer = tokenize(texts)
    for video in report.videos:
        video.captions = {name: {} for name in scorer.metrics}
        for t in report.tious:
            pairs = [(tokens[ascii_only(p)], tokens[ascii_only(q)]) for p, q in caption_pairs(video, t)]
            for name, value in scorer.score(pairs).items():
                video.captions[name][t] = value
    report.captions = {name: {t: _mean([v.captions[name][t] for v in report.videos]) for t in report.tious}
                       for name in scorer.metrics}


def caption_pairs(video: VideoResult, threshold: float) -> list[tuple[str, str]]:
    """(predicted caption, true caption) pairs at one threshold, the evaluator's way."""
    from qprep.eval.captions import NO_MATCH

    pairs = []
    for pred in video.predicted:
        matched = [true.text for true in video.truth if temporal.tiou(pred, true) >= threshold]
        pairs += [(pred.text, text) for text in matched] or [(pred.text, NO_MATCH)]
    return pairs


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def load_answers(path: str | Path, problems: list[str]) -> dict[str, tuple[int, str]]:
    """id → (line number, answer text), from JSON lines; bad lines go to `problems`."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise SettingsError(f"--answers {path}: cannot read it ({exc.strerror or exc})") from exc
    out: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not a JSON line ({exc.msg})")
            continue
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("answer"), str):
            problems.append(f"{path}:{number}: expected {{\"id\": ..., \"answer\": \"...\"}}")
            continue
        video_id = str(record["id"])
        if video_id in out:
            problems.append(f"{path}:{number}: id {video_id!r} again (line {out[video_id][0]} counts)")
            continue
        out[video_id] = (number, record["answer"])
    if not out and lines:
        raise SettingsError(f"--answers {path}: no usable answer line ({len(problems)} problems: "
                            f"{problems[0] if problems else 'empty'}); expected JSON lines of {{\"id\", \"answer\"}}")
    return out


def load_truth(path: str | Path, problems: list[str]) -> dict[str, list[Segment]]:
    """id → true segments, from LongVALE- or ActivityNet-style records."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SettingsError(f"--data {path}: cannot read it as JSON ({exc})") from exc
    if isinstance(data, dict):
        data = [{"id": key, **value} for key, value in data.items() if isinstance(value, dict)]
    if not isinstance(data, list):
        raise SettingsError(f"--data {path}: expected a JSON list of records (or a dict keyed by id)")
    truth: dict[str, list[Segment]] = {}
    for index, record in enumerate(data):
        where = f"{path}: record {index}"
        if not isinstance(record, dict) or "id" not in record:
            problems.append(f"{where}: no id; not scored")
            continue
        segments = _true_segments(record)
        if segments is None:
            problems.append(f"{where} ({record['id']!r}): neither an answer with time ranges nor "
                            "timestamps + sentences; not scored")
            continue
        if str(record["id"]) in truth:
            problems.append(f"{where}: id {record['id']!r} again (the first record counts)")
            continue
        truth[str(record["id"])] = segments
    if not truth:
        raise SettingsError(f"--data {path}: no record with true segments to score against")
    return truth


def _true_segments(record: dict) -> list[Segment] | None:
    if isinstance(record.get("timestamps"), list) and isinstance(record.get("sentences"), list):
        return [Segment(*sorted((float(a), float(b))), str(text))
                for (a, b), text in zip(record["timestamps"], record["sentences"])]
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") in ("gpt", "assistant"):
            segments = parse_answer(str(turn.get("value", ""))).segments
            return segments or None
    return None
