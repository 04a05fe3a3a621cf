"""What a run has to do: compare the entries it names with the store's manifest, shard by shard.

An entry is a media file or a window of a video file; all entries of a file live in the file's
shard. Per entry, by its file: same size and mtime as its committed row → kept as is; same size,
new mtime → the file re-hashed (once, however many entries it has), and kept (only its mtime
updated) when the bytes are unchanged; anything else, new entries and failed ones → extracted.
Committed rows the run does not name and does not keep (`make_plan`'s `unnamed`) are dropped. A
shard with none of that is skipped outright; nothing is decoded to find out.
"""

from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa

from qprep.extraction.discover import CHANGED, TOUCHED, VideoFile, content_hash, file_state
from qprep.schemas.manifest import ManifestRow, rows_of


@dataclass
class ShardPlan:
    shard: int
    committed_key: str | None  # the key of the shard as committed now (None: not in the store)
    keep: list[ManifestRow] = field(default_factory=list)  # committed rows carried over (tokens reused)
    extract: list[VideoFile] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # ids whose files are gone
    touched: int = 0  # kept rows whose mtime changed but whose bytes did not

    @property
    def changed(self) -> bool:
        return bool(self.extract or self.removed or self.touched)


@dataclass
class Plan:
    shards: dict[int, ShardPlan]  # only the shards that change
    videos: int  # on disk
    up_to_date: int  # videos that need no tower work (their tokens are kept)

    @property
    def tasks(self) -> list[VideoFile]:
        """Videos to extract, grouped by shard so shards complete (and free memory) one by one."""
        return [video for plan in self.shards.values() for video in plan.extract]

    @property
    def removed(self) -> int:
        return sum(len(plan.removed) for plan in self.shards.values())

    @property
    def touched(self) -> int:
        return sum(plan.touched for plan in self.shards.values())


def make_plan(videos: list[VideoFile], manifest: pa.Table, videos_dir: str | Path, hash_threads: int = 8,
              unnamed: Callable[[ManifestRow], VideoFile | None] | None = None) -> Plan:
    """The plan for bringing the store to `videos`, the entries the run names (a file may give
    several: the whole file, windows of it). A committed entry the run does not name is kept when
    `unnamed` returns what it stands for now (its file as found), else removed. Every entry of a
    file is judged by that file, so a changed file re-extracts all of them and an unchanged one none."""
    committed = {row.id: row for row in rows_of(manifest)}
    keys = {row.shard: row.shard_key for row in committed.values()}
    named = {video.id for video in videos}
    adopted = [unnamed(row) for row_id, row in committed.items() if row_id not in named] if unnamed else []
    videos = videos + [video for video in adopted if video is not None]
    plans: dict[int, ShardPlan] = {}

    def plan_for(shard: int) -> ShardPlan:
        if shard not in plans:
            plans[shard] = ShardPlan(shard=shard, committed_key=keys.get(shard))
        return plans[shard]

    rehash: list[tuple[VideoFile, ManifestRow]] = []
    up_to_date = 0
    for video in videos:
        row = committed.get(video.id)
        state = file_state(row, video.size, video.mtime_ns) if row is not None else CHANGED
        if state == CHANGED or not row.ok or row.path != video.path or row.shard != video.shard:
            plan_for(video.shard).extract.append(video)
        elif state == TOUCHED:
            rehash.append((video, row))
        else:
            plan_for(video.shard).keep.append(row)
            up_to_date += 1
    wanted = {video.id for video in videos}
    for video_id, row in committed.items():
        if video_id not in wanted:
            plan_for(row.shard).removed.append(video_id)

    same = _unchanged_files(rehash, Path(videos_dir), hash_threads)
    for video, row in rehash:
        if same[video.location(videos_dir)] == row.content_hash:
            plan_for(video.shard).keep.append(dataclasses.replace(row, mtime_ns=video.mtime_ns))
            plans[video.shard].touched += 1
            up_to_date += 1
        else:
            plan_for(video.shard).extract.append(video)

    changed = {shard: plans[shard] for shard in sorted(plans) if plans[shard].changed}
    return Plan(shards=changed, videos=len(videos), up_to_date=up_to_date)


def shard_key(fingerprint: str, members: list[ManifestRow]) -> str:
    """hash(fingerprint, each member's path, content hash and status, and a window's id): equal keys,
    equal arrays. (A whole file's id follows from its path; windows of one file differ by id.)"""
    digest = hashlib.sha256(fingerprint.encode())
    for row in sorted(members, key=lambda r: (r.path, r.id)):
        digest.update(f"\0{row.path}\0{row.content_hash or ''}\0{row.status}".encode())
        if row.window:
            digest.update(f"\0{row.id}".encode())
    return digest.hexdigest()


def _unchanged_files(rehash: list[tuple[VideoFile, ManifestRow]], root: Path, threads: int) -> dict[Path, str | None]:
    """The sha256 of each touched file, read once however many entries it has (None: unreadable)."""
    files = sorted({video.location(root) for video, _ in rehash})
    with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL
        return dict(zip(files, pool.map(_hash_or_none, files)))


def _hash_or_none(path: Path) -> str | None:
    try:
        return content_hash(path)
    except OSError:  # gone or unreadable since it was found: extracted again, and recorded if it fails
        return None
