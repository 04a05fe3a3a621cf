"""Caption metrics of the pairs the temporal match makes, through pycocoevalcap (the library the
field scores captions with), as the ActivityNet dense-captioning evaluator calls it.

At each tIoU threshold every (predicted, true) pair whose tIoU reaches it (`>=`) is a pair, and a
prediction that reaches no true segment is paired with a reference no caption matches
(`abc123!@#`, the evaluator's); captions are made ASCII and tokenized by pycocoevalcap's
`PTBTokenizer` (Stanford's, in Java); each metric is computed per video over that video's pairs
(a video without an answer scores 0), averaged over the videos, then over the thresholds.
BLEU-4 and CIDEr run in Python; METEOR needs a Java runtime, as the tokenizer does. Without Java
the report says so, leaves METEOR out and tokenizes as PTBTokenizer does for plain English
(lower case, punctuation split off and dropped), which it names.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys

NO_MATCH = "abc123!@#"
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def ascii_only(text: str) -> str:
    return "".join(c if ord(c) < 128 else " " for c in text)


def java_available() -> bool:
    return shutil.which("java") is not None


def tokenize(captions: list[str]) -> tuple[dict[str, str], str]:
    """Each distinct caption → its tokens joined by spaces, and the tokenizer's name."""
    unique = sorted(set(captions))
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with _quiet_stderr():  # the Java tokenizer reports its speed there
            tokens = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(unique)})
        return {c: tokens[i][0] for i, c in enumerate(unique)}, "PTBTokenizer"
    return {c: _plain_tokens(c) for c in unique}, "qprep's plain tokenizer (no Java runtime for PTBTokenizer)"


@contextlib.contextmanager
def _quiet_stderr():
    """The process's stderr (file descriptor 2, which a child inherits) sent to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _plain_tokens(caption: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?|[^\sA-Za-z0-9]", caption.lower())
    return " ".join(w for w in words if w not in PUNCTUATION)


class CaptionScorer:
    """BLEU-4, CIDEr and (with Java) METEOR of one video's pairs; `metrics` names what it computes."""

    def __init__(self, meteor: bool | None = None):
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider

        self.scorers = {"BLEU-4": Bleu(4), "CIDEr": Cider()}
        self.notes: list[str] = []
        if meteor is None:
            meteor = java_available()
        if meteor:
            try:
                from pycocoevalcap.meteor.meteor import Meteor

                self.scorers["METEOR"] = Meteor()
            except OSError as exc:
                self.notes.append(f"METEOR left out: its Java process did not start ({exc})")
        else:
            self.notes.append("METEOR left out: no Java runtime (`java` on PATH) to run it")

    @property
    def metrics(self) -> list[str]:
        return list(self.scorers)

    def meteor_scores(self, pairs: list[tuple[str, str]]) -> list[float]:
        """METEOR of each (hypothesis, reference) pair of tokenized captions, in one call to its
        process (each pair's score is its own: the batch changes none)."""
        if not pairs:
            return []
        res = {i: [hypothesis] for i, (hypothesis, _) in enumerate(pairs)}
        gts = {i: [reference] for i, (_, reference) in enumerate(pairs)}
        _, scores = self.scorers["METEOR"].compute_score(gts, res)
        return [float(s) for s in scores]

    def score(self, pairs: list[tuple[str, str]]) -> dict[str, float]:
        """pairs: (predicted tokens, true tokens), already tokenized."""
        if not pairs:
            return {name: 0.0 for name in self.scorers}
        res = {i: [pred] for i, (pred, _) in enumerate(pairs)}
        gts = {i: [true] for i, (_, true) in enumerate(pairs)}
        out = {}
        for name, scorer in self.scorers.items():
            with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts
                value, _ = scorer.compute_score(gts, res)
            out[name] = float(value[3] if name == "BLEU-4" else value)
        return out
