"""LongVALE's (and VTimeLLM's) records: `{"id", "conversations": [{"from", "value"}], "meta":
{"duration", "split": [start, end], "token": {"<s0>": 0, "<e0>": 9.4, ...}}}`.

The video is named by the record's id (`DIR/{id}` with a video extension, as its loader finds
it); `meta.split`, where present, is the clip's window in that video (absent: the whole file).
Every `<sN>`/`<eN>` in every turn is replaced by its `meta.token` time (seconds from the clip's
start): as seconds by default ("From 0.0 to 9.4, ..."), the form qprep's `eval` reads and a model
trained on any frame rate can learn; or as LongVALE's relative units (`times="relative"`: its
loader's `min(round(x / duration * 100), 99)`, two digits), for comparisons with its evaluator.
A token with no time, a time outside the clip, or a missing duration is a bad time.
"""

from __future__ import annotations

import re

from qprep.datasets.media import find_by_id
from qprep.datasets.record import MARKS, Medium, Record, RecordError, Turn, each_row, seconds, turns_of
from qprep.datasets.source import DataFile
from qprep.datasets.times import time_text

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
TOKEN = re.compile(r"<[se]\d+>")


def read(rows, source: DataFile):
    return each_row(rows, lambda record, index: read_one(record, index, source))


def read_one(record: dict, index: int, source: DataFile) -> Record:
    if "id" not in record:
        raise RecordError("no id (it names the video)")
    meta = record.get("meta") or {}
    if not isinstance(meta, dict):
        raise RecordError(f"meta is {meta!r:.60}, not an object")
    turns = [Turn(t.role, substituted(t.text, meta, source.times))
             for t in turns_of(record.get("conversations"), "from", "value", ROLES)]
    video = find_by_id(Medium("video", str(record["id"]), by_id=True, **clip(meta)), source.root)
    duration = meta.get("duration")
    return Record(str(record["id"]), index, first_marked(turns), [video],
                  duration=None if duration is None else seconds(duration, "meta.duration"))


def clip(meta: dict) -> dict:
    """`meta.split` as the medium's window."""
    split = meta.get("split")
    if split is None:
        return {}
    if not (isinstance(split, list) and len(split) == 2):
        raise RecordError(f"bad time: meta.split is {split!r} (expected [start, end] in seconds)")
    return {"start": seconds(split[0], "meta.split's start"), "end": seconds(split[1], "meta.split's end")}


def substituted(text: str, meta: dict, units: str) -> str:
    """`text` with each `<sN>`/`<eN>` replaced by its time in `units`."""
    times, duration = meta.get("token") or {}, meta.get("duration")
    if duration is not None:
        duration = seconds(duration, "meta.duration")

    def replace(match: re.Match) -> str:
        name = match.group(0)
        if name not in times:
            raise RecordError(f"bad time: {name} has no time in meta.token")
        value = seconds(times[name], f"meta.token {name}")
        if duration is not None and value > duration:
            raise RecordError(f"bad time: meta.token {name} is {value} s, past the clip's duration {duration} s")
        if units == "relative" and duration is None:
            raise RecordError("bad time: relative units need meta.duration")
        return time_text(value, units, duration)

    return TOKEN.sub(replace, text)


def first_marked(turns: list[Turn]) -> list[Turn]:
    """The video's mark at the start of the first user turn when no turn has one (qprep's rule)."""
    if any(MARKS["video"] in turn.text for turn in turns):
        return turns
    first = next((i for i, turn in enumerate(turns) if turn.role == "user"), None)
    if first is None:
        return turns  # `check` reports the missing user turn
    return turns[:first] + [Turn("user", MARKS["video"] + turns[first].text)] + turns[first + 1:]
