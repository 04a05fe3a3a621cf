"""`qprep extract`: a media folder (or the media a dataset names) in, store out, touching only what changed.

resolve model + settings → (a dataset: read it, list what is missing) → fingerprint → open (or
create) the store, refusing a different config → the entries the run names
(`qprep.extraction.entries`) + plan (no decoding, no Ray) → commit shards that need no towers → if
any entry needs the towers: the CPU stage → the towers (on Ray or in this process:
`qprep.extraction.executors`) → writer committing shard by shard.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qprep.errors import SettingsError, StoreError
from qprep.extraction.entries import Named, dataset_entries, folder_entries, no_audio_tower
from qprep.extraction.plan import Plan, make_plan
from qprep.extraction.writer import ShardWriter
from qprep.models.checkpoint import open_checkpoint
from qprep.schemas.fingerprint import differences, extraction_config, fingerprint
from qprep.schemas.manifest import ManifestRow
from qprep.schemas.settings import MEDIA_KINDS, ModelSpec, VideoSettings, load_model_spec
from qprep.schemas.dtypes import resolve_dtype
from qprep.schemas.towers import MERGED, MERGER_INPUT, Budget, check_level
from qprep.extraction.writer import HOLD_BYTES
from qprep.store.layout import MODEL_SPEC, WEIGHT_DIGESTS, LastRun, Store, shard_count_for


@dataclass
class Summary:
    videos: int = 0  # on disk
    extracted: int = 0
    failed: int = 0
    up_to_date: int = 0
    removed: int = 0
    touched: int = 0
    shards_written: int = 0
    frames: int = 0
    video_tokens: int = 0
    audio_tokens: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    ray_started: bool = False
    executor: str | None = None  # what ran the stages ("local" or "ray"); None: nothing needed them
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, cause)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why): links not followed, pipes, ...
    records: int = 0  # --data: records read
    # --data: media not found (record, path, where it looked) or not extractable (audio files, own sampling)
    missing: list[str] = field(default_factory=list)
    left_out: dict[str, list[str]] = field(default_factory=dict)  # --data: records not read: cause → names

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TowerJob:
    """What every Ray worker of a run needs to know (plain values: it travels to the workers)."""

    videos_dir: str  # absolute
    model: str
    revision: str | None
    settings: VideoSettings
    spec: ModelSpec
    dtype: str
    attn_implementation: str
    level: str = MERGED  # where the visual tokens are taken from the vision tower (qprep.schemas.towers)


@dataclass(frozen=True)
class ExtractOptions:
    """How to run (none of it changes the output, so none of it is in the fingerprint)."""

    ray_address: str | None = None
    executor: str = "auto"  # "local", "ray" or "auto" (qprep.extraction.executors.choose)
    device: str | None = None  # None: cuda when the cluster has GPUs, else cpu
    batch_size: int = 8  # videos per tower-stage batch
    budget: Budget = Budget()
    tower_threads: int | None = None  # torch threads of CPU tower calls, every kind (default: TowerThreads.for_cores)
    progress: bool = True
    follow_links: bool = False  # follow links leading out of the videos folder (links inside it always are)
    strict: bool = False  # --data: stop before any work when a record or a medium cannot be used
    notify: Callable[[str], None] | None = None  # --data: told what cannot be used, before any work
    hold_bytes: int = HOLD_BYTES  # fresh tokens the writer keeps in memory; past that they wait in scratch


def extract(videos, out: str | Path, model: str, settings: VideoSettings | None = None, *,
            dtype: str = "auto", shards: int | None = None, rebuild: bool = False, revision: str | None = None,
            attn_implementation: str = "sdpa", level: str = MERGED,
            options: ExtractOptions = ExtractOptions()) -> Summary:
    """Extract (or bring up to date) the token cache of every medium under the folder `videos`, or
    of the media a dataset names (`videos` a `qprep.datasets.DataFile`), into `out`."""
    from qprep.datasets.source import DataFile

    started = time.perf_counter()
    settings = settings or VideoSettings()
    data = videos if isinstance(videos, DataFile) else None
    if data is not None and (settings.video_start is not None or settings.video_end is not None):
        raise SettingsError("--video-start/--video-end window every video of a folder; with --data each "
                            "medium's window is the dataset's own (leave them out)")
    if Path(model).is_dir():
        model = str(Path(model).resolve())  # Ray workers may run elsewhere (shared storage)
    checkpoint = open_checkpoint(model, revision)
    # Before any video: the processor needs the tokenizer, and so does training from the store.
    checkpoint.require_tokenizer()
    if not checkpoint.has_audio and settings.audio:
        settings = dataclasses.replace(settings, audio=False)  # a VL model has no audio tower
    existing = Store.open(out) if Store.exists(out) and not rebuild else None
    settings, refused = _audio_files_taken(settings, checkpoint, model, existing, out, dataset=data is not None)
    named = None
    if data is not None:
        named = dataset_entries(data, settings, refused)
        _tell_unusable(named, options)
        settings = dataclasses.replace(settings, kinds=_kinds_for(named, existing))
    planned = 0  # a new store's entries, which size its shards
    if existing is None:
        planned = _start_workers_early(videos if named is None else named, options, settings.kinds)
    if dtype == "auto" and existing is not None:
        dtype = existing.attrs["dtype"]  # keep the store's dtype unless told otherwise
    dtype = resolve_dtype(dtype, checkpoint.dtype)
    digests = existing.read_json(WEIGHT_DIGESTS) if existing else {}
    spec_cache = existing.read_json(MODEL_SPEC) if existing else {}
    spec = _model_spec(model, checkpoint, spec_cache)
    if settings.images and spec.image_pixels is None:
        raise SettingsError(f"model {model}: no image processor bounds could be read, so images cannot be extracted")
    config = extraction_config(settings, spec, checkpoint.identity(digests), dtype, attn_implementation,
                               check_level(level), image_rows=options.budget.image_rows)
    new_fingerprint = fingerprint(config)
    if existing is not None:
        _check_compatible(existing, new_fingerprint, config, shards)
        store = existing
    else:
        if rebuild and Store.exists(out):
            Store.remove(out)
        try:
            store = Store.create(out, config=config, fingerprint=new_fingerprint, model=str(model),
                                 hidden_size=checkpoint.hidden_size, dtype=dtype,
                                 shard_count=shards or shard_count_for(planned), has_audio=checkpoint.has_audio,
                                 deepstack_levels=checkpoint.deepstack_levels, images=settings.images,
                                 audio_files=settings.audio_files,
                                 merger_input=checkpoint.merger_input_shape if level == MERGER_INPUT else None)
        except StoreError:
            if not Store.exists(out):
                raise
            # Another extract created it since we looked (both started at once): the same store, so
            # its lock decides which of the two writes, and the other is refused saying so.
            store = Store.open(out)
            _check_compatible(store, new_fingerprint, config, shards)
    store.write_json(WEIGHT_DIGESTS, digests)
    store.write_json(MODEL_SPEC, spec_cache)

    with store.lock():
        root = str(Path(videos if named is None else named.root).resolve())
        store.record_run(LastRun(root, options.follow_links))
        manifest = store.manifest()
        store.collect_garbage(manifest)
        if named is None:
            named = folder_entries(videos, store.shard_count, options.follow_links, settings.kinds, refused)
        plan = make_plan(named.with_shards(store.shard_count), manifest, named.root, unnamed=named.unnamed)
        summary = Summary(videos=plan.videos, up_to_date=plan.up_to_date, removed=plan.removed, touched=plan.touched,
                          skipped=named.skipped, records=named.records,
                          missing=[missing.line() for missing in named.missing], left_out=named.left_out)
        with store.scratch() as scratch:
            writer = ShardWriter(store, plan.shards, scratch, options.hold_bytes)
            writer.commit_ready()
            if plan.tasks:
                job = TowerJob(root, model, revision, settings, spec, dtype, attn_implementation, level)
                _run_towers(plan, writer, summary, job, options)
        summary.shards_written = writer.shards_written
        summary.bytes_written = writer.bytes_written
        summary.seconds = time.perf_counter() - started
        store.record_run(LastRun(root, options.follow_links, summary.to_dict()))
    return summary


def _audio_files_taken(settings: VideoSettings, checkpoint, model: str, existing: Store | None, out,
                       dataset: bool) -> tuple[VideoSettings, dict[str, str]]:
    """The run's settings, without audio files where they are not extracted, and why not (kind →
    reason, each such file listed as passed over): a model without an audio tower; a `--media` store
    made before audio files were taken (its fingerprint holds the kinds it takes). A `--videos` run
    looks for none; a `--data` run takes those its records name."""
    without = dataclasses.replace(settings, kinds=tuple(kind for kind in settings.kinds if kind != "audio"))
    if not checkpoint.has_audio:
        return without, {"audio": no_audio_tower(model)} if settings.audio_files or dataset else {}
    if not settings.audio_files:
        return settings, {}
    if existing is not None and "audio" not in existing.attrs["config"]["settings"].get("kinds", ("video",)):
        return without, {"audio": f"an audio file, and {out} was extracted without audio files (--rebuild takes them)"}
    return settings, {}


def _tell_unusable(named: Named, options: ExtractOptions) -> None:
    """Before any work: what of the dataset cannot be extracted; `strict` stops there."""
    lines = [f"not extracted: {missing.line()}" for missing in named.missing]
    lines += [f"left out {len(names)} record(s): {cause} ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
              for cause, names in named.left_out.items()]
    if not lines:
        return
    if options.strict:
        raise SettingsError("--strict: the dataset names what cannot be extracted:\n  " + "\n  ".join(lines))
    if options.notify is not None:
        options.notify("\n".join(lines + [f"going on without them ({len(named.entries)} entries found)"]))


def _kinds_for(named: Named, existing: Store | None) -> tuple[str, ...]:
    """The kinds of a --data run: the store's own where they cover the dataset's media (one fingerprint
    with the --videos or --media runs that made it), else videos, and the other kinds the dataset has."""
    needed = {"video"} | named.kinds
    if existing is None:
        return tuple(sorted(needed, key=MEDIA_KINDS.index))
    kinds = tuple(existing.attrs["config"]["settings"].get("kinds", ("video",)))
    if not needed <= set(kinds):
        lacking = " and ".join(f"{kind}s" if kind == "image" else f"{kind} files"
                               for kind in sorted(needed - set(kinds)))
        raise StoreError(f"the dataset names {lacking}; {existing.root} was extracted without them (its settings "
                         f"take {', '.join(kinds)}). Use another --out, --rebuild, or a store made with --media")
    return kinds


def _start_workers_early(videos: str | Path | Named, options: ExtractOptions, kinds: tuple[str, ...]) -> int:
    """A new store extracts every entry found: returns how many (its shard count follows from it).
    When they will be prepared in this machine's worker processes, start the workers' server now:
    its imports then overlap reading the model's processor files (measured on the 32 clips of
    bench/extract.py: about 5 s of a 25 s cold run). The folder is only counted here; the plan
    lists it again under the store's lock, where what it holds is settled."""
    from qprep.extraction.executors import choose, start_worker_server

    if isinstance(videos, Named):
        count = len(videos.entries)
    else:
        count = len(folder_entries(videos, 1, options.follow_links, kinds).entries)
    if count and choose(options.executor, options.ray_address, count) == "local":
        start_worker_server()
    return count


