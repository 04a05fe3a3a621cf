"""Temporal metrics of predicted segments against the true ones, as the ActivityNet dense-captioning
evaluator (densevid_eval, the convention LongVALE and its peers report) computes them.

* tIoU: intersection over union of two time ranges, with the evaluator's union (the hull, or the
  two lengths' sum when they are apart) and its 1e-8 in the denominator;
* at each threshold, per video: precision = the share of predicted segments whose tIoU with some
  true segment exceeds it (strictly), recall = the share of true segments some prediction exceeds
  it with; each averaged over the videos of the data (a video without an answer counts 0); F1 from
  the averaged precision and recall; and the means over the thresholds (0.3, 0.5, 0.7, 0.9);
* mean best tIoU: for each true segment the largest tIoU any prediction reaches, averaged over
  the true segments of a video, then over the videos (not in the evaluator; a threshold-free view).
"""

from __future__ import annotations

from qprep.eval.segments import Segment

TIOUS = (0.3, 0.5, 0.7, 0.9)


def tiou(a: Segment, b: Segment) -> float:
    intersection = max(0.0, min(a.end, b.end) - max(a.start, b.start))
    union = min(max(a.end, b.end) - min(a.start, b.start), (a.end - a.start) + (b.end - b.start))
    return intersection / (union + 1e-8)


def precision_recall(predicted: list[Segment], truth: list[Segment], threshold: float) -> tuple[float, float]:
    """One video's precision and recall at one threshold (0, 0 without predictions)."""
    if not predicted or not truth:
        return 0.0, 0.0
    hit_predictions, hit_truths = set(), set()
    for p, pred in enumerate(predicted):
        for t, true in enumerate(truth):
            if tiou(pred, true) > threshold:
                hit_predictions.add(p)
                hit_truths.add(t)
    return len(hit_predictions) / len(predicted), len(hit_truths) / len(truth)


def best_tious(predicted: list[Segment], truth: list[Segment]) -> list[float]:
    """For each true segment, the largest tIoU a prediction reaches with it."""
    return [max((tiou(pred, true) for pred in predicted), default=0.0) for true in truth]


def f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
