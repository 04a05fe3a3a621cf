"""What the tower stage is told: the dtype to run and store in, and how much one call may take."""

from __future__ import annotations

from dataclasses import dataclass

from qprep.errors import SettingsError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Budget:
    """How much one tower call may pack: patch rows for vision, mel frames for audio.

    The default is one video per call. Packing several is not bitwise neutral in general: the
    BLAS and convolution kernels pick their algorithm (and how a reduction is split over threads)
    from the call's shapes, so a video's tokens can move by an ulp with its batch-mates (measured:
    six 1 s audio tracks in one call, 6e-8 in fp32). With one video per call a video's tokens do not
    depend on which other videos a run happens to extract, so a resumed or incremental run writes
    the bytes an uninterrupted one would. A budget > 0 packs for throughput and gives that up."""

    video_patches: int = 0
    audio_frames: int = 0


def torch_dtype(name: str):
    """The torch dtype of one of `DTYPE_NAMES` (torch is imported only when asked: a no-op re-run never is)."""
    import torch

    if name not in DTYPE_NAMES:
        raise SettingsError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def resolve_dtype(name: str, checkpoint_dtype: str) -> str:
    """'auto' is the dtype the checkpoint was saved in (bf16 for Qwen's releases)."""
    resolved = checkpoint_dtype if name == "auto" else name
    if resolved not in DTYPE_NAMES:
        raise SettingsError(f"dtype must be auto or one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return resolved
