"""Answers → timed segments `(start, end, text)`, lenient in what it reads and strict in what it reports.

A segment is a time range followed by its caption, up to the next range: "From 0 to 4.5, a man
talks.", "From 0.0s to 4.5s: ...", "0.0 - 4.5 seconds, ...", "[0, 4.5] ...", "(0.0-4.5) ...",
"Between 0 and 4.5, ...", "00:12 to 00:45 ...", numbered or bulleted lists, several on one line. Times are seconds, `m:ss` or
`h:mm:ss`; a reversed range is put in order (and counted). A bare "A to B" / "A-B" inside a sentence
("2 to 3 people dance") is not a range unless a unit or a colon follows it: a range opens a line
or a sentence, or is introduced by "from"/"between" or a bracket.

Nothing is dropped silently: each answer's `unparsed` lists its non-empty lines that hold no
range (a preamble such as "Here are the events:" is listed too), and an answer with no segment
at all is `empty`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TIME = r"\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?|\d+(?:\.\d+)?"
_UNIT = r"(?:\s*(?:s|sec|secs|second|seconds)\b)?"
_JOIN = r"\s*(?:-|–|—|~|to|and|until|till)\s*"
_RANGE = re.compile(
    rf"(?P<lead>\bfrom\s+|\bbetween\s+|[\[(<]\s*)?"
    # a range starts where a number starts (not inside a run of digits: a search that tried every
    # digit of a long garbage answer as a start would take time quadratic in its length)
    rf"(?<!\d)(?P<a>{_TIME}){_UNIT}(?P<join>{_JOIN}|\s*,\s*)(?P<b>{_TIME})(?P<unit>{_UNIT})"
    rf"(?P<close>\s*[\])>])?",
    re.IGNORECASE,
)
_OPENS = re.compile(r"(?:^|[.;!?\n*•-])\s*$")  # what may precede a range without a lead word
_NEXT_ITEM = re.compile(r"\n\s*(?:\d+[.)]|[-*•])?\s*$")
_CAPTION_EDGES = " \t,:;-–—.)]>"


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


@dataclass
class ParsedAnswer:
    segments: list[Segment] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)  # non-empty lines holding no range
    reversed_at: list[int] = field(default_factory=list)  # the segments written end first, put in order

    @property
    def empty(self) -> bool:
        return not self.segments

    @property
    def reversed(self) -> int:
        """How many ranges were written end first."""
        return len(self.reversed_at)


def seconds(text: str) -> float:
    """'4.5' → 4.5, '1:05' → 65.0, '1:02:03.5' → 3723.5."""
    value = 0.0
    for part in text.split(":"):
        value = value * 60 + float(part)
    return value


def parse_answer(answer: str) -> ParsedAnswer:
    parsed = ParsedAnswer()
    ranges = [m for m in _RANGE.finditer(answer) if _is_range(m, answer)]
    for index, match in enumerate(ranges):
        stop = ranges[index + 1].start() if index + 1 < len(ranges) else len(answer)
        start, end = seconds(match["a"]), seconds(match["b"])
        if end < start:
            start, end = end, start
            parsed.reversed_at.append(index)
        parsed.segments.append(Segment(start, end, _caption(answer[match.end():stop])))
    covered = [(m.start(), m.end()) for m in ranges]
    position = 0
    for line in answer.splitlines(keepends=True):
        begin, position = position, position + len(line)
        if line.strip() and not any(begin <= a < position or a <= begin < b for a, b in covered):
            parsed.unparsed.append(line.strip())
    return parsed


def _is_range(match: re.Match, text: str) -> bool:
    """Introduced ("from", "between", a bracket), closed by a bracket, followed by a unit, or opening
    a line, a sentence or a list item: a time range; otherwise numbers inside a caption."""
    if match["join"].strip() == ",":  # "[0, 4.5]" only: "4.5, 5" in a sentence is two numbers
        return bool(match["lead"] and match["lead"].strip() in "[(<" and match["close"])
    if match["lead"] or match["close"] or match["unit"].strip():
        return True
    return bool(_OPENS.search(text[: match.start()]))


def _caption(text: str) -> str:
    text = _NEXT_ITEM.sub("", text)  # the next line's list number ("2.") belongs to the next segment
    text = " ".join(text.split())
    return text.strip(_CAPTION_EDGES).strip()


def from_relative(segment: Segment, duration: float, end_offset: int) -> Segment:
    """A range in LongVALE's relative units (hundredths of the video's duration, as its loader writes
    `min(round(t / duration * 100), 99)`) → seconds: start·d/100 and (end + end_offset)·d/100.
    LongVALE's evaluator adds 1 to a dense caption's end (`longvalellm/eval/metric.py`,
    `captioning_metrics`: the unit that ends the event is included) and nothing to a grounding
    answer's (`longvalellm/eval/eval.py`, `iou`)."""
    return Segment(segment.start * duration / 100, (segment.end + end_offset) * duration / 100, segment.text)
