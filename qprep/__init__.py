"""qprep: prepare video for Qwen multimodal fine-tuning once, then train from the cache."""

from qprep.errors import QprepError, SettingsError, VideoError
from qprep.pipeline.prepare import PreparedVideo, preprocess_video
from qprep.store.reader import open_cache
from qprep.schemas.settings import ModelSpec, VideoSettings, load_model_spec

__all__ = [
    "ModelSpec",
    "PreparedVideo",
    "QprepError",
    "SettingsError",
    "VideoError",
    "VideoSettings",
    "load_model_spec",
    "open_cache",
    "preprocess_video",
]
__version__ = "0.1.0"
