"""What the tower stage is told: the dtype to run and store in, and how much one call may take."""

from __future__ import annotations

from dataclasses import dataclass

from qprep.errors import SettingsError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Budget:
    """How much one tower call may take: patch rows for vision, mel frames for audio. Batching is
    bitwise neutral (tested), so the budget only trades memory for speed."""

    video_patches: int = 32768
    audio_frames: int = 8 * 30000


def resolve_dtype(name: str, checkpoint_dtype: str) -> str:
    """'auto' is the dtype the checkpoint was saved in (bf16 for Qwen's releases)."""
    resolved = checkpoint_dtype if name == "auto" else name
    if resolved not in DTYPE_NAMES:
        raise SettingsError(f"dtype must be auto or one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return resolved
