"""ms-swift's standard format: `{"messages": [{"role", "content"}], "images", "videos", "audios"}`
(JSON lines, or a JSON list), with the aliases its preprocessor accepts: `conversations` of
`from`/`value` (`human`/`gpt`), and singular `image`/`video`/`audio` (a path or a list).

As its template reads them (`Template._add_default_tags`): a kind with fewer tags than media gets
the missing ones prepended to the first non-system message, images first, then audio, then
video in front of them; more tags than media is an error here (ms-swift only warns, and qprep has
no medium to put there). A path is tried as written (relative to the working directory), then
under the media folder (its `ROOT_IMAGE_DIR`). Tool turns are not read.
"""

from __future__ import annotations

from qprep.datasets.media import candidates, find
from qprep.datasets.record import (KINDS, MARKS, Medium, Record, RecordError, Turn, each_row, in_mark_order, listed,
                                   name_of, turns_of)
from qprep.datasets.source import DataFile

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
# the order `_add_default_tags` visits the kinds in: each prepends, so the last visited comes first
DEFAULT_TAG_ORDER = ("image", "audio", "video")


def read(rows, source: DataFile):
    return each_row(rows, lambda record, index: read_one(record, index, source))


def read_one(record: dict, index: int, source: DataFile) -> Record:
    turns = _turns(record)
    media = {kind: [_medium(kind, item, source) for item in listed(_field(record, kind), f"{kind}s")] for kind in KINDS}
    turns = _with_default_tags(turns, media)
    return Record(name_of(record, index), index, turns, in_mark_order(turns, media))


def _turns(record: dict) -> list[Turn]:
    if "messages" in record:
        return turns_of(record["messages"], "role", "content", ROLES)
    return turns_of(record.get("conversations"), "from", "value", ROLES)


def _field(record: dict, kind: str):
    plural, singular = f"{kind}s", kind
    if plural in record and singular in record:
        raise RecordError(f"both {plural!r} and {singular!r}")
    return record.get(plural, record.get(singular))


def _medium(kind: str, image, source: DataFile) -> Medium:
    path = image.get("path") if isinstance(image, dict) else image  # images may be {"bytes", "path"}
    if not isinstance(path, str):
        raise RecordError(f"a {kind} without a path ({image!r:.60}): only files are read")
    return find(Medium(kind, path), candidates(path, None, source.root))


def _with_default_tags(turns: list[Turn], media: dict) -> list[Turn]:
    """Tags for media the text does not mark, prepended to the first non-system message."""
    first = next((i for i, turn in enumerate(turns) if turn.role != "system"), None)
    if first is None:
        raise RecordError("no message besides the system's")
    text = "\n".join(turn.text for turn in turns)
    added = turns[first].text
    for kind in DEFAULT_TAG_ORDER:
        missing = len(media[kind]) - text.count(MARKS[kind])
        if missing > 0:
            added = MARKS[kind] * missing + added
    return turns[:first] + [Turn(turns[first].role, added)] + turns[first + 1:]
