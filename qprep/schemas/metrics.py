"""A metrics row as JSON: every line of `metrics.jsonl`, `best.json` and `qprep eval --json` is
written here.

JSON has no NaN or Infinity. Python's `json` writes them anyway, and strict readers (jq,
JavaScript, Go, `json.loads(..., parse_constant=...)` raising) then reject the whole line or file.
A number that is not finite is written as `null`, and the caller is told where it was so that it
can say so: a metric that could not be computed is missing, not a value.
"""

from __future__ import annotations

import json
import math


def finite(value, where: str = "") -> tuple[object, list[str]]:
    """`value` (dicts, lists and tuples walked) with each non-finite float replaced by None, and
    the places replaced ("loss", "grounding.mIoU", "per_video[2].recall.0.5")."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [where or "the value"]
    if isinstance(value, dict):
        out, replaced = {}, []
        for key, item in value.items():
            out[key], found = finite(item, f"{where}.{key}" if where else str(key))
            replaced += found
        return out, replaced
    if isinstance(value, (list, tuple)):
        out, replaced = [], []
        for index, item in enumerate(value):
            clean, found = finite(item, f"{where}[{index}]")
            out.append(clean)
            replaced += found
        return out, replaced
    return value, []


def metrics_json(row, *, indent: int | None = None, warn=None) -> str:
    """`row` as strict JSON (never NaN or Infinity): non-finite numbers as null, each named to
    `warn` (a callable taking one line) where given."""
    clean, replaced = finite(row)
    if replaced and warn is not None:
        warn(f"not a finite number, written as null: {', '.join(replaced)}")
    return json.dumps(clean, indent=indent, allow_nan=False)
