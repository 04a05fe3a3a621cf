"""`qprep data FILE`: a dataset looked at before hours are spent on it, without decoding anything.

What it reports is what `qprep extract --data` and `qprep train --data` would do with the file:

* its records by kind: video, image, audio, text-only, mixed (media of several kinds), and
  grounding (a record answered with one bare time range, as `qprep eval` scores it);
* the media found (the entries `extract --data` would fill, windows among them) and those it would
  not (record, path, where it looked), and the records left out with their causes (a tag/media
  mismatch, a bad time, an unknown role, ...), from the same code those commands run
  (`qprep.extraction.entries.dataset_entries`, the format's reader);
* with a model, each sample's token length at the given settings. Each medium's manifest row is
  predicted from its probe (the container's index for a video, the header for an image), as
  extraction would plan it: the frames `plan_frames` samples, the size `target_size` or the image
  processor's `smart_resize` gives; the samples are then built by `qprep.train.data.build_dataset`
  over those rows, so the lengths are training's own. A video whose own sound the model would hear
  has its audio tokens left out of its length (they are known once its track is decoded): its
  length is a lower bound, and it is listed as such.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from qprep.errors import SettingsError, VideoError

KINDS = ("video", "image", "audio", "text-only", "grounding", "mixed")


@dataclass
class Lengths:
    """Token lengths of the samples training would build, at one model's settings."""

    model: str
    samples: dict[str, int]  # sample name → input ids
    lower_bounds: list[str] = field(default_factory=list)  # samples whose videos' audio tokens are not counted
    unknown: dict[str, list[str]] = field(default_factory=dict)  # why no length → sample names
    max_length: int | None = None

    @property
    def over(self) -> list[str]:
        """The samples longer than `max_length`."""
        return [name for name, length in self.samples.items() if self.max_length and length > self.max_length]

    def to_dict(self) -> dict:
        values = list(self.samples.values())
        summary = {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}
        return {"model": self.model, "samples": len(values), **summary, "max_length": self.max_length,
                "over_max_length": self.over, "lower_bounds": self.lower_bounds, "unknown": self.unknown,
                "per_sample": self.samples}


@dataclass
class DataReport:
    data: str
    format: str
    records: int
    kinds: dict[str, int]  # record kind (KINDS) → how many of the usable records
    media: list[str]  # the entries extraction would fill (cache ids)
    windows: list[str]  # those that are windows of a file
    missing: list  # `qprep.extraction.entries.Missing`: media not found or not extractable as named
    left_out: dict[str, list[str]]  # "file: cause" → record names
    lengths: Lengths | None = None

    def to_dict(self) -> dict:
        out = {"data": self.data, "format": self.format, "records": self.records, "kinds": self.kinds,
               "media": len(self.media), "windows": self.windows,
               "missing": [dataclasses.asdict(m) for m in self.missing], "left_out": self.left_out}
        if self.lengths is not None:
            out["tokens"] = self.lengths.to_dict()
        return out

    def lines(self) -> list[str]:
        """The report as a person reads it."""
        usable = sum(self.kinds.values())
        kinds = ", ".join(f"{count} {kind}" for kind, count in self.kinds.items() if count)
        lines = [f"{self.data}: {self.format}, {self.records} records, {usable} read ({kinds or 'none'})",
                 f"media: {len(self.media)} found ({len(self.windows)} windows), {len(self.missing)} not extracted"]
        lines += [f"  {missing.line()}" for missing in self.missing]
        for cause, names in self.left_out.items():
            lines.append(f"left out {len(names)}: {cause} ({_some(names)})")
        if self.lengths is not None:
            lines += _length_lines(self.lengths)
        return lines


def inspect_data(source, *, model: str | None = None, settings=None, max_length: int | None = None) -> DataReport:
    """What `extract --data` and `train --data` would make of `source` (a `qprep.datasets.DataFile`);
    with `model`, each sample's token length at `settings` (`VideoSettings`, None: the defaults)."""
    from qprep.datasets import parse
    from qprep.extraction.entries import dataset_entries
    from qprep.schemas.settings import VideoSettings

    settings = settings or VideoSettings()
    if settings.video_start is not None or settings.video_end is not None:
        raise SettingsError("--video-start/--video-end: with --data each medium's window is the dataset's own")
    _, reader, path = parse(source)
    named = dataset_entries(source, settings)
    report = DataReport(
        data=str(path), format=reader, records=named.records, kinds=record_kinds(source),
        media=[entry.id for entry in named.entries],
        windows=[entry.id for entry in named.entries if entry.window_start is not None],
        missing=named.missing,
        left_out=named.left_out)
    if model is not None:
        report.lengths = token_lengths(source, named, model, settings, max_length)
    return report


def record_kinds(source) -> dict[str, int]:
    """How many of the file's usable records are of each kind (KINDS)."""
    from qprep.datasets import parse
    from qprep.datasets.record import Record
    from qprep.extraction.entries import dataset_records

    content, reader, _ = parse(source)
    items = dataset_records(source, content, reader)
    counts = dict.fromkeys(KINDS, 0)
    for item in items:
        if isinstance(item, Record):
            counts[record_kind(item)] += 1
    return counts


def record_kind(record) -> str:
    from qprep.eval.segments import is_grounding_answer

    answer = next((turn.text for turn in record.turns if turn.role == "assistant"), "")
    if record.media and is_grounding_answer(answer):
        return "grounding"
    kinds = {medium.kind for medium in record.media}
    return "text-only" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"


