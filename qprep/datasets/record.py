"""The one shape every dataset reader produces: a conversation over named media.

A `Record` is what a published record says, with nothing decided yet about the store: its turns
(system, user, assistant) whose text holds one mark per medium (`<video>`, `<image>`, `<audio>`)
where the medium goes, and its media in the order of those marks, each named as the dataset
names it (a path, or an id for sets that name videos by id), with its window and its own
sampling settings where the dataset gives them. Each reader places unmarked media where its
own project places them, so a `Record` has exactly one mark per medium.

`check` holds the rules every format shares; a reader raises `RecordError` with the cause, and
the caller reports the record (file, index or id, cause) and goes on with the rest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("video", "image", "audio")
MARKS = {kind: f"<{kind}>" for kind in KINDS}
MARK = re.compile("|".join(re.escape(mark) for mark in MARKS.values()))
ROLES = ("system", "user", "assistant")
# What a medium may set for itself (qwen-vl-utils' per-item keys): the store applies them at extraction
SAMPLING_KEYS = ("fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels",
                 "resized_height", "resized_width")


class RecordError(ValueError):
    """A record that cannot be used; the message is the cause, worded for the report."""


@dataclass
class Medium:
    kind: str  # video | image | audio
    path: str  # as the dataset writes it: a path, or an id where `by_id`
    file: Path | None = None  # where it was found on disk; None: not looked for, or not found
    start: float | None = None  # window within the file, seconds; None: from the start / to the end
    end: float | None = None
    sampling: dict[str, float] = field(default_factory=dict)  # its own SAMPLING_KEYS settings
    by_id: bool = False  # named by id (LongVALE, Charades-STA): `path` is the id, no extension to drop
    looked: tuple[str, ...] = ()  # where it was looked for, for the report when it is not found

    @property
    def window(self) -> bool:
        """Less than the whole file (a start at 0 with no end is the whole file)."""
        return bool(self.start) or self.end is not None


@dataclass
class Turn:
    role: str  # system | user | assistant
    text: str  # one MARKS mark per medium, where it goes


@dataclass
class Record:
    name: str  # what reports and answers call it
    index: int  # its place in the file (0-based)
    turns: list[Turn]
    media: list[Medium] = field(default_factory=list)  # in the order of the marks in `turns`
    duration: float | None = None  # the video's (or clip's) seconds where the dataset gives them (eval's units)

    @property
    def label(self) -> str:
        """How a report names it: its place in the file, and its name where the file gives one."""
        return f"record {self.index}" + ("" if self.name == f"#{self.index}" else f" ({self.name})")


def marks_in(text: str) -> list[str]:
    """The kinds of the marks in `text`, in order."""
    return [match.group(0)[1:-1] for match in MARK.finditer(text)]


def check(record: Record) -> Record:
    """The rules every format shares: known roles, a user turn, one mark per medium of its kind in
    order, sound windows and sampling settings. Returns the record; raises `RecordError`."""
    for turn in record.turns:
        if turn.role not in ROLES:
            raise RecordError(f"unknown role {turn.role!r}")
        if not isinstance(turn.text, str):
            raise RecordError(f"a {turn.role} turn's text is not a string")
    if not any(turn.role == "user" for turn in record.turns):
        raise RecordError("no user turn")
    marked = [kind for turn in record.turns for kind in marks_in(turn.text)]
    if marked != [medium.kind for medium in record.media]:
        raise RecordError(mismatch(marked, [medium.kind for medium in record.media]))
    for medium in record.media:
        check_window(medium)
        check_sampling(medium)
    return record


def mismatch(marked: list[str], media: list[str]) -> str:
    """The cause of a mark/medium disagreement, counted per kind."""
    for kind in KINDS:
        if marked.count(kind) != media.count(kind):
            count = media.count(kind)
            return f"{marked.count(kind)} {MARKS[kind]} tags for {count} {kind}{'' if count == 1 else 's'}"
    return f"the tags' order ({', '.join(marked)}) is not the media's ({', '.join(media)})"


def check_window(medium: Medium) -> None:
    for name, value in (("start", medium.start), ("end", medium.end)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise RecordError(f"bad time: {medium.path} {name} {value!r} (seconds, 0 or more)")
    if medium.start is not None and medium.end is not None and medium.end <= medium.start:
        raise RecordError(f"bad time: {medium.path} ends at {medium.end} s, not after its start {medium.start} s")


def check_sampling(medium: Medium) -> None:
    for key, value in medium.sampling.items():
        if key not in SAMPLING_KEYS:
            raise RecordError(f"{medium.path}: unknown setting {key!r} (known: {', '.join(SAMPLING_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise RecordError(f"{medium.path}: {key} {value!r} is not a positive number")
    if "fps" in medium.sampling and "nframes" in medium.sampling:
        raise RecordError(f"{medium.path}: fps and nframes both set (qwen-vl-utils takes one)")


def seconds(value, what: str) -> float:
    """A time the dataset gives, as float seconds; `RecordError` naming `what` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RecordError(f"bad time: {what} is {value!r} (seconds, 0 or more)")
    return float(value)


