"""Times written into a conversation's text: seconds as qprep's `eval` reads them ("From 0.0 to
9.4, ..."), or LongVALE's relative units (its loader's 2-digit share of the clip's duration, for
comparisons with LongVALE's own evaluator)."""

from __future__ import annotations

from qprep.datasets.record import RecordError

UNITS = ("seconds", "relative")


def seconds_text(value: float) -> str:
    """9.4 → "9.4", 0 → "0.0", 49.4375 → "49.438": to the millisecond, never an exponent."""
    text = f"{float(value):.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def relative_text(value: float, duration: float) -> str:
    """LongVALE's (and VTimeLLM's) `convert`: min(round(x / duration * 100), 99), two digits."""
    if not duration or duration <= 0:
        raise RecordError(f"bad time: duration {duration!r}, needed for relative units")
    return f"{min(round(value / duration * 100), 99):02d}"


def time_text(value: float, units: str, duration: float | None) -> str:
    if units not in UNITS:
        raise ValueError(f"time units {units!r}: expected one of {', '.join(UNITS)}")
    return seconds_text(value) if units == "seconds" else relative_text(value, duration)