# How a checkpoint's files become a ModelSpec; a new rule invalidates the specs stores have cached.
# 2: the frame size a checkpoint's own processor applies to video (Family.video_pixel_bounds).
# 3: pixel bounds over the whole clip where the family's processor applies them so.
# 4: audio featurized whole where the family's processor does so.
# 5: the image bounds of the checkpoint's processor (Family.image_pixel_bounds).
SPEC_RULES = 5


def _model_spec(model: str, checkpoint, cache: dict) -> ModelSpec:
    """The model's preprocessor spec, read through transformers' processor classes once per change
    of its config files (a no-op re-run imports neither torch nor transformers)."""
    key = checkpoint.config_files_key()
    if key is not None:  # transformers' defaults fill what the files leave out, qprep's rules read them
        key.append(["transformers", importlib.metadata.version("transformers")])
        key.append(["spec_rules", SPEC_RULES])
    if key is not None and cache.get("key") == key:
        return ModelSpec.from_dict(cache["spec"])
    spec = load_model_spec(model)
    cache.clear()
    cache.update(key=key, spec=spec.to_dict())
    return spec


def _check_compatible(store: Store, new_fingerprint: str, config: dict, shards: int | None) -> None:
    if shards is not None and shards != store.shard_count:
        raise StoreError(f"{store.root} has {store.shard_count} shards; --shards {shards} needs --rebuild")
    if store.fingerprint != new_fingerprint:
        changed = differences(store.attrs["config"], config)
        listed = "\n  ".join(changed[:12]) or "(qprep's output version)"
        raise StoreError(f"{store.root} was extracted with other settings; refusing to mix tokens.\n  {listed}\n"
                         "Use another --out, or --rebuild to start this store over.")


