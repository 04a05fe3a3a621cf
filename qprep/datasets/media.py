"""Where a dataset's media are, and the cache id each one has. The only module that knows either.

**Cache ids** (`cache_id`), relative to the media root (`--media-dir`, the folder `qprep extract
--videos` reads):

* a whole video file: its path under the root without the extension, `cooking/a.mp4` → `cooking/a`
  (the id `qprep extract` has always given);
* a video named by id (LongVALE, Charades-STA, ActivityNet): the id as written, `AO8RW`;
* a window of a video: the same followed by a W3C Media Fragments time range in seconds,
  `cooking/a#t=12.5,30` (`#t=12.5,` from 12.5 s to the end, `#t=0,30` the first 30 s);
* an image: the same as a video, its path under the root without the extension (`photos/cat.jpg` →
  `photos/cat`), as `qprep extract --media` names it (two files of one stem in one folder are
  refused there);
* an audio file: its path under the root with its extension, `talks/a.mp3` (LLaMA-Factory's sets keep
  a video's track beside it under the video's stem, `4.mp4` and `4.mp3`), an audio window as a video's.

A relative path as written is its own path under the root (`./a.mp4` and `a.mp4` are one medium);
an absolute path must lie under the root. The id does not depend on the file being present:
training reads the cache, not the media.

**Finding files** (`find`): each format tries its own places in its own order (`candidates`),
the first existing file wins; a medium named by id is `DIR/{id}` with one of the video
extensions `qprep extract` reads (`find_by_id`), as the LongVALE and Charades loaders look.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from qprep.datasets.record import Medium, RecordError
from qprep.extraction.discover import media_id

FRAGMENT = "#t="
REMOTE = ("http://", "https://", "s3://", "gs://", "data:")


def cache_id(medium: Medium, root: str | Path) -> str:
    """The id under which the store holds `medium` (see the module's docstring)."""
    if medium.by_id:
        name = medium.path
    else:
        name = media_id(relative_path(medium.path, root).as_posix(), medium.kind)
    return name + window_fragment(medium.start, medium.end) if medium.window else name


def window_fragment(start: float | None, end: float | None) -> str:
    """`#t=12.5,30`: Media Fragments' normal play time in seconds, shortest exact spelling."""
    return f"{FRAGMENT}{_number(start or 0.0)},{'' if end is None else _number(end)}"


def _number(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def relative_path(path: str, root: str | Path) -> PurePosixPath:
    """`path` as written, under `root`: a relative one as it stands (normalized), an absolute one
    relative to `root`. `RecordError` when it leaves the root or is remote."""
    text = _local(path)
    if Path(text).is_absolute():
        text = _under(Path(text), Path(root))
        if text is None:
            raise RecordError(f"{path} is outside the media folder {root} (pass --media-dir: the folder "
                              f"`qprep extract --videos` read)")
    parts = [part for part in PurePosixPath(text.replace("\\", "/")).parts if part not in ("", ".")]
    if not parts or ".." in parts:
        raise RecordError(f"{path!r} does not name a file under the media folder")
    return PurePosixPath(*parts)


def _under(path: Path, root: Path) -> str | None:
    """`path` relative to `root` as written (a link inside the root names its own path, as `extract`
    names it), else with both resolved (a root reached through a link); None when outside."""
    for there, base in ((Path(os.path.abspath(path)), Path(os.path.abspath(root))), (path.resolve(), root.resolve())):
        if there.is_relative_to(base):
            return there.relative_to(base).as_posix()
    return None


def _local(path: str) -> str:
    if not isinstance(path, str) or not path:
        raise RecordError(f"a medium's path is {path!r}, not a file name")
    if path.startswith("file://"):
        return path[len("file://"):]
    if path.startswith(REMOTE):
        raise RecordError(f"{path}: remote media are not fetched (download them under --media-dir)")
    return path


def candidates(path: str, *bases: Path | None) -> list[Path]:
    """The places a relative `path` is tried, in order: under each of `bases` (None: as written,
    relative to the working directory). An absolute path is itself."""
    local = Path(_local(path))
    if local.is_absolute():
        return [local]
    return [local if base is None else base / local for base in bases]


def find(medium: Medium, places: list[Path]) -> Medium:
    """`medium` with `file` set to the first of `places` that is a file (left None if none is)."""
    medium.file = next((place for place in places if place.is_file()), None)
    medium.looked = tuple(str(place) for place in places)
    return medium


def find_by_id(medium: Medium, directory: Path) -> Medium:
    """`medium` (named by id) with `file` set to `directory/{id}` with a video extension, or as
    named when the id carries one (left None when neither is a file)."""
    from qprep.extraction.discover import VIDEO_EXTENSIONS  # (its module reads the manifest's schema: not at import)

    exact = directory / medium.path
    places = [exact] if exact.suffix.lower() in VIDEO_EXTENSIONS else []
    places += [directory / f"{medium.path}{spelled}" for extension in sorted(VIDEO_EXTENSIONS)
               for spelled in (extension, extension.upper())]
    medium.file = next((place for place in places if place.is_file()), None)
    medium.looked = (f"{directory / medium.path}{{{','.join(sorted(VIDEO_EXTENSIONS))}}}",)
    return medium
