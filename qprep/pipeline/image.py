"""The CPU stage of an image: one file in, the uint8 patches of one temporal patch out.

What transformers' Qwen image processors do, operation for operation (tests/test_images.py holds it
bit for bit against the checkpoint's own processor):

* the file is read as transformers' `load_image` reads it: PIL, the EXIF orientation applied
  (`ImageOps.exif_transpose`: a phone photo taken upright is upright), converted to RGB. Any format
  PIL reads (JPEG, PNG, WebP, BMP, TIFF; a GIF's first frame). qwen-vl-utils' `fetch_image` does
  not apply the orientation, so a rotated photo reaches the model turned there;
* its size is `smart_resize` within the image processor's own bounds (`ModelSpec.image_pixels`),
  resized with the same torchvision call as the video frames (bicubic, antialias, on uint8);
* the one frame fills a whole temporal patch (`temporal_patch_size` copies, as the processor tiles
  it), grid (1, h, w); normalization waits for the tower, as for video.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from qprep.errors import SettingsError, UnreadableFileError
from qprep.pipeline.patchify import check_aspect, frame_to_tensor, patchify, resize, smart_resize
from qprep.schemas.settings import ModelSpec, VideoSettings

EXIF_ORIENTATION = 0x0112
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # the EXIF orientations that turn the picture a quarter turn


@dataclass(frozen=True)
class PreparedImage:
    patches: torch.Tensor  # uint8 [grid_h·grid_w, 3·tps·ps·ps]
    grid_thw: tuple[int, int, int]  # (1, grid_h, grid_w)
    width: int  # upright, before resizing
    height: int
    resized_width: int
    resized_height: int


def prepare_image(path: str | Path, spec: ModelSpec) -> PreparedImage:
    """Read, orient, resize and patchify one image as the checkpoint's image processor does."""
    _require_bounds(spec)
    rgb = load_upright(path)
    height, width = rgb.shape[:2]
    size = resized_size(path, height, width, spec)
    picture = resize(frame_to_tensor(rgb, 0), size, VideoSettings())
    patches, grid = patchify(picture[None], spec)
    return PreparedImage(patches, grid, width, height, resized_width=size[1], resized_height=size[0])


def header_grid(path: str | Path, spec: ModelSpec) -> tuple[int, int, int]:
    """The grid `prepare_image` gives the image, from its size turned by its EXIF orientation, without
    resizing it; a file it cannot read fails as `prepare_image` fails. Most formats give both from the
    header; a PNG whose EXIF chunk follows its pixels is decoded to find it (as Pillow reads it, and
    as `exif_transpose` in `prepare_image` does)."""
    _require_bounds(spec)
    with _opened(path) as image:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION) in SWAPPING_ORIENTATIONS:
            width, height = height, width
    height, width = resized_size(path, height, width, spec)
    return 1, height // spec.patch_size, width // spec.patch_size


def resized_size(path: str | Path, height: int, width: int, spec: ModelSpec) -> tuple[int, int]:
    """(height, width) the image processor resizes an upright image to, within its own bounds."""
    check_aspect(str(path), height, width)
    return smart_resize(height, width, factor=spec.factor, min_pixels=spec.image_pixels[0],
                        max_pixels=spec.image_pixels[1])


def load_upright(path: str | Path):
    """The image as an HxWx3 uint8 array, turned by its EXIF orientation, as `load_image` reads it."""
    import numpy as np
    from PIL import ImageOps

    with _opened(path) as image:
        return np.array(ImageOps.exif_transpose(image).convert("RGB"))


@contextlib.contextmanager
def _opened(path: str | Path):
    """The image open in PIL; whatever stops PIL reading it (not an image, truncated, a decompression
    bomb) an `UnreadableFileError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            yield image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableFileError(path, f"cannot read it as an image: {exc}") from None


def _require_bounds(spec: ModelSpec) -> None:
    if spec.image_pixels is None:
        raise SettingsError("this model spec holds no image bounds (a spec read from a checkpoint has them)")