def _run_towers(plan: Plan, writer: ShardWriter, summary: Summary, job: TowerJob, options: ExtractOptions) -> None:
    from tqdm.auto import tqdm

    from qprep.extraction.executors import choose, run_locally, run_on_ray

    summary.executor = choose(options.executor, options.ray_address, len(plan.tasks))
    summary.ray_started = summary.executor == "ray"
    results = (run_on_ray if summary.ray_started else run_locally)(plan.tasks, job, options)
    bar = tqdm(total=len(plan.tasks), unit="video", desc="extract", disable=not options.progress, dynamic_ncols=True)
    begun = time.perf_counter()
    try:
        for encoded in results:
            _count(summary, writer.add(encoded), encoded.tokens)
            bar.update(1)
            elapsed = max(time.perf_counter() - begun, 1e-9)
            bar.set_postfix_str(f"{summary.frames / elapsed:.1f} frames/s, "
                                f"{(summary.video_tokens + summary.audio_tokens) / elapsed:.0f} tokens/s, "
                                f"{summary.failed} failed", refresh=False)
    finally:
        bar.close()
        results.close()  # the executor's workers and session end here, also on an error
    if writer.pending_shards:
        raise RuntimeError(f"the tower stage ended with shards {writer.pending_shards[:5]} incomplete")


