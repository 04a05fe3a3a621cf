"""The true segments of each video, read from the files they circulate in.

* Annotation dicts, as LongVALE's evaluation file, Charades-STA and ActivityNet Captions publish
  them: `{video_id: {"duration", "timestamps": [[s, e], ...], "sentences": [...]}}` (also a list of
  such records, each with an `id`). Sentence i is query i of a grounding evaluation.
* qprep's data files: `{"id", "conversations"}` records whose first assistant turn is parsed as the
  answers are. LongVALE's training records write their times as `<s0>`/`<e0>` tokens with the
  seconds in `meta.token`; those seconds replace the tokens before the turn is read, and
  `meta.duration` is the video's duration.

Times in the truth are seconds. Segments keep the file's order (a grounding query is named by its
place), and a record that cannot be used is reported with the file, its place and id, and the cause.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from qprep.errors import SettingsError
from qprep.eval.segments import Segment, parse_answer

_TOKEN = re.compile(r"<[se]\d+>")


@dataclass
class Truth:
    segments: list[Segment]
    duration: float | None = None  # seconds, where the file gives it (needed for relative units)


def load_truth(path: str | Path, problems: list[str]) -> dict[str, Truth]:
    """id → its true segments and duration; records that cannot be used go to `problems`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SettingsError(f"--data {path}: cannot read it as JSON ({exc})") from exc
    if isinstance(data, dict):  # keyed by video id: annotation dicts (and records so keyed)
        data = [{"id": key, **value} if isinstance(value, dict) else value for key, value in data.items()]
    if not isinstance(data, list):
        raise SettingsError(f"--data {path}: expected a JSON list of records or a dict keyed by video id")
    truth: dict[str, Truth] = {}
    for index, record in enumerate(data):
        where = f"{path}: record {index}"
        if not isinstance(record, dict) or "id" not in record:
            problems.append(f"{where}: not a record with an id; not scored")
            continue
        video_id = str(record["id"])
        try:
            read = read_record(record)
        except ValueError as exc:
            problems.append(f"{where} ({video_id!r}): {exc}; not scored")
            continue
        if video_id in truth:
            problems.append(f"{where}: id {video_id!r} again (the first record counts)")
            continue
        truth[video_id] = read
    if not truth:
        raise SettingsError(f"--data {path}: no record with true segments to score against "
                            f"({problems[0] if problems else 'the file is empty'})")
    return truth


def read_record(record: dict) -> Truth:
    """One record's true segments and duration (either form above); ValueError says why there are none."""
    if "timestamps" in record or "sentences" in record:
        return Truth(_annotated_segments(record), _duration(record.get("duration")))
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") in ("gpt", "assistant"):
            text = _with_token_times(str(turn.get("value", "")), meta.get("token"))
            segments = parse_answer(text).segments
            if not segments:
                raise ValueError("its first assistant turn holds no time range")
            return Truth(segments, _duration(meta.get("duration")))
    raise ValueError("neither timestamps + sentences nor a conversation with an assistant turn")


def _annotated_segments(record: dict) -> list[Segment]:
    stamps, sentences = record.get("timestamps"), record.get("sentences")
    if not isinstance(stamps, list) or not isinstance(sentences, list):
        raise ValueError("timestamps and sentences must both be lists")
    if len(stamps) != len(sentences):
        raise ValueError(f"{len(stamps)} timestamps for {len(sentences)} sentences")
    segments = []
    for number, (stamp, sentence) in enumerate(zip(stamps, sentences)):
        if not (isinstance(stamp, (list, tuple)) and len(stamp) == 2 and all(_is_time(t) for t in stamp)):
            raise ValueError(f"timestamp {number} is {stamp!r}, not [start, end] in seconds")
        start, end = sorted(float(t) for t in stamp)  # ActivityNet holds a few written end first
        segments.append(Segment(start, end, str(sentence)))
    if not segments:
        raise ValueError("no timestamps")
    return segments


def _with_token_times(text: str, tokens) -> str:
    """LongVALE's "From <s0> to <e0>, ..." with each token's seconds in its place."""
    if not _TOKEN.search(text):
        return text
    if not isinstance(tokens, dict):
        raise ValueError("its answer names time tokens (<s0>, <e0>, ...) but meta.token is missing")
    missing = sorted({t for t in _TOKEN.findall(text) if not _is_time(tokens.get(t))})
    if missing:
        raise ValueError(f"meta.token gives no time in seconds for {', '.join(missing)}")
    return _TOKEN.sub(lambda m: f"{float(tokens[m.group()]):g}", text)


def _duration(value) -> float | None:
    return float(value) if _is_time(value) and float(value) > 0 else None


def _is_time(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
