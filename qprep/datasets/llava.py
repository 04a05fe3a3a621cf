"""LLaVA-NeXT / LLaVA-Video-178K / Qwen's finetune code: `{"id", "conversations": [{"from",
"value"}], "image": str | list}` or `"video": str | list`, paths under one folder (LLaVA's
`video_folder` / `image_folder`, Qwen's per-dataset `data_path`): here the media folder.

A record with videos and no image writes `<image>` for the video's place (LLaVA-Video's habit):
those tags are read as `<video>`. The tags must number the media (Qwen's code refuses a
mismatch; no tag is added).
"""

from __future__ import annotations

from qprep.datasets.media import candidates, find
from qprep.datasets.record import MARKS, Medium, Record, Turn, each_row, in_mark_order, listed, name_of, turns_of
from qprep.datasets.source import DataFile

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def read(rows, source: DataFile):
    return each_row(rows, lambda record, index: read_one(record, index, source))


def read_one(record: dict, index: int, source: DataFile) -> Record:
    turns = turns_of(record.get("conversations"), "from", "value", ROLES)
    media = {kind: [find(Medium(kind, path), candidates(path, source.root)) for path in listed(record.get(kind), kind)]
             for kind in ("image", "video")}
    if media["video"] and not media["image"] and not any(MARKS["video"] in turn.text for turn in turns):
        turns = [Turn(turn.role, turn.text.replace(MARKS["image"], MARKS["video"])) for turn in turns]
    return Record(name_of(record, index), index, turns, in_mark_order(turns, media))
