"""What the tower stage is told about how much one call may take (its dtype: `qprep.schemas.dtypes`)."""

from __future__ import annotations

from dataclasses import dataclass


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