def in_mark_order(turns: list[Turn], media: dict[str, list[Medium]]) -> list[Medium]:
    """Media listed per kind (`images`, `videos`, `audios`), in the order the marks of `turns` take
    them; `RecordError` when the counts differ (LLaMA-Factory's and Qwen's rule)."""
    marked = [kind for turn in turns for kind in marks_in(turn.text)]
    given = [kind for kind in KINDS for _ in media.get(kind, [])]
    if sorted(marked) != sorted(given):
        raise RecordError(mismatch(marked, given))
    taken = {kind: iter(media.get(kind, [])) for kind in KINDS}
    return [next(taken[kind]) for kind in marked]


@dataclass
class Failure:
    """A record left out: which one and why."""
    name: str  # "record 3 (cooking/a)": its place in the file, and its id where it has one
    cause: str


def name_of(record: dict, index: int) -> str:
    """A data file record's name: its id, else its place (`#3`), as qprep's own records are named."""
    return str(record["id"]) if "id" in record else f"#{index}"


def row_name(record, index: int) -> str:
    """How a report names a record that could not be read."""
    name = record.get("id") if isinstance(record, dict) else None
    return f"record {index}" + (f" ({name})" if name is not None else "")


def each_row(rows, read_one):
    """`read_one(record, index)` → Record over a file's rows, checked; a record that fails is a `Failure`."""
    if not isinstance(rows, list):
        raise RecordError("expected a list of records")
    for index, record in enumerate(rows):
        try:
            if not isinstance(record, dict):
                raise RecordError("not a JSON object")
            yield check(read_one(record, index))
        except RecordError as exc:
            yield Failure(row_name(record, index), str(exc))


def turns_of(items, role_key: str, text_key: str, roles: dict[str, str]) -> list[Turn]:
    """A list of `{role_key: ..., text_key: ...}` messages as turns, roles renamed by `roles`."""
    if not isinstance(items, list) or not items:
        raise RecordError("no conversation (an empty or missing message list)")
    turns = []
    for item in items:
        if not isinstance(item, dict):
            raise RecordError(f"a message is {item!r}, not an object")
        role = item.get(role_key)
        if role not in roles:
            raise RecordError(f"unknown role {role!r} (expected {', '.join(roles)})")
        text = item.get(text_key)
        if not isinstance(text, str):
            raise RecordError(f"a {role} message's {text_key} is {type(text).__name__}, not text")
        turns.append(Turn(roles[role], text))
    return turns


def listed(value, what: str) -> list:
    """A media field: a string or a list of them (None and [] are none)."""
    if value is None:
        return []
    items = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(items, list):
        raise RecordError(f"{what} is {value!r}, not a path or a list of paths")
    if any(isinstance(item, list) for item in items):
        raise RecordError(f"{what}: a video given as a list of frame images is not read (give the video file)")
    return items
