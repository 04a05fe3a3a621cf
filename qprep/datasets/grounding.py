"""Temporal grounding sets as they circulate: the `{video_id: {"duration", "timestamps": [[s, e],
...], "sentences": [...]}}` dicts of Charades-STA and ActivityNet Captions (TimeZero and
VideoChat-R1 ship them so), and Time-R1's lists of `{"video", "duration", "timestamp": [s, e],
"sentence", "video_start", "video_end"}` (the timestamp relative to the clip).

A dict (or a list of its annotations, each with an `id`) gives one grounding sample per sentence,
named `{video_id}#{k}` (sentence k), whose question is a template the user may set (`{sentence}`
stands for the sentence) and whose answer is "From s to e." in seconds; or (`task="captions"`)
one dense-captioning sample per video, the recipe's question answered "From s to e, sentence.
...". Its videos are named by id (`DIR/{id}` with a video extension). A Time-R1 record is one grounding sample over its window.
"""

from __future__ import annotations

from qprep.datasets.media import candidates, find, find_by_id
from qprep.datasets.record import MARKS, Failure, Medium, Record, RecordError, Turn, check, each_row, seconds
from qprep.datasets.source import DataFile
from qprep.datasets.times import seconds_text

GROUNDING_PROMPT = 'During which time segment does "{sentence}" happen? Format strictly: From xx to xx.'
# The recipe's dense-captioning question (qprep infer's default)
CAPTIONS_PROMPT = ("Could you detail events during different time segments? Format strictly: "
                   "From xx to xx, event1. From xx to xx, event2. ...")
TASKS = ("grounding", "captions")


def read(data, source: DataFile):
    """The records of a `{video_id: {...}}` dict: per sentence, a bad one leaves out its sample alone."""
    if source.task not in TASKS:
        raise RecordError(f"task {source.task!r}: expected one of {', '.join(TASKS)}")
    for index, video_id, record in videos(data):
        try:
            pairs, duration = pairs_of(record)
            if source.task == "captions":
                yield _captions(video_id, index, [event(pair, duration, k) for k, pair in enumerate(pairs)], source,
                                duration)
                continue
        except RecordError as exc:
            yield Failure(video_id, str(exc))
            continue
        for k, pair in enumerate(pairs):
            try:
                (start, end), sentence = event(pair, duration, k)
                yield check(Record(f"{video_id}#{k}", index, _grounding(source.prompt, sentence, start, end),
                                   [_video(video_id, source)], duration=_duration(duration)))
            except RecordError as exc:
                yield Failure(f"{video_id}#{k}", str(exc))


def videos(data):
    """(index, video id, annotation) of each video of a `{video_id: {...}}` dict, or of a list of
    such annotations each with an `id` (as some sets list them)."""
    if isinstance(data, list):
        for index, record in enumerate(data):
            if not (isinstance(record, dict) and "id" in record):
                yield index, f"#{index}", None
            else:
                yield index, str(record["id"]), record
        return
    if not isinstance(data, dict):
        raise RecordError("expected a {video_id: {duration, timestamps, sentences}} object")
    for index, (video_id, record) in enumerate(data.items()):
        yield index, video_id, record


def pairs_of(record) -> tuple[list, object]:
    """A video's (timestamp, sentence) pairs, as written, and its duration."""
    if record is None:
        raise RecordError("not an annotation object with an id")
    if not isinstance(record, dict):
        raise RecordError(f"{record!r:.60} is not an object")
    stamps, sentences = record.get("timestamps"), record.get("sentences")
    if not isinstance(stamps, list) or not isinstance(sentences, list) or len(stamps) != len(sentences):
        raise RecordError("timestamps and sentences must be lists of one length")
    if not stamps:
        raise RecordError("no timestamps")
    return list(zip(stamps, sentences)), record.get("duration")


def event(pair, duration, k: int, *, reversed_ok: bool = False) -> tuple[tuple[float, float], str]:
    """Sentence k's checked ((start, end), text). `reversed_ok`: a range written end first (ActivityNet
    holds a few) is read start first, as its evaluators read it."""
    stamp, sentence = pair
    if reversed_ok and isinstance(stamp, list) and len(stamp) == 2 and all(isinstance(t, (int, float)) for t in stamp):
        stamp = sorted(stamp)
    return _span(stamp, duration, f"timestamps[{k}]"), _text(sentence)


def _duration(duration) -> float | None:
    return None if duration is None else seconds(duration, "duration")


def _captions(video_id: str, index: int, events: list, source: DataFile, duration) -> Record:
    answer = " ".join(f"From {seconds_text(s)} to {seconds_text(e)}, {_sentence(text)}." for (s, e), text in events)
    return check(Record(video_id, index, _turns(source.prompt or CAPTIONS_PROMPT, answer), [_video(video_id, source)],
                        duration=_duration(duration)))


def _video(video_id: str, source: DataFile) -> Medium:
    return find_by_id(Medium("video", video_id, by_id=True), source.root)


def _span(stamp, duration, what: str) -> tuple[float, float]:
    if not (isinstance(stamp, list) and len(stamp) == 2):
        raise RecordError(f"bad time: {what} is {stamp!r} (expected [start, end])")
    start, end = seconds(stamp[0], f"{what}'s start"), seconds(stamp[1], f"{what}'s end")
    if end <= start:
        raise RecordError(f"bad time: {what} ends at {end} s, not after its start {start} s")
    if duration is not None and start >= seconds(duration, "duration"):
        raise RecordError(f"bad time: {what} starts at {start} s, past the video's duration {duration} s")
    return start, end


def _text(sentence) -> str:
    if not isinstance(sentence, str) or not sentence.strip():
        raise RecordError(f"a sentence is {sentence!r}")
    return sentence


def _sentence(text: str) -> str:
    return text.strip().rstrip(".")


def _turns(question: str, answer: str) -> list[Turn]:
    return [Turn("user", MARKS["video"] + question), Turn("assistant", answer)]


def _grounding(prompt: str | None, sentence: str, start: float, end: float) -> list[Turn]:
    question = (prompt or GROUNDING_PROMPT).replace("{sentence}", _sentence(sentence))
    return _turns(question, f"From {seconds_text(start)} to {seconds_text(end)}.")


def read_list(rows, source: DataFile):
    """The records of a Time-R1-style list."""
    return each_row(rows, lambda record, index: _time_r1(record, index, source))


def _time_r1(record: dict, index: int, source: DataFile) -> Record:
    path = record.get("video")
    if not isinstance(path, str):
        raise RecordError(f"video is {path!r}, not a path")
    window = {edge: seconds(record[f"video_{edge}"], f"video_{edge}") if record.get(f"video_{edge}") is not None
              else None for edge in ("start", "end")}
    video = find(Medium("video", path, **window), candidates(path, None, source.root))
    start, end = _span(record.get("timestamp"), record.get("duration"), "timestamp")
    name = str(record.get("id", record.get("qid", f"#{index}")))
    return Record(name, index, _grounding(source.prompt, _text(record.get("sentence")), start, end), [video],
                  duration=_duration(record.get("duration")))
