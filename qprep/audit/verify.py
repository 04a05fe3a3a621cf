"""`qprep verify`: a fidelity audit of a store against transformers' own processor and model.

For a sample of the store's videos, everything the cache holds is recomputed from the video file
without qprep's CPU or tower stage (`qprep.audit.reference`) and compared:

| check | compared | passes when |
| --- | --- | --- |
| `file` | size and mtime, then sha256, against the manifest | the video is the one that was extracted |
| `frame_count` | frames of a plain decode | equal |
| `frame_indices` | re-derived with qwen-vl-utils' rules from that decode | equal |
| `frame_times` | times of the sampled frames, from their pts (seconds) | within 1 µs |
| `second_per_grid` | temporal patch size / the rate actually sampled (seconds) | within 1 µs |
| `grid_thw` | the processor's grid | equal |
| `video_tokens`, `deepstack`, `audio_tokens` | max abs difference (float32) / the reference's largest magnitude | ≤ the tolerance |
| (a store of the merger's input) | the checkpoint's merger run on it (`qprep.train.merger`), as training runs it | as above |
| `audio`, `mel_length` | audio present or not; valid mel frames | equal |

The tokens are compared on the frames the cache sampled, so a sampling difference shows as
`frame_indices` and not as a token difference.

Default token tolerance, by the store's dtype: float32 0 (bit-identical; 2⁻¹⁶ for a store whose
images ran in fixed-shape calls, `extract --image-call-rows`, which the reference's one-image calls
do not reproduce to the bit). bfloat16 2⁻⁶ of the
largest magnitude: bf16 keeps 8 significant bits, so each rounding may move a value by 2⁻⁸ of its
binade, and a reference run on other kernels (another GPU, CPU against CUDA, another batch packing)
rounds differently at every layer; 2⁻⁶ is 4 units in the last place at the top of the range (the
size of torch.testing's bf16 rtol, 1.6e-2), while what breaks fidelity (another frame, swapped
height and width, another normalization, a corrupted row) moves tokens by their own size. float16
(11 significant bits): 2⁻⁹, 4 units likewise. The report gives the difference measured, so an exact
match shows as such whatever the tolerance.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qprep.errors import SettingsError
from qprep.schemas.manifest import ManifestRow

DEFAULT_SAMPLE = 3
TIME_TOLERANCE = 1e-6  # seconds


@dataclass
class Check:
    name: str
    ok: bool
    detail: str  # what was compared, and by how much it differs
    difference: float | None = None  # tokens: relative difference; times: seconds
    limit: float | None = None


@dataclass
class VideoResult:
    id: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]


@dataclass
class VerifyReport:
    store: str
    model: str
    reference: str  # the transformers class the tokens were recomputed with
    dtype: str
    device: str
    extracted_on: list[str]  # devices the checked videos' towers ran on
    tolerance: float
    videos_ok_in_store: int
    results: list[VideoResult] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)  # the CPU torch threads they ran at, where recorded
    threads_unknown: list[str] = field(default_factory=list)  # extracted on a CPU before the count was recorded

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results)

    def failures(self) -> list[VideoResult]:
        return [result for result in self.results if not result.ok]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        for result, entry in zip(self.results, out["results"]):
            entry["ok"] = result.ok
        return out


# A float32 store whose images ran in fixed-shape calls (`extract --image-call-rows`): the reference's
# one-image calls run other shapes, whose elementwise loops may leave a scalar tail elsewhere (an ulp
# of a SiLU that the later layers carry on): 2⁻¹⁶ of the largest magnitude, 128 units at the top of
# the range, while what breaks fidelity moves tokens by their own size.
FIXED_SHAPE_FLOAT32_TOLERANCE = 2.0 ** -16


def default_tolerance(dtype: str, config: dict | None = None) -> float:
    from qprep.schemas.dtypes import dtype_facts

    tolerance = dtype_facts(dtype).verify_tolerance
    if (config or {}).get("image_call_rows"):
        return max(tolerance, FIXED_SHAPE_FLOAT32_TOLERANCE)
    return tolerance


def verify(store: str | Path, *, model: str | None = None, videos: str | Path | None = None,
           revision: str | None = None, ids: list[str] | None = None, sample: int | None = DEFAULT_SAMPLE,
           seed: int = 0, tolerance: float | None = None, device: str | None = None,
           progress: bool = True) -> VerifyReport:
    """Recompute the chosen videos of `store` with transformers' processor and model and compare.

    `ids` picks videos by id; otherwise `sample` videos are drawn (seeded) among those extracted ok,
    or all of them with `sample=None`. The towers are loaded for this check only.
    """
    import torch
    from tqdm.auto import tqdm

    from qprep.audit.reference import Reference
    from qprep.store.reader import open_cache

    cache = open_cache(store)
    chosen = choose(cache, ids, sample, seed)
    videos_dir = _videos_dir(cache, videos)
    checkpoint = _checkpoint(cache, model, revision)
    dtype = cache.store.attrs["dtype"]
    tolerance = default_tolerance(dtype, cache.config) if tolerance is None else tolerance
    rows = [cache.row(video_id) for video_id in chosen]
    extracted_on = sorted({row.device or "unknown" for row in rows})
    threads = sorted({row.tower_threads for row in rows} - {None})
    threads_unknown = [row.id for row in rows if row.device == "cpu" and row.tower_threads is None]
    device = device or ("cuda" if torch.cuda.is_available() and "cuda" in extracted_on else "cpu")
    reference = Reference(checkpoint.source, checkpoint.family.full_model, dtype=dtype, device=device,
                          attn_implementation=cache.config.get("attn_implementation", "sdpa"), revision=revision,
                          pixel_bounds_per_clip=checkpoint.family.pixel_bounds_per_clip,
                          audio_whole_track=checkpoint.family.audio_whole_track)
    report = VerifyReport(store=str(cache.store.root), model=checkpoint.source,
                          reference=checkpoint.family.full_model[0], dtype=dtype, device=device,
                          extracted_on=extracted_on, threads=threads if device == "cpu" else [],
                          threads_unknown=threads_unknown if device == "cpu" else [],
                          tolerance=tolerance, videos_ok_in_store=len(cache.ids()))
    settings = cache.config["settings"]
    merged = None
    if cache.level == "merger-input":  # checked through the merger the trainer runs, against the merged tokens
        from qprep.train.merger import Merger

        merged = Merger(checkpoint, dtype=dtype, device=device).medium
    for video_id in tqdm(chosen, desc="verify", unit="video", disable=not progress):
        report.results.append(check_video(cache, video_id, videos_dir, reference, settings, tolerance, merged))
    return report


def choose(cache, ids: list[str] | None, sample: int | None, seed: int) -> list[str]:
    """The ids to check: those asked for, or a seeded sample of the videos extracted ok."""
    ok = cache.ids()
    if ids:
        missing = [video_id for video_id in ids if video_id not in cache]
        if missing:
            raise SettingsError(f"--ids: {cache.store.root} has no video {', '.join(missing)}")
        failed = [video_id for video_id in ids if video_id not in set(ok)]
        if failed:
            raise SettingsError(f"--ids: {', '.join(failed)} failed extraction, so the cache holds nothing to verify "
                                f"(`qprep status {cache.store.root}` shows why)")
        return list(dict.fromkeys(ids))
    if not ok:
        raise SettingsError(f"{cache.store.root} holds no video extracted ok: nothing to verify")
    if sample is None or sample >= len(ok):
        return ok
    return sorted(random.Random(seed).sample(ok, sample))


def check_video(cache, video_id: str, videos_dir: Path, reference, settings: dict, tolerance: float,
                merged=None) -> VideoResult:
    """`merged`: what turns a cached medium of the merger's input into merged tokens (`Merger.medium`)."""
    from qprep.pipeline.towers import torch_threads

    cached = cache[video_id]
    # on a CPU, at the torch threads the medium's towers ran at (the merger's too, for a store of its
    # input, as the reference runs it inside the tower's call): the count can move an ulp
    with torch_threads(cached.row.tower_threads if reference.device == "cpu" else None):
        if merged is not None:
            cached = merged(cached)
        path = videos_dir / cached.row.path
        checks = [file_check(path, cached.row)]
        if not checks[0].ok:
            return VideoResult(video_id, checks)
        return VideoResult(video_id, checks + _recomputed_checks(cached, path, reference, settings, tolerance))


