"""qprep's own records, read as they always were: `{"id", "conversations": [{"from", "value"}],
"media": [cache ids]}` (see `qprep.train.data`). The ids are the cache's own: nothing to resolve."""

from __future__ import annotations

from qprep.errors import SettingsError


def read(records, path) -> list[dict]:
    """The records, each checked for a conversation and what names its media; a malformed one
    stops the whole file (the form qprep writes itself, so a bad record is a bad file)."""
    if not isinstance(records, list):
        raise SettingsError(f"--data {path}: expected a JSON list of {{id, conversations}} records")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise SettingsError(f"--data {path}: record {index} lacks a conversations list")
        media = record.get("media")
        if media is None and "id" not in record:
            raise SettingsError(f"--data {path}: record {index} has neither an id (its video) nor a media list")
        if media is not None and not (isinstance(media, list) and all(isinstance(m, str) for m in media)):
            raise SettingsError(f"--data {path}: record {index}: media must be a list of cached ids")
    return records