def _count(summary: Summary, row: ManifestRow, tokens: dict) -> None:
    if row.ok:
        summary.extracted += 1
        summary.frames += len(row.frame_indices or ())
        summary.video_tokens += int(tokens["video"].shape[0])
        summary.audio_tokens += int(tokens["audio"].shape[0]) if "audio" in tokens else 0
    else:
        summary.failed += 1
        summary.failures.append((row.id if row.window else row.path, row.error))


def format_summary(summary: Summary, store: str | Path) -> str:
    """The human summary printed at the end of a run."""
    if summary.executor is None and not summary.shards_written:
        return "\n".join([f"{store}: nothing to do, {summary.up_to_date} videos up to date "
                          f"({summary.seconds:.2f} s, nothing decoded)", *_skipped_lines(summary)])
    lines = [
        f"{store}: {summary.extracted} extracted, {summary.failed} failed, {summary.up_to_date} up to date, "
        f"{summary.removed} removed ({summary.shards_written} shards written)",
        f"  {summary.frames} frames, {summary.video_tokens} video tokens, {summary.audio_tokens} audio tokens, "
        f"{summary.bytes_written / 1e6:.1f} MB written in {summary.seconds:.1f} s",
    ]
    for path, cause in summary.failures[:10]:
        lines.append(f"  failed: {path}: {cause.splitlines()[0] if cause else ''}")
    if len(summary.failures) > 10:
        lines.append(f"  ... and {len(summary.failures) - 10} more (see `qprep status {store}`)")
    return "\n".join(lines + _skipped_lines(summary))


def _skipped_lines(summary: Summary) -> list[str]:
    lines = [f"  not read: {path}: {why}" for path, why in summary.skipped[:10]]
    if len(summary.skipped) > 10:
        lines.append(f"  ... and {len(summary.skipped) - 10} more not read (--json lists all)")
    lines += [f"  not extracted: {line}" for line in summary.missing[:10]]
    if len(summary.missing) > 10:
        lines.append(f"  ... and {len(summary.missing) - 10} more media not extracted (--json lists all)")
    lines += [f"  left out {len(names)} record(s): {cause}" for cause, names in list(summary.left_out.items())[:10]]
    return lines