def _recomputed_checks(cached, path: Path, reference, settings: dict, tolerance: float) -> list[Check]:
    import av

    try:
        if cached.kind == "image":
            return compare_image(cached, reference.compute_image(path), tolerance)
        if cached.row.window:  # a window of its file: sampled as the run's settings with its video_start/end
            settings = {**settings, "video_start": cached.row.window_start, "video_end": cached.row.window_end}
        if cached.kind == "audio":
            return _audio_checks(cached, reference.compute_audio(path, settings), tolerance)
        recomputed = reference.compute(path, list(cached.row.frame_indices), settings)
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        return [Check("reference", False, f"cannot recompute {path}: {exc}")]
    return compare(cached, recomputed, tolerance)


def compare_image(cached, recomputed, tolerance: float) -> list[Check]:
    """Every check of one image (a `CachedMedium` against a `ReferenceImage`)."""
    checks = [_equal("grid_thw", tuple(cached.grid_thw), tuple(recomputed.grid_thw)),
              token_check("video_tokens", cached.video_tokens, recomputed.tokens, tolerance)]
    if cached.deepstack is not None or recomputed.deepstack is not None:
        checks.append(_deepstack_check(cached.deepstack, recomputed.deepstack, tolerance))
    return checks


def compare(cached, recomputed, tolerance: float) -> list[Check]:
    """Every check of one video (a `CachedMedium` against a `ReferenceVideo`)."""
    row = cached.row
    checks = [_equal("frame_count", row.frame_count, recomputed.frame_count)]
    plan = recomputed.plan
    if plan is None:
        checks.append(Check("frame_indices", False, f"qwen-vl-utils' rules refuse the video: {recomputed.plan_error}"))
    else:
        checks.append(_indices(list(row.frame_indices), plan.indices))
        checks.append(_close("second_per_grid", [row.second_per_grid], [plan.second_per_grid]))
    checks.append(_close("frame_times", list(row.frame_times), recomputed.frame_times))
    checks.append(_equal("grid_thw", tuple(cached.grid_thw), tuple(recomputed.video_grid_thw)))
    checks.append(token_check("video_tokens", cached.video_tokens, recomputed.video_tokens, tolerance))
    if cached.deepstack is not None or recomputed.deepstack is not None:
        checks.append(_deepstack_check(cached.deepstack, recomputed.deepstack, tolerance))
    return checks + _audio_checks(cached, recomputed, tolerance)


