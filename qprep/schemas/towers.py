"""What the tower stage is told: how much one call may take, and at which level of the vision tower
its output is stored (its dtype: `qprep.schemas.dtypes`)."""

from __future__ import annotations

from dataclasses import dataclass

from qprep.errors import SettingsError

# Where the visual tokens are taken from the vision tower:
# - "merged": the merger's output (`.pooler_output`), one row of the language model's width per
#   merged token; it serves runs whose merger is frozen.
# - "merger-input": what the merger is called with, the vision transformer's last hidden state (and,
#   where the tower has deepstack levels, what each deepstack merger is called with): merge² patch
#   rows of the vision width per merged token, in the order the merger consumes them. The trainer runs
#   the merger from the checkpoint's weights, frozen or trained.
MERGED, MERGER_INPUT = "merged", "merger-input"
LEVELS = (MERGED, MERGER_INPUT)


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise SettingsError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    return level


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

