"""SODA_c, the story-level dense-captioning score LongVALE reports, as fujiso/SODA defines it
(`soda.py`: `SODA.evaluate`, `SODA.soda_c`, `SODA.chased_dp_assignment`, `SODA.calc_score_matrix`;
`dataset.py`: `ANETCaptions`), which LongVALE's `longvalellm/eval/dvc_eval/eval_soda.py` runs.

Per video, with the predicted and the true events each sorted by start time (stable):
* score[g][p] = tIoU(true g, predicted p) × METEOR, the tIoU being the dense-captioning evaluator's
  (`utils.iou`: hull union, or the lengths' sum when apart, + 1e-8). METEOR is pycocoevalcap's on
  PTB-tokenized ASCII captions, called as SODA calls it: `compute_score(predictions, truths)`, which
  makes the true caption METEOR's hypothesis and the predicted one its reference (METEOR is not
  symmetric; the order is kept so that the numbers are SODA's);
* the best order-preserving one-to-one matching, by dynamic programming:
  D[g][p] = max(D[g-1][p], D[g][p-1], D[g-1][p-1] + score[g][p]), its total S = D[last][last];
* precision S / #predicted, recall S / #true, F = 2PR / (P + R) (0 when P + R is 0).
SODA_c is the mean over videos of F (precision and recall are averaged the same way). SODA's
tIoU threshold for SODA_c is 0, so nothing is cut.

Where qprep differs, on purpose and as its other metrics do: every video of the truth counts, one
without an answer (or without a range in it) scoring 0, where SODA averages over the videos the
prediction file holds. LongVALE also merges neighbouring near-identical predicted captions before
scoring (`merge_similar_sentences`); qprep scores the answer as written.
"""

from __future__ import annotations

from dataclasses import dataclass

from qprep.eval import temporal
from qprep.eval.segments import Segment


@dataclass
class SodaResult:
    precision: float
    recall: float
    f1: float


def best_matching_total(scores: list[list[float]]) -> float:
    """The largest sum of scores over order-preserving one-to-one matchings of rows to columns
    (SODA's `chased_dp_assignment`, written bottom-up; its scores are never negative, so its -1
    borders act as the 0 row and column here)."""
    if not scores or not scores[0]:
        return 0.0
    previous = [0.0] * (len(scores[0]) + 1)
    for row in scores:
        current = [0.0]
        for p, score in enumerate(row):
            current.append(max(previous[p + 1], current[p], previous[p] + score))
        previous = current
    return previous[-1]


def by_start(segments: list[Segment]) -> list[Segment]:
    return sorted(segments, key=lambda s: s.start)  # stable, as SODA's `sorted(..., key=timestamp[0])`


def soda_c(predicted: list[Segment], truth: list[Segment], meteor) -> SodaResult:
    """One video's SODA_c. `meteor(hypothesis, reference)` → METEOR of two tokenized captions;
    called as METEOR(true caption, predicted caption), as SODA calls it."""
    predicted, truth = by_start(predicted), by_start(truth)
    if not predicted or not truth:
        return SodaResult(0.0, 0.0, 0.0)
    scores = [[temporal.tiou(p, g) * meteor(g.text, p.text) for p in predicted] for g in truth]
    total = best_matching_total(scores)
    precision, recall = total / len(predicted), total / len(truth)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return SodaResult(precision, recall, f1)