def _deepstack_check(cached, reference, tolerance: float) -> Check:
    """Every level of every token, one row per token ([levels, n, d] → [n, levels·d])."""
    if cached is None or reference is None:
        held = "the cache" if cached is not None else "the reference"
        return Check("deepstack", False, f"only {held} has deepstack features")
    if cached.shape[0] != reference.shape[0]:
        return Check("deepstack", False, f"the cache holds {cached.shape[0]} levels, the reference {reference.shape[0]}")
    return token_check("deepstack", _per_token(cached), _per_token(reference), tolerance)


def _per_token(levels):
    return levels.transpose(0, 1).reshape(levels.shape[1], -1)


def token_check(name: str, cached, reference, tolerance: float) -> Check:
    """Largest |cache − reference| relative to the reference's largest magnitude, and where."""
    if tuple(cached.shape) != tuple(reference.shape):
        return Check(name, False, f"the cache holds {tuple(cached.shape)}, the reference {tuple(reference.shape)}")
    difference = (cached.float() - reference.float()).abs()
    if difference.numel() == 0:
        return Check(name, True, "none", 0.0, tolerance)
    largest, scale = float(difference.max()), float(reference.float().abs().max())
    relative = largest / scale if scale else largest
    if math.isnan(largest) or math.isnan(relative):
        return Check(name, False, "NaN in the cache or the reference", math.nan, tolerance)
    if largest == 0:
        return Check(name, True, "bit-exact", 0.0, tolerance)
    beyond = (difference.amax(-1) > tolerance * scale).nonzero().flatten().tolist()
    detail = f"max |Δ| {largest:.3g}, relative {relative:.3g}"
    if beyond:
        detail += f"; {len(beyond)} of {difference.shape[0]} rows beyond the tolerance, first row {beyond[0]}"
    return Check(name, relative <= tolerance, detail, relative, tolerance)


