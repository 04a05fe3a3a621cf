"""What a run has to do: compare the videos on disk with the store's manifest, shard by shard.

Per video: same size and mtime as its committed row → kept as is; same size, new mtime → re-hashed,
and kept (only its mtime updated) when the bytes are unchanged; anything else, new videos and
failed ones → extracted. Committed rows whose file is gone are dropped. A shard with none of that
is skipped outright; nothing is decoded to find out.
"""

from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from qprep.extraction.discover import CHANGED, TOUCHED, VideoFile, file_state, same_content
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


def make_plan(videos: list[VideoFile], manifest: pa.Table, videos_dir: str | Path, hash_threads: int = 8) -> Plan:
    committed = {row.id: row for row in rows_of(manifest)}
    keys = {row.shard: row.shard_key for row in committed.values()}
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
    on_disk = {video.id for video in videos}
    for video_id, row in committed.items():
        if video_id not in on_disk:
            plan_for(row.shard).removed.append(video_id)

    root = Path(videos_dir)
    with ThreadPoolExecutor(max_workers=hash_threads) as pool:  # hashlib releases the GIL
        same = list(pool.map(lambda item: _same_or_false(root / item[0].path, item[1]), rehash))
    for (video, row), unchanged in zip(rehash, same):
        if unchanged:
            plan_for(video.shard).keep.append(dataclasses.replace(row, mtime_ns=video.mtime_ns))
            plans[video.shard].touched += 1
            up_to_date += 1
        else:
            plan_for(video.shard).extract.append(video)

    changed = {shard: plans[shard] for shard in sorted(plans) if plans[shard].changed}
    return Plan(shards=changed, videos=len(videos), up_to_date=up_to_date)


def shard_key(fingerprint: str, members: list[ManifestRow]) -> str:
    """hash(fingerprint, each member's path, content hash and status): equal keys, equal arrays."""
    digest = hashlib.sha256(fingerprint.encode())
    for row in sorted(members, key=lambda r: r.path):
        digest.update(f"\0{row.path}\0{row.content_hash or ''}\0{row.status}".encode())
    return digest.hexdigest()


def _same_or_false(path: Path, row: ManifestRow) -> bool:
    try:
        return same_content(path, row)
    except OSError:  # gone or unreadable since it was found: extracted again, and recorded if it fails
        return False
