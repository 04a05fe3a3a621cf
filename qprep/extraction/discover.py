"""Finding the media files, naming them, and assigning each to its shard.

A file's kind follows from its extension: videos (`--videos` takes only these), and with `--media`
also images (`IMAGE_EXTENSIONS`) and, for a model with an audio tower, audio files (`AUDIO_EXTENSIONS`).
Its id is the form training data refers to media by (`qprep.datasets.media.cache_id`): its path
relative to the folder without the extension (`clips/a.mp4` → `clips/a`), an audio file's with it
(`talks/a.mp3`: datasets keep a video's track beside it under the video's stem). Its shard is a stable
hash of the relative path modulo the store's shard count, so adding a video touches one shard and
nothing else.

Links are followed where they lead inside the videos directory; links leading out of it only when
asked (`follow_links`), since the store is a cache of that directory. A link back up into a folder
that holds it is never followed (the walk would not end), nor is anything that is not a regular
file (opening a named pipe blocks). What is passed over is reported with the reason, never
silently dropped. A name that is not valid UTF-8 cannot be an id (ids and the manifest are text):
such a file gets a failed row whose id shows the undecodable bytes as `\\xNN`, and is never opened.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from qprep.errors import SettingsError
from qprep.schemas.manifest import ManifestRow

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".wmv",
    ".3gp", ".ogv",
})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".m4a"})
HASH_BLOCK = 1 << 22


@dataclass(frozen=True)
class VideoFile:
    """A store entry to extract: a media file found in the folder (a video unless `kind` says
    otherwise), or a window of a video file (`window_start` set). Every entry of one file has the
    file's path, size, mtime and shard."""

    id: str
    path: str  # relative, '/'-separated
    size: int
    mtime_ns: int
    shard: int
    bad_name: str = ""  # why the name cannot be recorded as it is: the file is recorded failed, never opened
    kind: str = "video"  # settings.MEDIA_KINDS
    window_start: float | None = None  # seconds; None: the whole file
    window_end: float | None = None  # seconds; None: to the end
    file: str = ""  # where the file is, when not the media folder / `path` (a dataset's file found elsewhere)

    def location(self, media_dir: str | Path) -> Path:
        """The file to read."""
        return Path(self.file) if self.file else Path(media_dir) / self.path


@dataclass
class Discovery:
    videos: list[VideoFile]  # sorted by id
    skipped: list[tuple[str, str]]  # (relative path, why it was not read)


def discover(videos_dir: str | Path, shard_count: int, follow_links: bool = False,
             kinds: tuple[str, ...] = ("video",)) -> list[VideoFile]:
    """Every media file of `kinds` under `videos_dir` (recursively, hidden entries skipped), sorted by id."""
    return find_videos(videos_dir, shard_count, follow_links, kinds).videos


def find_videos(videos_dir: str | Path, shard_count: int, follow_links: bool = False,
                kinds: tuple[str, ...] = ("video",), refused: dict[str, str] | None = None) -> Discovery:
    """The media files of `kinds` under `videos_dir`, and what was passed over and why (`refused`:
    kinds found but not taken, with the reason each such file is listed under)."""
    root = Path(videos_dir)
    if not root.is_dir():
        raise SettingsError(f"--{'videos' if kinds == ('video',) else 'media'} {root}: not a directory")
    walk = _Walk(root, follow_links, kinds, refused or {})
    found: dict[str, VideoFile] = {}
    for entry in walk.files():
        relative = Path(entry.path).relative_to(root).as_posix()
        try:
            stat = entry.stat()
        except OSError as exc:  # gone since the folder was listed
            walk.skip(entry, f"cannot stat: {exc.strerror or exc}")
            continue
        kind = media_kind(entry.name)
        if kind in walk.refused:
            walk.skip(entry, walk.refused[kind])
            continue
        shown, bad_name = _text_name(relative)
        video = VideoFile(id=media_id(shown, kind), path=shown, size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                          shard=shard_of(shown, shard_count), bad_name=bad_name, kind=kind)
        other = found.get(video.id)
        if other is not None:
            raise SettingsError(f"{root}: {other.path} and {video.path} would share the id {video.id!r}; "
                                "rename one of them")
        found[video.id] = video
    return Discovery([found[key] for key in sorted(found)], sorted(walk.skipped))


