"""The true segments of each video or sample, read from the data file through `qprep.datasets`'
readers, so that one file (in any format they read) drives extract, train, infer and eval, and each
truth is named as `qprep infer --data` names its answer.

* Annotation dicts (LongVALE's evaluation file, Charades-STA, ActivityNet Captions: `{video_id:
  {"duration", "timestamps", "sentences"}}`, or a list of them with ids): one truth per video,
  its sentences in the file's order. Answered as a whole it is dense captioning; its sentence i is
  the grounding query `{video_id}#i` (the id `infer --data` gives that sentence's sample, and
  `infer --grounding` its question). A range written end first is read start first.
* Every other format (LLaMA-Factory, ms-swift, LLaVA, content blocks, LongVALE, Time-R1, qprep's
  own): one truth per record, named as the reader names it, read from its first assistant turn as
  answers are read (LongVALE's `<sN>`/`<eN>` as seconds). An answer holding one range and no
  caption ("From 2 to 7.5.") makes the record a grounding sample, scored by IoU; any other a
  dense-captioning one. A record whose answer holds no time range (a text-only turn, a question
  about an image) has nothing to score: it is listed, and an answer to it is named as such.

Times in the truth are seconds; `duration` (the annotation's, LongVALE's `meta.duration`, Time-R1's
`duration`) reads answers in relative units. A record that cannot be used is reported with the
file, its place and id, and the cause.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qprep.errors import SettingsError
from qprep.eval.segments import Segment, is_grounding_answer, parse_answer


@dataclass
class Truth:
    segments: list[Segment]
    duration: float | None = None  # seconds, where the file gives it (needed for relative units)
    query: bool = False  # a grounding sample: its one segment is scored by IoU with the answer keyed by its name
    media: tuple[str, ...] = ()  # the cache ids it reads (`qprep infer --grounding` asks about them)


def load_truth(data, problems: list[str], format: str | None = None,
               untimed: dict[str, str] | None = None) -> dict[str, Truth]:
    """name → its true segments; records that cannot be used go to `problems`, and those read whole
    but without a time range to score to `untimed` (name → why). `data`: a path or a
    `qprep.datasets.DataFile` (its format, given or detected, and its media folder)."""
    from qprep.datasets import DataFile, parse

    source = data if isinstance(data, DataFile) else DataFile(Path(data), format=format)
    source = DataFile(source.path, format=source.format, media_dir=source.media_dir)  # times in seconds
    content, reader, path = parse(source)
    read = _annotated if reader == "grounding" else _answered
    truth: dict[str, Truth] = {}
    for name, item in read(content, source, reader, path, problems, {} if untimed is None else untimed):
        if name in truth:
            problems.append(f"{path}: {name!r} again (the first record counts)")
        else:
            truth[name] = item
    if not truth:
        raise SettingsError(f"--data {path}: no record with true segments to score against "
                            f"({problems[0] if problems else 'the file is empty'})")
    return truth


def read_record(record: dict) -> Truth:
    """One plain record's truth (a record of `qprep.train.data`, or an annotation holding `timestamps`
    and `sentences`), as `load_truth` reads its file's: `RecordError` (a ValueError) says why there
    is none. LongVALE's `<sN>`/`<eN>` are read as their seconds where the record still holds them."""
    from qprep.datasets import grounding, longvale
    from qprep.datasets.record import RecordError

    if "timestamps" in record or "sentences" in record:
        pairs, duration = grounding.pairs_of(record)
        events = [grounding.event(pair, duration, k, reversed_ok=True) for k, pair in enumerate(pairs)]
        return Truth([Segment(start, end, sentence) for (start, end), sentence in events], _positive(duration))
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    answers = [turn.get("value") for turn in record.get("conversations") or []
               if isinstance(turn, dict) and turn.get("from") in ("gpt", "assistant")]
    if not answers:
        raise RecordError("neither timestamps + sentences nor a conversation with an assistant turn")
    answer = longvale.substituted(str(answers[0]), meta, "seconds")
    segments = parse_answer(answer).segments
    if not segments:
        raise RecordError("its first assistant turn holds no time range")
    return Truth(segments, _positive(meta.get("duration")), query=is_grounding_answer(answer))


def _annotated(content, source, reader, path, problems, untimed):
    """(video id, truth) per video of an annotation dict, through the grounding reader's own checks
    (every video of one has times: `untimed` stays as it is)."""
    from qprep.datasets import grounding
    from qprep.datasets.record import RecordError

    try:
        for index, video_id, record in grounding.videos(content):
            try:
                pairs, duration = grounding.pairs_of(record)
                events = [grounding.event(pair, duration, k, reversed_ok=True) for k, pair in enumerate(pairs)]
            except RecordError as exc:
                problems.append(f"{path}: record {index} ({video_id}): {exc}; not scored")
                continue
            segments = [Segment(start, end, sentence) for (start, end), sentence in events]
            yield video_id, Truth(segments, _positive(duration), media=(video_id,))
    except RecordError as exc:
        raise SettingsError(f"--data {path} ({reader}): {exc}") from exc


def _answered(content, source, reader, path, problems, untimed):
    """(name, truth) per record whose first assistant turn holds a time range; a record without one
    goes to `untimed` (name → why)."""
    for name, label, answer, duration, media in _records(content, source, reader, path, problems):
        if answer is None:
            problems.append(f"{path}: {label}: no assistant turn to read the truth from; not scored")
            untimed.setdefault(name, "no assistant turn")
            continue
        segments = parse_answer(answer).segments
        if not segments:
            problems.append(f"{path}: {label}: its first assistant turn holds no time range; not scored")
            untimed.setdefault(name, "no time range in its first assistant turn")
            continue
        yield name, Truth(segments, _positive(duration), query=is_grounding_answer(answer), media=media)


def _records(content, source, reader, path, problems):
    """(name, label, first answer or None, duration, cache ids) per record the reader reads."""
    from qprep.datasets import cache_id, plain, read_records
    from qprep.datasets.record import Failure, RecordError

    if reader == "qprep":
        from qprep.train.data import record_id, record_media

        for index, record in enumerate(plain.read(content, path)):
            name = record_id(record, index)
            answers = [turn.get("value") for turn in record["conversations"]
                       if isinstance(turn, dict) and turn.get("from") in ("gpt", "assistant")]
            yield name, f"record {index} ({name})", str(answers[0]) if answers else None, None, record_media(record)
        return
    for item in read_records(source, content, reader):
        if isinstance(item, Failure):
            problems.append(f"{path}: {item.name}: {item.cause}; not scored")
            continue
        answers = [turn.text for turn in item.turns if turn.role == "assistant"]
        try:
            media = tuple(cache_id(medium, source.root) for medium in item.media)
        except RecordError:
            media = ()  # scored all the same; only `infer --grounding` needs its media
        yield item.name, item.label, answers[0] if answers else None, item.duration, media


def _positive(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value > 0 else None
