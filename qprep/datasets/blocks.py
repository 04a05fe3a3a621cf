"""Content blocks, as qwen-vl-utils, transformers' chat templates, TRL and Time-R1 write them:
`{"messages": [{"role", "content": str | [{"type": "text", "text"}, {"type": "video", "video",
"video_start", "video_end", "fps" | "nframes", "min_pixels", "max_pixels", "total_pixels", ...},
{"type": "image", "image", ...}, {"type": "audio", "audio", ...}]}]}`.

The only format that gives each medium its own window and sampling: `video_start`/`video_end`
(and `audio_start`/`audio_end`) become the medium's window, the qwen-vl-utils keys its sampling.
A medium sits where its block sits. A path (`file://` or plain) is tried as written, then under
the media folder; the medium may also be under `path` or `url` (transformers' spelling).
"""

from __future__ import annotations

from qprep.datasets.media import candidates, find
from qprep.datasets.record import (KINDS, MARKS, SAMPLING_KEYS, Medium, Record, RecordError, Turn, each_row,
                                   name_of, seconds)
from qprep.datasets.source import DataFile

ROLES = ("system", "user", "assistant")


def read(rows, source: DataFile):
    return each_row(rows, lambda record, index: read_one(record, index, source))


def read_one(record: dict, index: int, source: DataFile) -> Record:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("no messages list")
    turns, media = [], []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise RecordError(f"unknown role {role!r} (expected {', '.join(ROLES)})")
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise RecordError(f"a {role} message's content is {type(content).__name__}, not text or blocks")
        pieces = []
        for block in blocks:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                pieces.append(block["text"])
            elif kind in KINDS:
                media.append(medium(kind, block, source))
                pieces.append(MARKS[kind])
            else:
                raise RecordError(f"a content block {block!r:.80} is neither text nor {', '.join(KINDS)}")
        turns.append(Turn(role, "".join(pieces)))
    return Record(name_of(record, index), index, turns, media)


def medium(kind: str, block: dict, source: DataFile) -> Medium:
    path = next((block[key] for key in (kind, "path", "url") if key in block), None)
    if isinstance(path, list):
        raise RecordError(f"a {kind} given as a list of frame images is not read (give the video file)")
    if not isinstance(path, str):
        raise RecordError(f"a {kind} block without a path: {block!r:.80}")
    window = {edge: seconds(block[f"{kind}_{edge}"], f"{kind}_{edge}") if block.get(f"{kind}_{edge}") is not None
              else None for edge in ("start", "end")}
    sampling = {key: block[key] for key in SAMPLING_KEYS if key in block}
    return find(Medium(kind, path, sampling=sampling, **window), candidates(path, None, source.root))
