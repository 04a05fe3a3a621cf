"""The config fingerprint: one hash over everything that changes the bytes a store holds.

Two runs with the same fingerprint produce the same tokens for the same video, so their shards can
live in one store. Anything else (Ray placement, videos per tower-stage batch) is left out: the towers
take one medium per call, or images in calls of one fixed size (`qprep.schemas.towers.Budget`; that
size is in), so which media run together never touches the output. One thing outside the config
can: on CPU, the towers' torch thread count (`qprep.schemas.towers.TowerThreads`, from the cores)
decides where an elementwise op's vectorised loop leaves a scalar tail, which moves some media's
tokens by an ulp (measured: `bench/tower_calls.py`); a store grown on machines with other core
counts can hold both. Each manifest row records its count, and `qprep verify` recomputes at it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from qprep.schemas.settings import ModelSpec, VideoSettings
from qprep.schemas.towers import MERGED

# Bump when the CPU stage or the tower stage changes the bytes they produce for the same input.
OUTPUT_VERSION = 1


def extraction_config(settings: VideoSettings, spec: ModelSpec, model: dict[str, Any], dtype: str,
                      attn_implementation: str, level: str = MERGED, image_rows: int = 0) -> dict[str, Any]:
    """Everything that decides a store's bytes, as plain JSON values (recorded in the store). The
    level, and the fixed size of image calls, only where they are not what every store held before
    they existed (merged tokens, one image a call: those fingerprints stay what they were)."""
    config = {
        "output_version": OUTPUT_VERSION,
        "settings": settings.to_dict(),
        "preprocessor": spec.to_dict(images=settings.images),
        "model": model,
        "dtype": dtype,
        "attn_implementation": attn_implementation,
    }
    if level != MERGED:
        config["level"] = level
    if image_rows:
        config["image_call_rows"] = image_rows
    return config


def fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of an extraction config."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=_plain)
    return hashlib.sha256(canonical.encode()).hexdigest()


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the values that differ between two configs (for the refusal message)."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names.extend(differences(a, b, f"{prefix}{key}."))
        elif json.dumps(a, sort_keys=True, default=_plain) != json.dumps(b, sort_keys=True, default=_plain):
            names.append(f"{prefix}{key}: {_short(a)} → {_short(b)}")
    return names


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not a JSON value: {value!r}")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=_plain)
    return text if len(text) <= 60 else text[:57] + "..."
