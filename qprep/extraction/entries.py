"""The entries a run names, and what it keeps of the store's other entries.

An entry is one medium: a video file, an image file, or a window of a video file (`window_start`,
`window_end` seconds; its id is the file's id with a Media Fragments suffix, `cooking/a#t=12.5,30`,
as `qprep.datasets.media.cache_id` names it). Every entry of a file lives in the shard of the
file's path, so a changed file re-extracts all its entries at once (`qprep.extraction.plan`).

* `--videos DIR` / `--media DIR` (`folder_entries`): the whole-file entry of every file found; a
  window the store holds of a file still in DIR is kept (and re-extracted with its file); entries
  whose file is gone are removed.
* `--data FILE` (`dataset_entries`): exactly the media the dataset names (whole videos, images,
  windows), each once however many records name it, ids as training reads them. A whole file the
  store holds and no record names is kept while its file is unchanged in the media folder (it is
  what a `--videos` run of that folder holds); anything else no record names is removed, never
  extracted: a window, a failed entry, an entry whose file changed or is gone. Media that cannot be
  found are listed (record, path, where it looked) and left out, as are media that cannot be
  extracted as named: audio files for a model without an audio tower, and a medium asking its own
  sampling settings (content blocks' `fps`, `max_pixels`, ...) other than the run's (the store's
  fingerprint holds one set of settings).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from qprep.errors import SettingsError
from qprep.extraction.discover import UNCHANGED, VideoFile, file_state, find_videos, media_kind, shard_of
from qprep.schemas.manifest import ManifestRow



def no_audio_tower(model: str) -> str:
    """Why an audio file is not extracted for `model`."""
    return f"an audio file, and model {model} has no audio tower to encode it"


@dataclass
class Missing:
    """A medium a record names that is not extracted: not found, or not extractable as named (`why`)."""

    record: str  # "record 3 (cooking/a)"
    path: str  # as the dataset writes it
    looked: tuple[str, ...]  # where it was looked for
    why: str = "not found"

    def line(self) -> str:
        where = f" (looked for {' and '.join(self.looked)})" if self.looked else ""
        return f"{self.record}: {self.path}: {self.why}{where}"


@dataclass
class Named:
    """What a run names: its entries (shards not yet assigned: `with_shards`), and what the
    dataset's records could not give."""

    root: Path  # the media folder: entries' paths are relative to it
    entries: list[VideoFile]
    unnamed: Callable[[ManifestRow], VideoFile | None]  # a committed entry not named: kept as (None: removed)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why): links not followed, pipes, ...
    missing: list[Missing] = field(default_factory=list)
    left_out: dict[str, list[str]] = field(default_factory=dict)  # records the reader could not use: cause → names
    records: int = 0  # records read (a dataset)

    @property
    def kinds(self) -> set[str]:
        return {entry.kind for entry in self.entries}

    def with_shards(self, shard_count: int) -> list[VideoFile]:
        """The entries, each in the shard of its file's path."""
        return [dataclasses.replace(entry, shard=shard_of(entry.path, shard_count)) for entry in self.entries]


# ---- a folder ---------------------------------------------------------------------------------------

def folder_entries(folder: str | Path, shard_count: int, follow_links: bool, kinds: tuple[str, ...],
                   refused: dict[str, str] | None = None) -> Named:
    """`refused`: kinds whose files are listed as passed over, with the reason (`find_videos`)."""
    found = find_videos(folder, shard_count, follow_links, kinds, refused)
    by_path = {video.path: video for video in found.videos}

    def unnamed(row: ManifestRow) -> VideoFile | None:
        """A window of a file still in the folder is kept; anything else not found is gone."""
        video = by_path.get(row.path)
        if not row.window or video is None or video.kind != "video":
            return None
        return dataclasses.replace(video, id=row.id, window_start=row.window_start, window_end=row.window_end)

    return Named(Path(folder), found.videos, unnamed, skipped=found.skipped)


# ---- a dataset --------------------------------------------------------------------------------------

def dataset_entries(source, settings=None, refused: dict[str, str] | None = None) -> Named:
    """The media `source` (a `qprep.datasets.DataFile`) names, as entries (see the module's docstring);
    `settings`: the run's `VideoSettings` (None: its defaults), which every entry is extracted with;
    `refused`: kinds not extracted (audio files, for a model without an audio tower), with the reason."""
    from qprep.schemas.settings import VideoSettings

    from qprep.datasets import parse
    from qprep.datasets.record import Failure

    content, reader, path = parse(source)
    root = source.root
    if not root.is_dir():
        raise SettingsError(f"--media-dir {root}: not a directory")
    named = Named(root, [], _whole_files_in(root))
    items = dataset_records(source, content, reader)
    entries: dict[str, tuple[VideoFile, str, Path]] = {}  # id → (entry, the first record naming it, its file)
    for item in items:
        named.records += 1
        if isinstance(item, Failure):
            named.left_out.setdefault(f"{path}: {item.cause}", []).append(item.name)
            continue
        for medium in item.media:
            _add(named, entries, item.label, medium, root, settings or VideoSettings(), refused or {})
    named.entries = [entries[key][0] for key in sorted(entries)]
    return named


