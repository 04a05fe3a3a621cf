"""LLaMA-Factory's datasets: a `dataset_info.json` entry (`formatting` sharegpt or alpaca, its
`columns` and `tags` maps) or a bare file in its default sharegpt layout (`conversations` of
`from`/`value`, `human`/`gpt`, with `images`/`videos`/`audios`).

As its converter and multimodal plugin read them (`src/llamafactory/data/converter.py`,
`mm_plugin.py`): a system turn only first (or the `system` column); the others alternate user,
assistant and end with an answer; a media path is tried under the media folder, else as written;
the `<image>`/`<video>`/`<audio>` tags must number exactly the media (no tag is added). With
`use_audio_in_video` (or `audios` listing the `videos` again) each `<video>` takes the first
`<audio>` after it, whose entry is that video's own sound: the pair is one video, whose audio the
store takes from the file. Tool turns
(`observation`, `function_call`) are not read.
"""

from __future__ import annotations

from qprep.datasets.media import candidates, find
from qprep.datasets.record import (KINDS, MARKS, Medium, Record, RecordError, Turn, each_row, in_mark_order, listed,
                                   name_of)
from qprep.datasets.source import DataFile

SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function", "system_tag": "system"}
# Its own defaults; a bare file's other columns are read under the names its demo files give them
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None}
BARE_COLUMNS = {"system": "system", "history": "history", **{f"{kind}s": f"{kind}s" for kind in KINDS}}


def read(rows, source: DataFile, entry: dict | None = None):
    entry = entry or _bare_entry(rows)
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("sharegpt", "alpaca"):
        raise RecordError(f"formatting {formatting!r}: LLaMA-Factory has sharegpt and alpaca")
    columns = dict(entry.get("columns") or {})
    tags = {**SHAREGPT_TAGS, **(entry.get("tags") or {})}
    turns_of_row = _sharegpt_turns if formatting == "sharegpt" else _alpaca_turns
    return each_row(rows, lambda record, index: _record(record, index, turns_of_row(record, columns, tags), columns,
                                                        source))


def _bare_entry(rows) -> dict:
    """The entry a file without one is read with: sharegpt, in its default layout or (with `messages`)
    the OpenAI layout its docs give; else alpaca."""
    keys = set().union(*(r for r in rows if isinstance(r, dict))) if isinstance(rows, list) else set()
    if "messages" in keys:
        return {"formatting": "sharegpt", "columns": {**BARE_COLUMNS, "messages": "messages"}, "tags": OPENAI_TAGS}
    return {"formatting": "sharegpt" if "conversations" in keys else "alpaca", "columns": BARE_COLUMNS}


def _sharegpt_turns(record: dict, columns: dict, tags: dict) -> list[Turn]:
    messages = record.get(columns.get("messages", "conversations"))
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"no {columns.get('messages', 'conversations')!r} list")
    role, content = tags["role_tag"], tags["content_tag"]
    turns = []
    if tags.get("system_tag") and isinstance(messages[0], dict) and messages[0].get(role) == tags["system_tag"]:
        turns.append(Turn("system", _text(messages[0].get(content))))
        messages = messages[1:]
    elif columns.get("system") and record.get(columns["system"]):
        turns.append(Turn("system", _text(record[columns["system"]])))
    expected = ((tags["user_tag"], "user"), (tags["assistant_tag"], "assistant"))
    tools = (tags["observation_tag"], tags["function_tag"])
    for position, message in enumerate(messages):
        tag, name = expected[position % 2]
        said = message.get(role) if isinstance(message, dict) else None
        if said in tools:
            raise RecordError(f"role {said!r}: tool turns are not read")
        if said != tag:
            raise RecordError(f"unknown role {said!r} at turn {position} (expected {tag!r}: turns alternate "
                              f"{tags['user_tag']!r} and {tags['assistant_tag']!r})")
        turns.append(Turn(name, _text(message.get(content))))
    if len(messages) % 2:
        raise RecordError("no assistant answer to learn after the last user turn (LLaMA-Factory needs one)")
    return turns


def _alpaca_turns(record: dict, columns: dict, tags: dict) -> list[Turn]:
    names = {**ALPACA_COLUMNS, **columns}
    system = record.get(names["system"]) if names.get("system") else None
    turns = [Turn("system", _text(system))] if system else []
    history = record.get(names["history"]) if names.get("history") else None
    for pair in history or []:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RecordError(f"a history entry is {pair!r}, not [query, answer]")
        turns += [Turn("user", _text(pair[0])), Turn("assistant", _text(pair[1]))]
    query = [_text(record[names[key]]) for key in ("prompt", "query") if names.get(key) and record.get(names[key])]
    if not query:
        raise RecordError(f"no {names['prompt']!r}")
    response = record.get(names["response"])
    if not response:
        raise RecordError(f"no assistant answer to learn (no {names['response']!r})")
    return turns + [Turn("user", "\n".join(query)), Turn("assistant", _text(response))]


def _text(value) -> str:
    if not isinstance(value, str):
        raise RecordError(f"a message is {type(value).__name__}, not text")
    return value


def _record(record: dict, index: int, turns: list[Turn], columns: dict, source: DataFile):
    media = {kind: [_medium(kind, path, source) for path in listed(record.get(columns[f"{kind}s"]), f"{kind}s")]
             for kind in KINDS if columns.get(f"{kind}s")}
    if source.use_audio_in_video or _audio_repeats_video(media):
        turns, media = _paired(turns, media)
    return Record(name_of(record, index), index, turns, in_mark_order(turns, media))


def _medium(kind: str, path, source: DataFile) -> Medium:
    if not isinstance(path, str):
        raise RecordError(f"a {kind} is {path!r}, not a path")
    return find(Medium(kind, path), candidates(path, source.root, None))


def _audio_repeats_video(media: dict) -> bool:
    """`audios` listing the `videos` again: the videos' own sound (LLaMA-Factory's use_audio_in_video data)."""
    videos, audios = media.get("video", []), media.get("audio", [])
    return bool(videos) and [m.path for m in videos] == [m.path for m in audios]


def _paired(turns: list[Turn], media: dict) -> tuple[list[Turn], dict]:
    videos, audios = media.get("video", []), media.get("audio", [])
    if len(videos) != len(audios):
        raise RecordError(f"use_audio_in_video: {len(videos)} videos and {len(audios)} audios (one each)")
    return [Turn(turn.role, _audio_taken(turn.text)) for turn in turns], {**media, "audio": []}


def _audio_taken(text: str) -> str:
    """`text` without the `<audio>` tag each `<video>` takes: the first one after it (its plugin's rule)."""
    video, audio = MARKS["video"], MARKS["audio"]
    at = text.find(video)
    while at != -1:
        taken = text.find(audio, at)
        if taken == -1:
            raise RecordError(f"use_audio_in_video: a {video} with no {audio} after it")
        text = text[:taken] + text[taken + len(audio):]
        at = text.find(video, at + len(video))
    if audio in text:
        raise RecordError(f"use_audio_in_video: an {audio} tag before any {video}")
    return text
