"""qprep: prepare video for Qwen multimodal fine-tuning once, then train from the cache.

The public names load on first use, so that light commands (`qprep status`, a no-op
`qprep extract`) never import torch or transformers.
"""

from __future__ import annotations

import importlib

from qprep.errors import QprepError, SettingsError, VideoError

_LAZY = {
    "ModelSpec": "qprep.schemas.settings",
    "VideoSettings": "qprep.schemas.settings",
    "load_model_spec": "qprep.schemas.settings",
    "PreparedVideo": "qprep.pipeline.prepare",
    "preprocess_video": "qprep.pipeline.prepare",
    "open_cache": "qprep.store.reader",
    "extract": "qprep.extraction.run",
    "evaluate": "qprep.eval.score",
}

__all__ = ["QprepError", "SettingsError", "VideoError", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qprep' has no attribute {name!r}")