# ---- token lengths ----------------------------------------------------------------------------------

def token_lengths(source, named, model: str, settings, max_length: int | None) -> Lengths:
    """Each sample's length as `build_dataset` lays it out over the rows predicted from the probes."""
    from qprep.datasets import load
    from qprep.models.checkpoint import open_checkpoint
    from qprep.schemas.settings import load_model_spec
    from qprep.train.data import build_dataset

    checkpoint = open_checkpoint(model)
    checkpoint.require_tokenizer()
    tokenizer = checkpoint.tokenizer()
    layout = checkpoint.family.prompt_layout(checkpoint, tokenizer)
    if not checkpoint.has_audio:
        settings = dataclasses.replace(settings, audio=False)  # as extraction runs a VL model
    spec = load_model_spec(model)
    rows, unprobed, heard = {}, {}, set()  # unprobed: entry id → why
    for entry in named.entries:
        try:
            rows[entry.id], sound = predicted_row(entry, named.root, settings, spec)
        except (VideoError, SettingsError) as exc:
            unprobed[entry.id] = f"cannot be probed: {exc}"
            continue
        if sound and layout.audio:
            heard.add(entry.id)
    records = load(source)
    dataset = build_dataset(records, _Predicted(rows), tokenizer, layout)
    return Lengths(model=model, samples={s.id: len(s.input_ids) for s in dataset.samples},
                   lower_bounds=[s.id for s in dataset.samples if heard & set(s.media)],
                   unknown=_why_no_length(dataset.skipped, records, rows, unprobed), max_length=max_length)


def _why_no_length(skipped: dict[str, list[str]], records, rows: dict,
                   unprobed: dict[str, str]) -> dict[str, list[str]]:
    """`build_dataset`'s reasons, a sample whose first unpredicted medium could not be probed given
    that cause. Its samples without a predicted row are the records with a medium not in `rows`, in
    file order, so the two lists pair up one to one (names may repeat)."""
    from qprep.train.data import NOT_CACHED, record_media

    missing_causes = [unprobed.get(missing[0]) for record in records
                      if (missing := [medium for medium in record_media(record) if medium not in rows])]
    unknown: dict[str, list[str]] = {}
    for reason, names in skipped.items():
        causes = missing_causes if reason == NOT_CACHED else [None] * len(names)
        for name, why in zip(names, causes, strict=True):
            unknown.setdefault(why or _no_length(reason), []).append(name)
    return unknown


def predicted_row(entry, root: Path, settings, spec):
    """(the manifest row extraction would write for `entry`, as far as a block's layout reads it;
    whether the model would hear a sound track), from the file's probe alone."""
    from qprep.extraction.stages import entry_settings
    from qprep.pipeline.image import header_grid
    from qprep.pipeline.patchify import target_size
    from qprep.pipeline.probe import probe
    from qprep.pipeline.sample import plan_frames
    from qprep.schemas.manifest import ManifestRow

    path = entry.location(root)
    if entry.kind == "audio":  # its token count follows from its decoded length, not from a probe
        raise SettingsError(f"{path}: an audio file, whose token count is known once `qprep extract` decodes it")
    if entry.kind == "image":
        return ManifestRow(id=entry.id, path=entry.path, kind="image", grid_thw=list(header_grid(path, spec))), False
    info = probe(path)
    plan = plan_frames(info, entry_settings(entry, settings), spec)
    # rotation turns height and width, not the count of patches: the coded size gives the same grid product
    height, width = target_size(str(path), info.coded_height, info.coded_width, len(plan.pts), settings, spec)
    grid = [math.ceil(len(plan.pts) / spec.temporal_patch_size), height // spec.patch_size, width // spec.patch_size]
    row = ManifestRow(id=entry.id, path=entry.path, kind="video", grid_thw=grid, second_per_grid=plan.second_per_grid,
                      frame_times=[float(t) for t in plan.times], window_start=entry.window_start,
                      window_end=entry.window_end, audio_length=0, mel_length=0)
    return row, bool(settings.audio and info.audio is not None)


class _Predicted:
    """The rows predicted from the probes, read as `build_dataset` reads a cache."""

    def __init__(self, rows: dict):
        self.rows = rows

    def ids(self) -> list[str]:
        return list(self.rows)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self.rows

    def row(self, entry_id: str):
        return self.rows[entry_id]


def _no_length(reason: str) -> str:
    """`build_dataset`'s reason, for media that were never extracted but only looked for."""
    from qprep.train.data import NOT_CACHED

    return "a medium not found, or not extractable as named (listed above)" if reason == NOT_CACHED else reason


def _length_lines(lengths: Lengths) -> list[str]:
    values = sorted(lengths.samples.values())
    if not values:
        lines = [f"tokens ({lengths.model}): no sample could be measured"]
    else:
        lines = [f"tokens ({lengths.model}): {len(values)} samples, min {values[0]}, median "
                 f"{statistics.median(values):g}, max {values[-1]}"]
    if lengths.max_length:
        lines.append(f"  {len(lengths.over)} over --max-length {lengths.max_length}" +
                     (f" ({_some(lengths.over)})" if lengths.over else ""))
    if lengths.lower_bounds:
        lines.append(f"  {len(lengths.lower_bounds)} with a video's own sound, its audio tokens not counted "
                     f"(known once decoded): {_some(lengths.lower_bounds)}")
    lines += [f"  no length for {len(names)}: {reason} ({_some(names)})" for reason, names in lengths.unknown.items()]
    return lines


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
