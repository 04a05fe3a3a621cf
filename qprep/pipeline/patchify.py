"""Stage 4: resize each frame as it is decoded, then cut the clip into vision patches.

Everything here reproduces transformers' `Qwen2VLVideoProcessor` operation for operation, so the
output matches it bit for bit (tests/test_parity.py holds that):

* the target size is transformers' own `smart_resize` on the displayed frame size, with the
  processor's optional per-frame pixel cap; where the bounds cover the whole clip
  (`ModelSpec.pixel_bounds_per_clip`, Qwen3VLVideoProcessor), its own clip-level `smart_resize`;
* resizing is the very torchvision call the reference makes, one frame at a time as it is decoded,
  so a long 4K video never sits in memory at full size. Two references exist and they differ by up
  to ~11 levels: the processor's `transforms.v2` resize (with torchvision ≥ 0.29 on CPU, torch's
  native uint8 bicubic-antialias kernel) and qwen-vl-utils' `transforms.functional` resize (float
  bicubic-antialias, clamped and rounded). smart_resize mode follows the processor applied once
  to the decoded frames; fixed-size mode (`size`, which the processor cannot express) follows
  qwen-vl-utils' `resized_height`/`resized_width`, after which the processor leaves the frames be;
* the clip is padded to a multiple of `temporal_patch_size` by repeating its last frame and laid
  out so that each 2×2 merge group is four consecutive rows;
* normalization (`(x - 255·mean) / (255·std)` in float32, the processor's fused rescale) is kept
  apart: the pipeline ships uint8 patches, 4× smaller, and normalizes next to the tower.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as tv1F
import torchvision.transforms.v2.functional as tvF
from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as smart_resize_clip

from qprep.errors import GeometryError
from qprep.schemas.settings import ModelSpec, VideoSettings

MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses anything longer


def target_size(path: str, height: int, width: int, num_frames: int, settings: VideoSettings, spec: ModelSpec) -> tuple[int, int]:
    """The (height, width) every frame is resized to."""
    check_aspect(path, height, width)
    factor = spec.factor
    if settings.size is not None:
        # qwen-vl-utils' `resized_height`/`resized_width`: rounded to the factor, its image bounds.
        return smart_resize(*settings.size, factor=factor, min_pixels=4 * factor**2, max_pixels=16384 * factor**2)
    min_pixels = settings.min_pixels if settings.min_pixels is not None else spec.min_pixels
    max_pixels = settings.max_pixels if settings.max_pixels is not None else spec.max_pixels
    if spec.pixel_bounds_per_clip:
        return _clip_size(height, width, num_frames, min_pixels, max_pixels, spec)
    if spec.cap_pixels_per_frame:
        total_pixels = int(spec.max_video_tokens * factor * factor * 0.9)
        max_pixels = max(min(max_pixels, total_pixels * spec.temporal_patch_size // num_frames), int(min_pixels * 1.05))
    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def check_aspect(path: str, height: int, width: int) -> None:
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise GeometryError(path, f"aspect ratio {max(height, width) / min(height, width):.1f} of a {width}x{height} "
                                  f"picture exceeds the model's limit of {MAX_ASPECT_RATIO}")


def _clip_size(height: int, width: int, num_frames: int, min_pixels: int, max_pixels: int,
               spec: ModelSpec) -> tuple[int, int]:
    """Qwen3VLVideoProcessor's rule: the bounds hold for all frames together; with its per-frame cap,
    each frame gets at most `max_video_tokens` merged tokens or an even share of the budget."""
    factor = spec.factor
    if spec.cap_pixels_per_frame:
        per_frame = max(min(spec.max_video_tokens * factor * factor, max_pixels // num_frames), int(min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    return smart_resize_clip(num_frames=num_frames, height=height, width=width, temporal_factor=spec.temporal_patch_size,
                             factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def frame_to_tensor(rgb: np.ndarray, rotation: int) -> torch.Tensor:
    """An HxWx3 uint8 picture → a 3xHxW tensor, turned as a player would show it."""
    if rotation:
        rgb = np.rot90(rgb, k=rotation // 90)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def resize(frame: torch.Tensor, size: tuple[int, int], settings: VideoSettings) -> torch.Tensor:
    """Bicubic + antialias on uint8, through the same torchvision call as the reference."""
    if settings.size is not None:  # qwen-vl-utils' fixed size
        return tv1F.resize(frame, list(size), interpolation=tv1F.InterpolationMode.BICUBIC, antialias=True)
    return tvF.resize(frame, list(size), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def patchify(frames: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, 3, H, W] → ([grid_t·grid_h·grid_w, 3·tps·ps·ps], (grid_t, grid_h, grid_w)), same dtype."""
    ps, tps, ms = spec.patch_size, spec.temporal_patch_size, spec.merge_size
    if pad := -frames.shape[0] % tps:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = frames.shape
    grid = (t // tps, h // ps, w // ps)
    patches = frames.view(grid[0], tps, c, grid[1] // ms, ms, ps, grid[2] // ms, ms, ps)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(grid[0] * grid[1] * grid[2], c * tps * ps * ps), grid


def normalize(patches: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """uint8 patches → the float32 `pixel_values_videos` the processor produces."""
    mean = torch.tensor(spec.image_mean) * (1.0 / spec.rescale_factor)
    std = torch.tensor(spec.image_std) * (1.0 / spec.rescale_factor)
    channels = len(spec.image_mean)
    x = patches.to(torch.float32).view(patches.shape[0], channels, -1)
    return x.sub_(mean[:, None]).div_(std[:, None]).view(patches.shape)
