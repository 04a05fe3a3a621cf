"""Datasets as they are published, read as their own projects read them.

One call, `load(source)`, reads a file in any of `detect.FORMATS` and returns qprep's plain records
(`{"id", "conversations", "media": [cache ids]}`, `<video>`/`<image>`/`<audio>` marking each
medium's place), which `qprep.train.data.build_dataset` and `qprep.train.infer.choose_requests` take
whatever the file's format. On the way each record is a `record.Record`: its turns, and its media
as the dataset names them (kind, path, window, sampling). A record that cannot be used is left
out with its cause in `Records.skipped`, before any work, and the others go on.

One module per format; `media` alone knows where files are and what id the store gives each one.
"""

from __future__ import annotations

from pathlib import Path

from qprep.datasets import blocks, grounding, llamafactory, llava, longvale, plain, swift
from qprep.datasets.detect import FORMATS, detect
from qprep.datasets.media import cache_id
from qprep.datasets.record import Failure, Record, RecordError
from qprep.datasets.source import DataFile, dataset_info_entry, read_rows
from qprep.datasets.times import UNITS
from qprep.errors import SettingsError

__all__ = ["DataFile", "FORMATS", "Records", "load", "parse", "read_records", "cache_id"]


READERS = {"llamafactory": llamafactory.read, "swift": swift.read, "llava": llava.read, "blocks": blocks.read,
           "longvale": longvale.read, "grounding": grounding.read, "time-r1": grounding.read_list}


class Records(list):
    """Plain records (a list of dicts), with the ones left out: `skipped` maps "file: cause" to the
    records' names ("record 3 (cooking/a)")."""

    def __init__(self, records=(), skipped: dict[str, list[str]] | None = None):
        super().__init__(records)
        self.skipped = skipped or {}


def load(source: DataFile | str | Path) -> Records:
    """The file's records in qprep's plain form (see the module's docstring)."""
    source = source if isinstance(source, DataFile) else DataFile(Path(source))
    content, reader, path = parse(source)
    if reader == "qprep":
        return Records(plain.read(content, path))
    records, skipped, settings = Records(), {}, {}
    for item in read_records(source, content, reader):
        usable = _usable(item, source, settings) if isinstance(item, Record) else item
        if isinstance(usable, Failure):
            skipped.setdefault(f"{path}: {usable.cause}", []).append(usable.name)
        else:
            records.append(usable)
    records.skipped = skipped
    return records


def read_records(source: DataFile, content=None, reader: str | None = None):
    """The file's `Record`s and `Failure`s, in file order (any format but qprep's own)."""
    if content is None:
        content, reader, _ = parse(source)
    if reader not in READERS:
        raise SettingsError(f"--data {source.path}: {reader} records are read by `load` as they stand")
    try:
        if reader == "llamafactory":
            found = dataset_info_entry(source.path)
            return list(llamafactory.read(content, source, found[1] if found else None))
        return list(READERS[reader](content, source))
    except RecordError as exc:  # the file as a whole is not what the format expects
        raise SettingsError(f"--data {source.path} ({reader}): {exc}") from exc


def parse(source: DataFile):
    """The parsed content of the data file, its format (given, or detected) and its path (the data
    file a `dataset_info.json` names, or the file itself)."""
    if source.format is not None and source.format not in FORMATS:
        raise SettingsError(f"--format {source.format}: expected one of {', '.join(FORMATS)}")
    if source.times not in UNITS:
        raise SettingsError(f"time units {source.times!r}: expected one of {', '.join(UNITS)}")
    path = source.path
    described = dataset_info_entry(path)
    if described:
        path = described[0]
        source_format = source.format or "llamafactory"
    else:
        source_format = source.format
    content = read_rows(path)
    found = source_format or detect(content)
    if found is None:
        raise SettingsError(f"--data {source.path}: not a format qprep reads ({', '.join(FORMATS)}); "
                            f"pass --format to name it")
    return content, found, path


def _usable(record: Record, source: DataFile, settings: dict) -> dict | Failure:
    """`record` as a plain record, or the reason it cannot be used: a medium not found (when the
    files are checked), an id the store cannot name, or a medium asked at other settings than an
    earlier record asked the same one (the store holds one entry per id)."""
    name = record.label
    try:
        ids = [cache_id(medium, source.root) for medium in record.media]
    except RecordError as exc:
        return Failure(name, str(exc))
    missing = next((m for m in record.media if m.file is None), None) if source.check_files else None
    if missing is not None:
        return Failure(name, f"missing file: {missing.path} (looked for {' and '.join(missing.looked)})")
    asked = {}
    for medium, medium_id in zip(record.media, ids):
        earlier = asked.setdefault(medium_id, settings.get(medium_id, medium.sampling))
        if earlier != medium.sampling:
            return Failure(name, f"{medium_id} asked with {medium.sampling or 'the store settings'} after "
                                 f"{earlier or 'the store settings'} (one cache entry per medium)")
    settings.update(asked)  # only once the record is used: one left out asks nothing
    return {"id": record.name, "conversations": [{"from": turn.role, "value": turn.text} for turn in record.turns],
            "media": ids}