def file_check(path: Path, row: ManifestRow) -> Check:
    """The file must be the one extracted: same size and mtime, or else the same content hash."""
    if not path.is_file():
        return Check("file", False, f"{path} is missing (pass --videos with the folder the store was extracted from)")
    from qprep.extraction.discover import TOUCHED, UNCHANGED, file_state, same_content

    stat = path.stat()
    state = file_state(row, stat.st_size, stat.st_mtime_ns)
    if state == UNCHANGED:
        return Check("file", True, "unchanged")
    if state == TOUCHED and same_content(path, row):
        return Check("file", True, "same content (touched since)")
    return Check("file", False, f"{path} changed since it was extracted; re-run `qprep extract` first")


def _audio_checks(cached, recomputed, tolerance: float) -> list[Check]:
    if cached.audio_tokens is None and recomputed.audio_tokens is None:
        return [Check("audio", True, f"none ({recomputed.audio_note})")]
    if cached.audio_tokens is None:
        return [Check("audio", False, f"the cache has none ({cached.row.audio_note}); the reference has "
                                      f"{recomputed.audio_tokens.shape[0]} audio tokens")]
    if recomputed.audio_tokens is None:
        return [Check("audio", False, f"the cache has {cached.audio_tokens.shape[0]} audio tokens; the reference "
                                      f"has none ({recomputed.audio_note})")]
    return [_equal("mel_length", cached.mel_length, recomputed.mel_length),
            token_check("audio_tokens", cached.audio_tokens, recomputed.audio_tokens, tolerance)]


def _equal(name: str, cached, reference) -> Check:
    if cached == reference:
        return Check(name, True, _show(cached))
    return Check(name, False, f"the cache has {_show(cached)}, the reference {_show(reference)}")


def _indices(cached: list[int], reference: list[int]) -> Check:
    if cached == reference:
        return Check("frame_indices", True, f"{len(cached)} frames")
    if len(cached) != len(reference):
        return Check("frame_indices", False, f"the cache samples {len(cached)} frames, the rules {len(reference)}")
    first = next(i for i, (a, b) in enumerate(zip(cached, reference)) if a != b)
    return Check("frame_indices", False, f"frame {first} of {len(cached)}: the cache samples {cached[first]}, "
                                         f"the rules {reference[first]}")


def _close(name: str, cached: list[float], reference: list[float]) -> Check:
    if len(cached) != len(reference):
        return Check(name, False, f"the cache has {len(cached)} values, the reference {len(reference)}")
    largest = max((abs(a - b) for a, b in zip(cached, reference)), default=0.0)
    ok = largest <= TIME_TOLERANCE
    return Check(name, ok, f"max |Δ| {largest:.3g} s" if largest else "exact", largest, TIME_TOLERANCE)


def _show(value) -> str:
    if isinstance(value, tuple):
        return "×".join(str(v) for v in value)
    return str(value)


