"""Finding the videos, naming them, and assigning each to its shard.

A video's id is its path relative to the videos directory without the extension (`clips/a.mp4` →
`clips/a`), the form training data refers to videos by. Its shard is a stable hash of the relative
path modulo the store's shard count, so adding a video touches one shard and nothing else.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from qprep.errors import SettingsError

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".wmv",
    ".3gp", ".ogv",
})
HASH_BLOCK = 1 << 22


@dataclass(frozen=True)
class VideoFile:
    id: str
    path: str  # relative, '/'-separated
    size: int
    mtime_ns: int
    shard: int


def discover(videos_dir: str | Path, shard_count: int) -> list[VideoFile]:
    """Every video file under `videos_dir` (recursively, hidden entries skipped), sorted by id."""
    root = Path(videos_dir)
    if not root.is_dir():
        raise SettingsError(f"--videos {root}: not a directory")
    found: dict[str, VideoFile] = {}
    for entry in _walk(root):
        relative = PurePosixPath(Path(entry.path).relative_to(root).as_posix())
        stat = entry.stat()
        video = VideoFile(id=str(relative.with_suffix("")), path=str(relative), size=stat.st_size,
                          mtime_ns=stat.st_mtime_ns, shard=shard_of(str(relative), shard_count))
        other = found.get(video.id)
        if other is not None:
            raise SettingsError(f"{root}: {other.path} and {video.path} would share the id {video.id!r}; "
                                "rename one of them")
        found[video.id] = video
    return [found[key] for key in sorted(found)]


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


def _walk(root: Path):
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=True) and os.path.splitext(entry.name)[1].lower() in VIDEO_EXTENSIONS:
                    yield entry
