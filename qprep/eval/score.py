"""`qprep eval` / `qprep.evaluate`: answers (`qprep infer`'s JSON lines) scored against a data file.

The true segments come from the data file, in any format `qprep.datasets` reads (`truth`:
annotation dicts as LongVALE, Charades-STA and ActivityNet publish them, and every training format).
An answer keyed by a video's id is scored as dense captioning (the evaluator's temporal and
caption metrics, and SODA_c); one keyed `{video_id}#{i}` as the grounding answer to that video's
i-th sentence, and one keyed by a grounding sample's name (a record answered "From s to e.") as
that sample's (R1@0.3/0.5/0.7, mIoU).
Answers are in seconds or in LongVALE's relative units. Every video (or query) of the data is
scored; one without an answer scores 0 and is listed. Bad input never stops the rest: a line that
is not JSON, one without an id or answer, a duplicate id (the first answer counts), an empty
answer and an answer for an id the data lacks are each reported with the file and line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qprep.errors import SettingsError
from qprep.eval import grounding, temporal
from qprep.eval.grounding import GroundingReport, QueryResult, answer_text, query_id, split_query_id
from qprep.eval.segments import ParsedAnswer, Segment, from_relative, parse_answer
from qprep.eval.soda import SodaResult, soda_c
from qprep.eval.truth import load_truth


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
    soda: SodaResult | None = None


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
    units: str = "seconds"
    tasks: tuple[str, ...] = ("captioning",)
    grounding: GroundingReport | None = None
    soda: SodaResult | None = None  # SODA_c: the mean of the videos' (with METEOR only)

    def mean(self, values: dict[float, float]) -> float:
        return sum(values[t] for t in self.tious) / len(self.tious)

    def to_dict(self, per_video: bool = True) -> dict:
        out = {"answers": self.answers, "data": self.data, "units": self.units, "tasks": list(self.tasks),
               "problems": self.problems, "notes": self.notes}
        if "captioning" in self.tasks:
            out.update(self._captioning_dict(per_video))
        if self.grounding is not None:
            out["grounding"] = self.grounding.to_dict(per_query=per_video)
        return out

    def _captioning_dict(self, per_video: bool) -> dict:
        def by_tiou(values):
            return {**{f"{t:g}": v for t, v in values.items()}, "mean": self.mean(values)}

        out = {"videos": len(self.videos), "answered": sum(v.answered for v in self.videos), "tious": list(self.tious),
               "precision": by_tiou(self.precision), "recall": by_tiou(self.recall), "f1": by_tiou(self.f1),
               "captions": {name: by_tiou(values) for name, values in self.captions.items()},
               "mean_best_tiou": self.best_tiou, "tokenizer": self.tokenizer}
        if self.soda is not None:  # SODA_c is the F-measure, as LongVALE reports it
            out.update({"SODA_c": self.soda.f1, "SODA_c_precision": self.soda.precision,
                        "SODA_c_recall": self.soda.recall})
        if per_video:
            out["per_video"] = [{
                "id": v.id, "answered": v.answered, "true_segments": len(v.truth), "predicted_segments": len(v.predicted),
                "unparsed_lines": v.unparsed, "reversed_ranges": v.reversed,
                "precision": {f"{t:g}": x for t, x in v.precision.items()},
                "recall": {f"{t:g}": x for t, x in v.recall.items()},
                "captions": {name: {f"{t:g}": x for t, x in values.items()} for name, values in v.captions.items()},
                "mean_best_tiou": v.best_tiou, **({"SODA_c": v.soda.f1} if v.soda else {}),
                "truth": [asdict(s) for s in v.truth], "predicted": [asdict(s) for s in v.predicted]}
                for v in self.videos]
        return out


TASKS = ("auto", "captioning", "grounding")
UNITS = ("seconds", "relative")


def evaluate(answers: str | Path, data, *, tious: tuple[float, ...] = temporal.TIOUS,
             captions: bool = True, meteor: bool | None = None, units: str = "seconds",
             task: str = "auto", format: str | None = None) -> EvalReport:
    """Score `answers` (JSON lines `{"id", "answer"}`) against the true segments of `data`.

    An answer keyed by a video's id is a dense-captioning answer; one keyed `{video_id}#{i}` answers
    the grounding query of that video's i-th true sentence. `task` "auto" scores each kind the
    answers hold (every video, or every query, of the truth: a missing one scores 0); "captioning"
    or "grounding" scores that kind alone. `units`: "seconds", or "relative" for LongVALE's
    hundredths of each video's duration. `captions`: also BLEU-4, CIDEr, METEOR and SODA_c
    (pycocoevalcap; METEOR and SODA_c when a Java runtime is there, or as `meteor` says)."""
    if units not in UNITS or task not in TASKS:
        raise SettingsError(f"units must be one of {UNITS} and task one of {TASKS}, not {units!r} and {task!r}")
    problems: list[str] = []
    untimed: dict[str, str] = {}
    truth = load_truth(data, problems, format=format, untimed=untimed)
    given = load_answers(answers, problems)
    dense, queries = _split_answers(given, truth, untimed, answers, data, problems)
    tasks = _tasks(task, dense, queries, answers, problems)
    if units == "relative" and not any(t.duration for t in truth.values()):
        raise SettingsError(f"--data {data}: no record gives a duration, which answers in relative units "
                            "need (an annotation's `duration`, or a record's `meta.duration`)")
    read = _Reader(answers, truth, units, problems)
    videos = [_score_video(video_id, item.segments, read.captioning(video_id, dense.get(video_id)), tious)
              for video_id, item in truth.items() if not item.query] if "captioning" in tasks else []
    report = EvalReport(answers=str(answers), data=str(data), tious=tuple(tious), videos=videos,
                        precision={t: _mean([v.precision[t] for v in videos]) for t in tious},
                        recall={t: _mean([v.recall[t] for v in videos]) for t in tious}, f1={}, captions={},
                        best_tiou=_mean([v.best_tiou for v in videos]), problems=problems, notes=[],
                        units=units, tasks=tasks)
    report.f1 = {t: temporal.f1(report.precision[t], report.recall[t]) for t in tious}
    if "grounding" in tasks:
        report.grounding = GroundingReport([read.grounding(name, video_id, index, segment, queries.get(name))
                                            for name, video_id, index, segment in _queries(truth)])
    if captions and videos:
        _score_captions(report, meteor)
    return report


def _queries(truth) -> list[tuple[str, str, int, Segment]]:
    """(query name, truth name, sentence index, true segment) of each grounding query: the grounding
    samples of the truth where it has any, else each sentence of each video."""
    samples = [(name, name, 0, item.segments[0]) for name, item in truth.items() if item.query]
    return samples or [(query_id(video_id, index), video_id, index, segment) for video_id, item in truth.items()
                       for index, segment in enumerate(item.segments)]


def _split_answers(given, truth, untimed, answers, data, problems) -> tuple[dict, dict]:
    """The answers keyed by a video (dense captioning) and those keyed by a query (grounding); an
    answer to a record without a time range (`untimed`) is named as one."""
    dense, queries = {}, {}
    videos = {name: item for name, item in truth.items() if not item.query}
    sentences = len(videos) == len(truth)  # no grounding sample: the videos' sentences are the queries
    for answer_id, (line, text) in given.items():
        if answer_id in videos:
            dense[answer_id] = (line, text)
        elif answer_id in truth or (sentences and split_query_id(answer_id, videos)):
            queries[answer_id] = (line, text)
        elif answer_id in untimed:
            problems.append(f"{answers}:{line}: {answer_id!r} has nothing to score against: its record in {data} "
                            f"has {untimed[answer_id]}; not scored")
        else:
            problems.append(f"{answers}:{line}: id {answer_id!r} is not in {data}; not scored")
    for answer_id, (line, _) in queries.items():
        if answer_id in truth:
            continue
        video_id, index = split_query_id(answer_id, videos)
        if index >= len(truth[video_id].segments):
            problems.append(f"{answers}:{line}: {video_id!r} has {len(truth[video_id].segments)} sentences "
                            f"in {data}, so no query {index}; not scored")
    return dense, queries


def _tasks(task: str, dense: dict, queries: dict, answers, problems) -> tuple[str, ...]:
    if task == "auto":
        return tuple(t for t, held in (("captioning", dense or not queries), ("grounding", queries)) if held)
    other, left = ("grounding", queries) if task == "captioning" else ("captioning", dense)
    if left:
        problems.append(f"{answers}: {len(left)} {other} answers not scored (--task {task})")
    return (task,)


class _Reader:
    """Answers → segments in seconds, with what is wrong with each reported once."""

    def __init__(self, answers, truth, units: str, problems: list[str]):
        self.answers, self.truth, self.units, self.problems = answers, truth, units, problems

    def captioning(self, video_id: str, given) -> tuple[ParsedAnswer, bool]:
        parsed = self._parse(video_id, video_id, given, end_offset=1)
        return parsed, given is not None

    def grounding(self, name: str, video_id: str, index: int, segment: Segment, given) -> QueryResult:
        parsed = self._parse(name, video_id, None if given is None else (given[0], answer_text(given[1])),
                             end_offset=0)
        predicted = parsed.segments[0] if parsed.segments else None
        return QueryResult(name, video_id, index, segment, predicted, answered=given is not None,
                           iou=grounding.iou(predicted, segment) if predicted else 0.0)

    def _parse(self, name: str, video_id: str, given, end_offset: int) -> ParsedAnswer:
        line, text = given if given is not None else (None, "")
        if line is None:
            self.problems.append(f"{self.answers}: no answer for {name!r} (scored 0)")
        elif not text.strip():
            self.problems.append(f"{self.answers}:{line}: the answer for {name!r} is empty (scored 0)")
        parsed = parse_answer(text) if text else ParsedAnswer()
        if text and text.strip() and parsed.empty:
            self.problems.append(f"{self.answers}:{line}: no time range in the answer for {name!r} (scored 0)")
        if self.units == "relative" and parsed.segments:
            duration = self.truth[video_id].duration
            if duration is None:
                self.problems.append(f"{self.answers}:{line}: {video_id!r} has no duration in the data, so its "
                                     "answer in relative units cannot be read (scored 0)")
                return ParsedAnswer(unparsed=parsed.unparsed)
            parsed.segments = [from_relative(s, duration, end_offset) for s in parsed.segments]
        return parsed


def _score_video(video_id, truth, read: tuple[ParsedAnswer, bool], tious) -> VideoResult:
    parsed, answered = read
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
    if "METEOR" in scorer.metrics:
        _score_soda(report, scorer, lambda text: tokens[ascii_only(text)])
    else:
        report.notes.append("SODA_c left out: it weighs matches by METEOR, which did not run")


def _score_soda(report: EvalReport, scorer, token) -> None:
    """SODA_c per video and its mean; every (true, predicted) pair's METEOR in one call to METEOR."""
    pairs = sorted({(token(g.text), token(p.text)) for v in report.videos for g in v.truth for p in v.predicted})
    meteor = dict(zip(pairs, scorer.meteor_scores(pairs)))
    for video in report.videos:
        video.soda = soda_c(video.predicted, video.truth, lambda g, p: meteor[token(g), token(p)])
    report.soda = SodaResult(*(_mean([getattr(v.soda, name) for v in report.videos])
                               for name in ("precision", "recall", "f1")))


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
