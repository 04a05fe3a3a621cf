"""Which format a data file is written in, from its content (and a LLaMA-Factory
`dataset_info.json` naming it). Rules, first match wins:

* named by a `dataset_info.json` (or being one): `llamafactory`;
* an object whose values hold `timestamps` and `sentences`, or a list of such records: `grounding`
  (Charades-STA, ActivityNet);
* a list of records with `timestamp` and `sentence`: `time-r1`;
* records with `instruction` and `output`: `llamafactory` (alpaca);
* `messages` whose content is a list of typed blocks: `blocks`; other `messages`: `swift`;
* `conversations` with `meta`: `longvale`; with `image`/`video`: `llava`; with
  `images`/`videos`/`audios`: `llamafactory` (its default sharegpt layout); with none of these:
  `qprep` (its own records, ids the cache's), as is an empty list.

The keys are looked for over all records, so a file whose first records are text-only is still
recognized by its others.
"""

from __future__ import annotations

FORMATS = ("qprep", "llamafactory", "swift", "llava", "blocks", "longvale", "grounding", "time-r1")


def detect(content) -> str | None:
    """The format of a parsed file, or None when nothing fits."""
    if isinstance(content, dict):
        values = list(content.values())
        if values and all(isinstance(v, dict) and "timestamps" in v and "sentences" in v for v in values):
            return "grounding"
        return None
    if not isinstance(content, list):
        return None
    rows = [row for row in content if isinstance(row, dict)]
    if not rows:
        return "qprep"  # an empty list: nothing to train on, which training then says
    keys = set().union(*rows)
    if {"timestamps", "sentences"} <= keys:
        return "grounding"
    if {"timestamp", "sentence"} <= keys:
        return "time-r1"
    if {"instruction", "output"} <= keys:
        return "llamafactory"
    if "messages" in keys:
        return "blocks" if any(_has_blocks(row.get("messages")) for row in rows) else "swift"
    if "conversations" in keys:
        if "meta" in keys:
            return "longvale"
        if keys & {"image", "video"}:
            return "llava"
        if keys & {"images", "videos", "audios"}:
            return "llamafactory"
        return "qprep"
    return None


def _has_blocks(messages) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages)
