"""`qprep status`: what a store holds and what a re-run would do, without touching any video."""

from __future__ import annotations

from pathlib import Path

from qprep.schemas import manifest as columns
from qprep.schemas.dtypes import storage_dtype
from qprep.schemas.manifest import FAILED, OK
from qprep.store.layout import SPAN, Store


def store_status(path: str | Path, videos: str | Path | None = None) -> dict:
    """Counts, sizes and config of a store; with a videos directory (default: the last run's),
    also how many entries a re-run would extract or drop (compared by size and mtime only): the
    folder's files not in the store, and the entries (whole files, windows) of files that changed
    or failed; entries whose file is gone."""
    from qprep.extraction.discover import UNCHANGED, discover, file_state

    store = Store.open(path)
    manifest = store.manifest()
    last_run = store.last_run()
    videos = videos or last_run.videos
    report = {
        "store": str(store.root),
        "model": store.attrs["model"],
        "dtype": store.attrs["dtype"],
        "fingerprint": store.fingerprint,
        "settings": store.attrs["config"]["settings"],
        "shards": {"committed": len(store.shard_files()), "count": store.shard_count},
        "videos": {"ok": columns.count(manifest, OK), "failed": columns.count(manifest, FAILED), "pending": None,
                   "gone": None},
        "kinds": columns.count_by_kind(manifest),  # entries extracted ok, by kind
        "windows": columns.count_windows(manifest),  # of the videos: windows of a file, not whole files
        "tokens": {span: columns.token_rows(manifest, span) for span in columns.SPANS},
        "deepstack_levels": store.deepstack_levels,
        "level": store.level,
        "bytes_per_token": _bytes_per_token(store),
        "token_bytes": _token_bytes(store, manifest),
        "bytes": store.size_bytes(),
        "videos_dir": str(videos) if videos else None,
        "failures": [{"path": row.path, "code": row.error_code, "error": (row.error or "").splitlines()[0]}
                     for row in columns.with_status(manifest, FAILED)],
        "last_run": last_run.summary,
    }
    if videos and Path(videos).is_dir():
        kinds = tuple(store.attrs["config"]["settings"].get("kinds", ("video",)))
        on_disk = {video.path: video for video in
                   discover(videos, store.shard_count, follow_links=last_run.follow_links, kinds=kinds)}
        rows = columns.rows_of(manifest)
        held = {row.id for row in rows}
        # every entry of a file (the whole file, its windows) is judged by that file
        stale = sum(1 for row in rows if (video := on_disk.get(row.path)) is not None
                    and (not row.ok or file_state(row, video.size, video.mtime_ns) != UNCHANGED))
        report["videos"]["pending"] = stale + sum(1 for video in on_disk.values() if video.id not in held)
        report["videos"]["gone"] = sum(1 for row in rows if row.path not in on_disk)
    return report


def format_status(report: dict) -> str:
    videos, tokens = report["videos"], report["tokens"]
    mixed = bool(set(report.get("kinds", {})) - {"video"})  # images beside the videos: say media, not videos
    pending = "unknown (no videos directory)" if videos["pending"] is None else \
        f"{videos['pending']} to extract, {videos['gone']} gone from {report['videos_dir']}"
    settings = ", ".join(f"{k}={v}" for k, v in report["settings"].items() if v is not None)
    lines = [
        f"store        {report['store']}",
        f"model        {report['model']} ({report['dtype']})",
        f"fingerprint  {report['fingerprint'][:16]}",
        f"settings     {settings}",
        f"shards       {report['shards']['committed']} committed of {report['shards']['count']}",
        f"{'media' if mixed else 'videos':13}{videos['ok']} ok, {videos['failed']} failed; pending: {pending}",
        *([f"kinds        " + ", ".join(f"{count} {kind}{'s' if count != 1 else ''}"
                                        for kind, count in report["kinds"].items())
           + (f" ({report['windows']} of the videos are windows of a file)" if report["windows"] else "")]
          if set(report["kinds"]) - {"video"} or report["windows"] else []),
        f"tokens       {tokens['video']} {'visual' if mixed else 'video'}, {tokens['audio']} audio",
        f"size         {report['bytes'] / 1e6:.1f} MB",
        f"level        {report['level']}; bytes per merged visual token: "
        + ", ".join(f"{size:,} {level}" for level, size in report["bytes_per_token"].items()),
    ]
    arrays = report["token_bytes"]
    if report["deepstack_levels"]:
        per_video = sum(arrays.values()) / max(videos["ok"], 1)
        ratio = arrays["deepstack"] / max(arrays["video"], 1)
        lines.append("arrays       " + ", ".join(f"{kind} {size / 1e6:.1f} MB" for kind, size in arrays.items())
                     + f" ({report['deepstack_levels']} deepstack levels: {ratio:.0f}× the merged tokens; "
                     f"{per_video / 1e6:.2f} MB per video)")
    for failure in report["failures"][:10]:
        lines.append(f"failed       {failure['path']}: {failure['error']}")
    if len(report["failures"]) > 10:
        lines.append(f"             ... and {len(report['failures']) - 10} more (--json lists all)")
    return "\n".join(lines)


def _bytes_per_token(store: Store) -> dict[str, int]:
    """What one merged visual token costs at each level (deepstack levels included): the merged
    tokens' width, or merge² rows of the vision width (the merger's input)."""
    from qprep.models.families import FAMILIES
    from qprep.schemas.towers import MERGED, MERGER_INPUT

    model = store.attrs["config"]["model"]
    unit, width = FAMILIES[model["family"]].merger_input_shape(model["towers"]["vision_config"])
    per_value = storage_dtype(store.attrs["dtype"]).itemsize * (1 + store.deepstack_levels)
    return {MERGED: store.hidden_size * per_value, MERGER_INPUT: unit * width * per_value}


def _token_bytes(store: Store, manifest) -> dict[str, int]:
    """Bytes of each token array over the committed rows (what the kinds cost, apart)."""
    import numpy as np

    item = storage_dtype(store.attrs["dtype"]).itemsize
    out = {}
    for kind in store.kinds():
        rows = columns.token_rows(manifest, SPAN[kind])
        out[kind] = rows * int(np.prod(store.row_shape(kind))) * item
    return out
