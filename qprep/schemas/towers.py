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
    the bytes an uninterrupted one would. A budget > 0 packs for throughput and gives that up.

    `image_rows` > 0 packs images without giving it up: every image call is exactly that many patch
    rows, the rest filled with images of zeros (each its own attention segment), so every call runs
    the same kernels at the same shapes whatever images share it. What the vision towers do to one
    image's rows is then the same at any offset in the call: attention, norms, linear layers and the
    merger are per image or per row, and with a power-of-two call size no elementwise op leaves a
    scalar tail (PyTorch's CPU loops take 32 floats at a time through SLEEF and the rest through
    libm) that depends on where the call splits over threads (`bench/tower_calls.py` measures it).
    The bytes are then not one-image-a-call's (an ulp for some sizes), so the size is part of the
    store's fingerprint. An image of more rows than that goes alone, at its own size."""

    video_patches: int = 0
    audio_frames: int = 0
    image_rows: int = 0

    def __post_init__(self) -> None:
        rows = self.image_rows
        if rows and (rows < 64 or rows & (rows - 1)):
            raise SettingsError(f"image call rows {rows}: a power of two of 64 or more (a call of another size "
                                f"can leave an elementwise op's scalar tail that moves with an image's offset)")


@dataclass(frozen=True)
class TowerThreads:
    """The torch threads of tower calls on a CPU, by kind of medium.

    A video's CPU stage (decoding, resizing) keeps the other cores busy beside its tower call, so videos
    and audio files take half the cores; an image's CPU stage is a small fraction of its tower call
    (a photo: about 0.1 s of reading and resizing against seconds of tower), so images take them all.

    The count is not in the fingerprint, though it can move an ulp: PyTorch's CPU elementwise loops
    leave a scalar tail (libm's `exp` where the rest goes through SLEEF's) at each thread's share's
    end, so where a call splits over threads decides which values fall in it. Each manifest row
    records the count its tokens were made with (`tower_threads`), and `qprep verify` recomputes the
    medium at that count."""

    media: int = 1  # videos (with their sound) and audio files
    images: int = 1

    @classmethod
    def for_cores(cls, cores: int, fixed: int | None = None) -> TowerThreads:
        """The counts on `cores` usable cores (the machine's the towers run on: the local executor's
        and Ray's tower actor alike, so both write the same bits there), or `fixed` for every kind."""
        if fixed:
            return cls(fixed, fixed)
        return cls(media=max(1, cores // 2), images=max(1, cores))

    def of(self, kind: str) -> int:
        return self.images if kind == "image" else self.media
