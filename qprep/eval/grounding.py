"""Temporal grounding: a sentence of the truth is a query, its answer names one time range, and the
range is scored by its IoU with the sentence's segment, as Charades-STA and ActivityNet Captions
grounding results are reported (and LongVALE's and Time-R1's evaluators compute them).

* A grounding answer is keyed `{video_id}#{i}`: query i is the i-th sentence of the video in the
  ground-truth file (from 0, in the file's order). `qprep infer --grounding` writes these ids.
* The prediction is the first time range the answer holds; where it holds `<answer>...</answer>`
  (Time-R1's format), the last such block is read.
* IoU = intersection / union, the union being the hull of the two ranges (0 when that is empty:
  two identical points). Unlike the dense-captioning tIoU there is no 1e-8: a perfect range scores 1.
* R1@m: the share of queries whose IoU reaches m (`>=`), at m = 0.3, 0.5, 0.7; mIoU: the mean IoU.
  Every query of the truth counts: one without an answer, or whose answer holds no range, scores 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qprep.eval.segments import Segment

THRESHOLDS = (0.3, 0.5, 0.7)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)


def query_id(video_id: str, index: int) -> str:
    return f"{video_id}#{index}"


def split_query_id(answer_id: str, videos) -> tuple[str, int] | None:
    """(video id, query index) when `answer_id` names a query of one of `videos`, else None."""
    video_id, separator, index = answer_id.rpartition("#")
    if separator and index.isdigit() and video_id in videos and answer_id not in videos:
        return video_id, int(index)
    return None


def answer_text(answer: str) -> str:
    """The part of an answer that holds its range: the last `<answer>` block if any (Time-R1's rule)."""
    blocks = _ANSWER_TAG.findall(answer)
    return blocks[-1] if blocks else answer


def iou(predicted: Segment, true: Segment) -> float:
    intersection = max(0.0, min(predicted.end, true.end) - max(predicted.start, true.start))
    union = max(predicted.end, true.end) - min(predicted.start, true.start)
    return intersection / union if union > 0 else 0.0


@dataclass
class QueryResult:
    id: str
    video: str
    index: int
    truth: Segment
    predicted: Segment | None  # None: no answer, or no range in it
    answered: bool
    iou: float = 0.0


@dataclass
class GroundingReport:
    queries: list[QueryResult]

    def recall_at(self, threshold: float) -> float:
        return _mean([float(q.iou >= threshold) for q in self.queries])

    @property
    def miou(self) -> float:
        return _mean([q.iou for q in self.queries])

    def metrics(self) -> dict[str, float]:
        """R1@0.3, R1@0.5, R1@0.7 and mIoU, as fractions (0.5 is 50 %)."""
        return {**{f"R1@{m:g}": self.recall_at(m) for m in THRESHOLDS}, "mIoU": self.miou}

    def to_dict(self, per_query: bool = True) -> dict:
        out = {"queries": len(self.queries), "answered": sum(q.answered for q in self.queries), **self.metrics()}
        if per_query:
            out["per_query"] = [{"id": q.id, "video": q.video, "query": q.index, "sentence": q.truth.text,
                                 "truth": [q.truth.start, q.truth.end],
                                 "predicted": None if q.predicted is None else [q.predicted.start, q.predicted.end],
                                 "answered": q.answered, "iou": q.iou} for q in self.queries]
        return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