def shard_of(relative_path: str, shard_count: int) -> int:
    """Stable across runs, machines and Python versions (unlike hash())."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shard_count


def content_hash(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# How a file on disk stands against the manifest row of its last extraction (`file_state`)
UNCHANGED = "unchanged"  # same size and mtime: taken as the same file, never read
TOUCHED = "touched"  # same size, another mtime (a `touch`, a copy): its bytes' sha256 decides
CHANGED = "changed"  # another size: changed, whatever its bytes


def file_state(row: ManifestRow, size: int, mtime_ns: int) -> str:
    """The rule every reader of the manifest applies (extract's plan, `status`, `verify`): what a
    file of this size and mtime is to its row, without reading it."""
    if size != row.size:
        return CHANGED
    return UNCHANGED if mtime_ns == row.mtime_ns else TOUCHED


def same_content(path: str | Path, row: ManifestRow) -> bool:
    """Whether a touched file still holds the bytes its row was extracted from."""
    return content_hash(path) == row.content_hash


def media_kind(name: str) -> str | None:
    """The kind of media a file name says it holds (its extension), or None."""
    extension = os.path.splitext(name)[1].lower()
    for kind, extensions in (("video", VIDEO_EXTENSIONS), ("image", IMAGE_EXTENSIONS), ("audio", AUDIO_EXTENSIONS)):
        if extension in extensions:
            return kind
    return None


def media_id(relative: str, kind: str) -> str:
    """The id of a file found at `relative` (see the module's docstring)."""
    return relative if kind == "audio" else str(PurePosixPath(relative).with_suffix(""))


def _text_name(relative: str) -> tuple[str, str]:
    """(the name as text, why it is not faithful). Undecodable bytes come from the file system as
    lone surrogates, which no UTF-8 writer (Parquet, JSON files, terminals) takes."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(relative).decode("utf-8", "backslashreplace")
        return shown, ("the file name is not valid UTF-8 (its undecodable bytes are shown as \\xNN); "
                       "rename it to extract it")
    return relative, ""


class _Walk:
    """A depth-first walk that follows links by the module's rules and records what it passes over."""

    def __init__(self, root: Path, follow_links: bool, kinds: tuple[str, ...] = ("video",),
                 refused: dict[str, str] | None = None):
        self.root = root
        self.real_root = os.path.realpath(root)
        self.follow_links = follow_links
        self.kinds = kinds
        self.refused = refused or {}  # kind → why its files are listed as passed over
        self.skipped: list[tuple[str, str]] = []

    def wanted(self, name: str) -> bool:
        kind = media_kind(name)
        return kind in self.kinds or kind in self.refused

    def files(self):
        # Each folder travels with the identities of the folders above it: a link to one of them
        # is a loop. Only ancestors are refused, so a folder reached by two paths (a link inside
        # the directory) is walked under both, and ids never depend on the order of the walk.
        stack = [(self.root, frozenset({_identity(os.stat(self.root))}))]
        while stack:
            directory, above = stack.pop()
            for entry in self._entries(directory):
                if entry.name.startswith(".") or not self._may_enter(entry):
                    continue
                kind = _kind(entry)
                if kind == "dir":
                    identity = _identity(entry.stat())
                    if identity in above:
                        self.skip(entry, "a link to a folder that holds it (a loop); not followed")
                    else:
                        stack.append((Path(entry.path), above | {identity}))
                elif not self.wanted(entry.name):
                    continue
                elif kind == "file":
                    yield entry
                elif kind == "special":
                    self.skip(entry, "not a regular file (a pipe, socket or device is never read)")
                else:
                    self.skip(entry, kind)

    def skip(self, path: str | os.PathLike, why: str) -> None:
        """Record a path under the videos directory that was not read, and why."""
        relative = Path(path).relative_to(self.root).as_posix()
        self.skipped.append((_text_name(relative)[0], why))

    def _entries(self, directory: Path) -> list[os.DirEntry]:
        try:
            with os.scandir(directory) as entries:
                return list(entries)
        except OSError as exc:
            if directory == self.root:
                raise SettingsError(f"--videos {self.root}: cannot list it ({exc.strerror or exc})") from None
            self.skip(directory, f"cannot list this folder: {exc.strerror or exc}")
            return []

    def _may_enter(self, entry: os.DirEntry) -> bool:
        """Whether to look at where an entry leads: always for plain entries and links that stay
        inside the videos directory; links leading out of it only when asked."""
        if self.follow_links or not entry.is_symlink():
            return True
        target = os.path.realpath(entry.path)
        if Path(target).is_relative_to(self.real_root):
            return True
        if os.path.isdir(target) or self.wanted(entry.name):
            self.skip(entry, f"a link to {_text_name(target)[0]}, outside the videos folder; "
                             "not followed (--follow-links follows it)")
        return False


def _kind(entry: os.DirEntry) -> str:
    """'dir', 'file', 'special' (pipe, socket, device), or why the entry cannot be resolved."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
        os.stat(entry.path)
    except FileNotFoundError:
        return "a link to nothing (its target is missing)"
    except OSError as exc:  # ELOOP: links that lead to each other
        return f"cannot resolve it: {exc.strerror or exc}"
    return "special"


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino
