"""GRPO's rewards: one float per sampled completion, scoring its answer against the record it answers.

A reward is a callable `reward(prompts, completions, records) -> list[float]`: completion i answers
prompt i, rendered from `records[i]` (a record of `qprep.train.data`, repeated for each of a prompt's
completions), and gets one finite float. `--reward` names a built-in or a user's function by import
path (`package.module:function`); `resolve_rewards` turns the names into `NamedReward`s, each logged
under its name.

The truth (`truth_of`): a record's true segments are its first assistant turn read as `qprep eval`
reads a data file (`qprep.eval.truth.read_record`: time ranges in seconds, LongVALE's `<s0>` tokens
replaced by `meta.token`); the video's duration is the record's `duration`, else its `meta.duration`
(seconds; absent: unknown). A grounding record's answer is its one true range.

The answer: the last `<answer>...</answer>` block of the completion if it has one (Time-R1's form),
else the whole completion, its ranges read by `qprep.eval.segments.parse_answer`. Ranges are scored
as Time-R1's reward computes them (its `main.py`), bad ones scored, never raised:

* a range written end first overlaps nothing (Time-R1's intersection of it is 0), nor does a range of
  zero length or one with a time too large for a float; a range is clipped to [0, duration] where the
  duration is known, so one past the end overlaps nothing and one running over it keeps its part
  within the video;
* an answer without a range scores 0 (each built-in's minimum).

Built-ins:

* `tiou`: IoU of the answer's first range with the true range, as `qprep eval`'s grounding (the union
  is the hull; an empty union scores 0); 1 for the true range exactly (Time-R1 reads the last range of
  its block: the two agree on an answer of one range);
* `iou_v2`: Time-R1's distance-weighted IoU, IoU·(1 − |s − ŝ|/d)·(1 − |e − ê|/d) with d the duration
  (each factor at least 0); a record without a duration cannot be scored by it;
* `dense_f1`: a dense-captioning answer's F1 of its precision and recall at `qprep eval`'s tIoU
  thresholds (0.3, 0.5, 0.7, 0.9; the ActivityNet evaluator's rules), averaged over the thresholds;
* `dense_tiou`: the mean over the true segments of the best tIoU any of the answer's ranges reaches;
* `format`: 1 when the answer is in the form the record's is: for a grounding record (one true
  segment) exactly one range, for a dense-captioning record ranges each followed by a caption; every
  range start first, of positive length, within the duration where known; no line without a range.
  Else 0.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qprep.errors import SettingsError
from qprep.eval import grounding, temporal
from qprep.eval.segments import ParsedAnswer, Segment, parse_answer
from qprep.eval.truth import Truth, read_record

Reward = Callable[[list[str], list[str], list[dict]], Sequence[float]]


def truth_of(record: dict) -> Truth:
    """The true segments a completion answering `record` is scored against, and the video's duration."""
    try:
        truth = read_record(record)
    except ValueError as exc:
        raise SettingsError(f"record {_name(record)}: no truth to score answers against: {exc}") from exc
    duration = record.get("duration")
    if isinstance(duration, (int, float)) and not isinstance(duration, bool) and 0 < duration < math.inf:
        truth.duration = float(duration)
    return truth


def _name(record: dict) -> str:
    return repr(record["id"]) if "id" in record else "(no id)"


def scored_ranges(completion: str, duration: float | None) -> tuple[list[Segment], ParsedAnswer]:
    """The answer's ranges as the built-ins score them (one written end first, or with a time too large
    for a float, made empty; each clipped to the duration), and the answer as parsed."""
    parsed = parse_answer(grounding.answer_text(completion))
    ranges = []
    for index, segment in enumerate(parsed.segments):
        start, end = segment.start, segment.end
        if index in parsed.reversed_at or not math.isfinite(end):
            start = end = 0.0
        if duration is not None:
            start, end = min(start, duration), min(end, duration)
        ranges.append(Segment(start, end, segment.text))
    return ranges, parsed


def tiou(ranges: list[Segment], truth: Truth, parsed: ParsedAnswer) -> float:
    return grounding.iou(ranges[0], truth.segments[0]) if ranges else 0.0


def iou_v2(ranges: list[Segment], truth: Truth, parsed: ParsedAnswer) -> float:
    if not ranges:
        return 0.0
    predicted, true, duration = ranges[0], truth.segments[0], truth.duration
    # each time normalised by the duration, then subtracted: Time-R1's arithmetic, to the last bit
    start_factor = max(0.0, 1 - abs(true.start / duration - predicted.start / duration))
    end_factor = max(0.0, 1 - abs(true.end / duration - predicted.end / duration))
    return grounding.iou(predicted, true) * start_factor * end_factor


def dense_f1(ranges: list[Segment], truth: Truth, parsed: ParsedAnswer) -> float:
    scores = [temporal.f1(*temporal.precision_recall(ranges, truth.segments, t)) for t in temporal.TIOUS]
    return sum(scores) / len(scores)


def dense_tiou(ranges: list[Segment], truth: Truth, parsed: ParsedAnswer) -> float:
    best = temporal.best_tious(ranges, truth.segments)
    return sum(best) / len(best)