def _videos_dir(cache, videos: str | Path | None) -> Path:
    recorded = cache.store.last_run().videos
    folder = Path(videos or recorded or "")
    if not (videos or recorded):
        raise SettingsError(f"{cache.store.root} does not record its videos folder; pass --videos")
    if not folder.is_dir():
        raise SettingsError(f"the videos folder {folder} is gone; pass --videos with the folder the store was "
                            f"extracted from")
    return folder


def _checkpoint(cache, model: str | None, revision: str | None):
    """The checkpoint to recompute with; it must be the one the store was extracted with (the same
    tower configs and tower weights), or every token would differ for a reason that is not fidelity."""
    from qprep.store.layout import WEIGHT_DIGESTS
    from qprep.models.checkpoint import open_checkpoint
    from qprep.schemas.fingerprint import differences

    source = model or cache.model
    try:
        checkpoint = open_checkpoint(source, revision)
    except SettingsError as exc:
        hint = "" if model else f" (the model {cache.store.root} was extracted with; pass --model where it is now)"
        raise SettingsError(f"{exc}{hint}") from exc
    checkpoint.require_tokenizer()  # the reference is the checkpoint's processor, built around it
    identity = checkpoint.identity(cache.store.read_json(WEIGHT_DIGESTS))
    changed = differences(cache.config["model"], identity)
    if changed:
        raise SettingsError(f"--model {source} is not the model {cache.store.root} was extracted with: "
                            f"{'; '.join(changed[:3])}")
    return checkpoint


def format_report(report: VerifyReport) -> str:
    threads = (f", at the {'/'.join(map(str, report.threads))} torch threads of their extraction"
               if report.threads else "")
    lines = [f"{report.store}: {len(report.results)} of {report.videos_ok_in_store} media recomputed with "
             f"{report.reference}.from_pretrained({report.model}), {report.dtype} on {report.device}{threads}",
             f"token tolerance: relative difference <= {report.tolerance:g}"
             + (" (bit-exact)" if report.tolerance == 0 else "")]
    if any(device.split(":")[0] not in (report.device, "unknown") for device in report.extracted_on):
        lines.append(f"note: the towers ran on {', '.join(report.extracted_on)} at extraction; other kernels round "
                     f"differently (pass --device or --tolerance)")
    for result in report.results:
        if result.ok:
            shown = [c for c in result.checks if c.name in ("video_tokens", "deepstack", "audio_tokens", "grid_thw",
                                                              "audio")]
            lines.append(f"ok    {result.id}: " + ", ".join(f"{c.name} {c.detail}" for c in shown))
        else:
            lines.append(f"FAIL  {result.id}: " + "; ".join(f"{c.name}: {c.detail}" for c in result.failed()))
    failures = report.failures()
    lines += _unrecorded_threads_note(report, failures)
    lines.append(f"{len(failures)} of {len(report.results)} media differ from the reference: "
                 + ", ".join(f"{r.id} ({', '.join(c.name for c in r.failed())})" for r in failures)
                 if failures else f"all {len(report.results)} media match the reference")
    return "\n".join(lines)


TOKEN_CHECKS = ("video_tokens", "deepstack", "audio_tokens")


def _unrecorded_threads_note(report: VerifyReport, failures: list[VideoResult]) -> list[str]:
    """Why a float32 medium extracted on a CPU before rows recorded the towers' threads may differ in
    its tokens alone: the reference ran at torch's default count, and another count moves an ulp."""
    if report.dtype != "float32":
        return []  # the bf16 and fp16 tolerances already allow far more than an ulp
    ids = sorted(result.id for result in failures if result.id in set(report.threads_unknown)
                 and all(check.name in TOKEN_CHECKS for check in result.failed()))
    if not ids:
        return []
    return [f"note: {', '.join(ids)}: extracted on a CPU before stores recorded the towers' torch threads, so "
            f"the reference ran at torch's default count; another count can move tokens by an ulp (re-extract, "
            f"or allow it with --tolerance {FIXED_SHAPE_FLOAT32_TOLERANCE:g})"]