def _add(named: Named, entries: dict, record: str, medium, root: Path, settings, refused: dict[str, str]) -> None:
    """One medium of a record: an entry (once per id), or a line of `missing`."""
    from qprep.datasets.media import cache_id
    from qprep.datasets.record import RecordError

    if medium.kind in refused:
        named.missing.append(Missing(record, medium.path, (), refused[medium.kind]))
        return
    if asked := own_sampling(medium.sampling, settings):
        named.missing.append(Missing(record, medium.path, (), (
            f"asks {', '.join(asked)}, which this run does not extract with (the store holds one set of "
            "settings: pass them as flags, e.g. --fps, --num-frames, --max-pixels, or drop them from the record)")))
        return
    if medium.file is None:
        named.missing.append(Missing(record, medium.path, medium.looked))
        return
    try:
        entry_id = cache_id(medium, root)
    except RecordError as exc:
        named.missing.append(Missing(record, medium.path, (), str(exc)))
        return
    earlier = entries.get(entry_id)
    if earlier is not None:  # named again (forty questions about one clip): one entry
        if Path(earlier[2]) != Path(medium.file) and not _same_file(earlier[2], medium.file):
            raise SettingsError(f"{earlier[1]} and {record} name two files under one id {entry_id!r}: "
                                f"{earlier[2]} and {medium.file}; rename one of them")
        return
    try:
        entries[entry_id] = (_entry(entry_id, medium, root), record, medium.file)
    except OSError as exc:  # gone since it was found
        named.missing.append(Missing(record, medium.path, (), f"cannot read it: {exc.strerror or exc}"))


def own_sampling(sampling: dict, settings) -> list[str]:
    """The qwen-vl-utils keys a medium sets to other values than the run's settings (`key=value`)."""
    size = settings.size or (None, None)
    runs = {"fps": settings.fps, "nframes": settings.num_frames, "min_frames": settings.min_frames,
            "max_frames": settings.max_frames, "min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels,
            "resized_height": size[0], "resized_width": size[1]}  # total_pixels: no run setting
    return [f"{key}={value}" for key, value in sampling.items() if runs.get(key) is None or runs[key] != value]


def _entry(entry_id: str, medium, root: Path) -> VideoFile:
    """The entry of a found medium: its path under the media folder (as the id names it), its
    file's size and mtime, its window."""
    from qprep.datasets.media import relative_path

    file = Path(medium.file)
    if medium.by_id:  # found as root/{id}.ext: the path is the file's
        path = file.relative_to(root).as_posix()
    else:
        written = relative_path(medium.path, root)
        path = str(written) if written.suffix else f"{written}{file.suffix}"
    stat = file.stat()
    elsewhere = file != root / path and not _same_file(root / path, file)
    window = medium.window
    return VideoFile(id=entry_id, path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns, shard=0,
                     kind=medium.kind, window_start=float(medium.start or 0.0) if window else None,
                     window_end=float(medium.end) if window and medium.end is not None else None,
                     file=str(file.resolve()) if elsewhere else "")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _whole_files_in(root: Path) -> Callable[[ManifestRow], VideoFile | None]:
    def unnamed(row: ManifestRow) -> VideoFile | None:
        """A whole file extracted ok and unchanged in the media folder (same size and mtime) is kept;
        anything else no record names is removed, never extracted: a window, a failed entry, an
        entry whose file changed or is gone (a `--videos`/`--media` run extracts such a file again)."""
        if row.window or not row.ok:
            return None
        try:
            stat = (root / row.path).stat()
        except (OSError, ValueError):
            return None
        if file_state(row, stat.st_size, stat.st_mtime_ns) != UNCHANGED:
            return None
        return VideoFile(id=row.id, path=row.path, size=stat.st_size, mtime_ns=stat.st_mtime_ns, shard=row.shard,
                         kind=row.kind)

    return unnamed


def dataset_records(source, content, reader: str):
    """The records (or the readers' `Failure`s) of a parsed data file, each with its media: qprep's
    own records resolved by cache id, a published format through its reader."""
    from qprep.datasets import read_records

    return _plain_records(content, source.root) if reader == "qprep" else read_records(source, content, reader)


def _plain_records(records: list[dict], root: Path):
    """qprep's own records name their media by cache id: each is found under the media folder as
    the id's path with a video or image extension, or as the id itself for an audio file (a window's
    id, its file's)."""
    from qprep.datasets.media import FRAGMENT
    from qprep.datasets.record import Medium, Record

    for index, record in enumerate(records):
        name = str(record.get("id", f"#{index}"))
        media = []
        for entry_id in record["media"] if record.get("media") is not None else [str(record.get("id"))]:
            base, _, window = entry_id.partition(FRAGMENT)
            start, end = _fragment(window) if window else (None, None)
            file = _file_of(root, base)
            looked = (f"{root / base}.{{video or image extension}}",)
            kind = media_kind(file.name) if file else "video"
            media.append(Medium(kind, entry_id if not file else str(file.relative_to(root)), file=file, start=start,
                                end=end, looked=looked))
        yield Record(name, index, [], media)


def _fragment(text: str) -> tuple[float, float | None]:
    start, _, end = text.partition(",")
    try:
        return float(start or 0), float(end) if end else None
    except ValueError:
        return None, None  # not a time range: found (or not) as a file of that name


def _file_of(root: Path, base: str) -> Path | None:
    from qprep.extraction.discover import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    if ".." in PurePosixPath(base).parts:
        return None
    if media_kind(base) == "audio" and (root / base).is_file():  # an audio file's id keeps its extension
        return root / base
    for extension in sorted(VIDEO_EXTENSIONS | IMAGE_EXTENSIONS):
        for spelled in (extension, extension.upper()):
            place = root / f"{base}{spelled}"
            if place.is_file():
                return place
    return None