def format_score(ranges: list[Segment], truth: Truth, parsed: ParsedAnswer) -> float:
    dense = len(truth.segments) > 1
    if not ranges or (not dense and len(ranges) != 1) or parsed.reversed or parsed.unparsed:
        return 0.0
    within = all(0 <= s.start < s.end < math.inf and (truth.duration is None or s.end <= truth.duration)
                 for s in parsed.segments)
    captioned = not dense or all(s.text for s in parsed.segments)
    return float(within and captioned)


# name → (score of one answer, whether it needs the video's duration)
BUILT_INS: dict[str, tuple[Callable[[list[Segment], Truth, ParsedAnswer], float], bool]] = {
    "tiou": (tiou, False), "iou_v2": (iou_v2, True), "dense_f1": (dense_f1, False),
    "dense_tiou": (dense_tiou, False), "format": (format_score, False)}


@dataclass(frozen=True)
class BuiltIn:
    """A built-in reward: each completion's answer scored against its record's truth."""

    name: str

    def __call__(self, prompts: list[str], completions: list[str], records: list[dict]) -> list[float]:
        score, _ = BUILT_INS[self.name]
        truths: dict[int, Truth] = {}  # a prompt's G completions share its record: read its truth once
        rewards = []
        for completion, record in zip(completions, records):
            if id(record) not in truths:
                truths[id(record)] = self._truth(record)
            truth = truths[id(record)]
            ranges, parsed = scored_ranges(completion, truth.duration)
            rewards.append(score(ranges, truth, parsed))
        return rewards

    def problem(self, record: dict) -> str | None:
        """Why answers to `record` cannot be scored by this reward (before training), or None."""
        try:
            self._truth(record)
        except SettingsError as exc:
            return str(exc)
        return None

    def _truth(self, record: dict) -> Truth:
        truth = truth_of(record)
        if BUILT_INS[self.name][1] and truth.duration is None:
            raise SettingsError(f"record {_name(record)}: reward {self.name} needs the video's "
                                "duration (the record's `duration` or `meta.duration`, in seconds)")
        return truth


@dataclass(frozen=True)
class NamedReward:
    """A reward and the name its metrics are logged under. Calling it calls `fn` and checks its output."""

    name: str
    fn: Reward

    def __call__(self, prompts: list[str], completions: list[str], records: list[dict]) -> list[float]:
        if not len(prompts) == len(completions) == len(records):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and {len(records)} records")
        try:
            rewards = self.fn(prompts, completions, records)
        except SettingsError:
            raise
        except Exception as exc:
            raise SettingsError(f"reward {self.name} raised {type(exc).__name__}: {exc}") from exc
        return checked(self.name, rewards, len(completions))

    def problem(self, record: dict) -> str | None:
        """Why answers to `record` cannot be scored (a built-in's missing truth or duration), or None: a
        user's reward is trusted to score any record."""
        return self.fn.problem(record) if isinstance(self.fn, BuiltIn) else None


def checked(name: str, rewards, count: int) -> list[float]:
    """`rewards` as floats, when they are a list (or tuple) of `count` finite real numbers."""
    if not isinstance(rewards, (list, tuple)) or len(rewards) != count:
        size = f"of {len(rewards)}" if isinstance(rewards, (list, tuple)) else type(rewards).__name__
        raise SettingsError(f"reward {name} returned {size}, not a list of {count} floats (one per completion)")
    bad = next((r for r in rewards if not (isinstance(r, numbers.Real) and not isinstance(r, bool)
                                           and math.isfinite(r))), None)
    if bad is not None:
        raise SettingsError(f"reward {name} returned {bad!r} among its rewards: each must be a finite float")
    return [float(r) for r in rewards]


def resolve_rewards(specs: list[str]) -> list[NamedReward]:
    """`--reward` values (built-in names, or `package.module:function`) → the rewards, in order."""
    rewards = [NamedReward(spec, BuiltIn(spec)) if spec in BUILT_INS else _imported(spec) for spec in specs]
    names = [reward.name for reward in rewards]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise SettingsError(f"--reward: {', '.join(twice)} named twice (each reward is logged under its name)")
    return rewards


def _imported(spec: str) -> NamedReward:
    module_name, colon, attribute = spec.partition(":")
    if not (colon and module_name and attribute):
        raise SettingsError(f"--reward {spec}: not a built-in reward ({', '.join(BUILT_INS)}) nor an import path "
                            f"package.module:function")
    try:
        found = importlib.import_module(module_name)
    except Exception as exc:  # whatever stops the user's module from loading, reported with its cause
        raise SettingsError(f"--reward {spec}: cannot import {module_name} ({type(exc).__name__}: {exc})") from exc
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise SettingsError(f"--reward {spec}: {module_name} has no {attribute}")
        found = getattr(found, part)
    if not callable(found):
        raise SettingsError(f"--reward {spec}: {attribute} is a {type(found).__name__}, not a function")
    return NamedReward(attribute.rpartition(".")[2], found)
