"""The tower stage: the frozen vision (and audio) towers of a checkpoint, and nothing else.

Only the tower weights are read (see `qprep.models.checkpoint`). The towers are built with the
model's own transformers classes and called through the model class's own `get_video_features` /
`get_audio_features`, so the merged visual tokens are `.pooler_output` exactly as the full model
computes them. By default each video is its own tower call: packing several into one call moves
their tokens by an ulp with their batch-mates (the kernels pick algorithms by shape), and a video's
bytes must not depend on which other videos a run extracts. An explicit `Budget` packs for throughput.

At the level `merger-input` (`qprep.schemas.towers`) the same call runs, and what the model's own
`visual.merger` (and each `visual.deepstack_merger_list[i]`) is called with is recorded by forward
pre-hooks on those modules: the vision transformer's state exactly as the full model hands it to its
merger (in window order where the tower attends in windows), not a copy of its forward.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import dataclass

import torch

from qprep.errors import SettingsError
from qprep.models.checkpoint import Checkpoint, load_weights
from qprep.pipeline.patchify import normalize
from qprep.schemas.settings import ModelSpec
from qprep.schemas.dtypes import resolve_dtype, torch_dtype
from qprep.schemas.towers import MERGED, MERGER_INPUT, Budget, check_level


@dataclass
class VideoInput:
    patches: torch.Tensor  # uint8 [rows, patch_dim]
    grid_thw: tuple[int, int, int]


@dataclass
class VideoFeatures:
    # merged visual tokens [t·h·w/merge², d]; at the merger-input level, the merger's input
    # [t·h·w/merge², merge², vision width] (one row per merged token)
    tokens: torch.Tensor
    # [levels, t·h·w/merge², d] (or [levels, t·h·w/merge², merge², vision width]), towers with deepstack levels
    deepstack: torch.Tensor | None


@dataclass
class AudioInput:
    mel: torch.Tensor  # float32 [mel bins, valid frames], the windows' valid frames back to back
    window_lengths: tuple[int, ...]  # valid frames of each processor window


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def torch_threads(count: int | None):
    """torch's CPU threads set to `count` inside the block (None: as they are), restored after."""
    kept = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count:
            torch.set_num_threads(kept)


class Towers(torch.nn.Module):
    """`visual` and (where the family has one) `audio_tower`, loaded alone from a checkpoint."""

    def __init__(self, checkpoint: Checkpoint, spec: ModelSpec, dtype: str = "auto", device: str | None = None,
                 attn_implementation: str = "sdpa", budget: Budget = Budget(), level: str = MERGED):
        super().__init__()
        from transformers.initialization import no_init_weights

        family = checkpoint.family
        module = importlib.import_module(family.module)
        self.spec, self.budget, self.family, self.level = spec, budget, family, check_level(level)
        self.dtype_name = resolve_dtype(dtype, checkpoint.dtype)
        self.device_name = device or default_device()
        tower_config = checkpoint.model_config()
        self.deepstack_levels = family.deepstack_levels(tower_config)
        self._features = getattr(module, family.feature_class)
        if hasattr(self._features, "get_image_features"):
            # Qwen3-VL's get_video_features is its get_image_features, called on `self`
            self.get_image_features = types.MethodType(self._features.get_image_features, self)
        weights_dtype = torch_dtype(self.dtype_name)
        # No random init: every parameter is overwritten from the checkpoint (strict load below).
        with no_init_weights():
            self.visual = getattr(module, family.vision_class)._from_config(
                tower_config.vision_config, dtype=weights_dtype, attn_implementation=attn_implementation)
            self.audio_tower = None
            if family.audio_class:
                self.audio_tower = getattr(module, family.audio_class)._from_config(
                    tower_config.audio_config, dtype=weights_dtype, attn_implementation=attn_implementation)
        load_weights(self.visual, checkpoint, family.vision_prefixes)
        if self.audio_tower is not None:
            load_weights(self.audio_tower, checkpoint, family.audio_prefixes)
        self.eval().requires_grad_(False).to(self.device_name)

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.visual.config, self.family.merged_width_key))

    @property
    def merger_input_shape(self) -> tuple[int, int]:
        """(merge², vision width): one merged token's rows of the merger's input."""
        unit = self.visual.config.spatial_merge_size ** 2
        return unit, self.visual.merger.hidden_size // unit

    def encode_videos(self, videos: list[VideoInput]) -> list[torch.Tensor]:
        """Merged visual tokens [t·h·w/merge², d] of each video, on the CPU."""
        return [features.tokens for features in self.video_features(videos)]

    def video_features(self, videos: list[VideoInput]) -> list[VideoFeatures]:
        """Merged tokens and (where the tower has them) deepstack levels of each video, on the CPU."""
        return self._visual_features(self._features.get_video_features, videos)

    def image_features(self, images: list[VideoInput]) -> list[VideoFeatures]:
        """The same for images, through the model's own `get_image_features` (grid (1, h, w)); with
        `budget.image_rows`, in calls of exactly that many patch rows."""
        rows = self.budget.image_rows
        return self._visual_features(self._features.get_image_features, images, rows or self.budget.video_patches,
                                     fixed=bool(rows))

    @torch.inference_mode()
    def _visual_features(self, method, videos: list[VideoInput], budget: int | None = None,
                         fixed: bool = False) -> list[VideoFeatures]:
        """`fixed`: each call filled up to exactly `budget` rows with images of zeros (a medium of more
        rows goes alone)."""
        out: list[VideoFeatures] = []
        budget = self.budget.video_patches if budget is None else budget
        for group in _groups([v.patches.shape[0] for v in videos], budget):
            pixels = torch.cat([normalize(videos[i].patches, self.spec) for i in group]).to(self.device_name)
            grids = [videos[i].grid_thw for i in group]
            if fixed and pixels.shape[0] < budget:
                fillers = filler_grids(budget - pixels.shape[0], self.visual.config)
                pixels = torch.cat([pixels, pixels.new_zeros(budget - pixels.shape[0], pixels.shape[1])])
                grids += fillers
            grid = torch.tensor(grids, dtype=torch.int64, device=self.device_name)
            if self.level == MERGER_INPUT:
                out += self._merger_inputs(method, pixels, grid)[:len(group)]
                continue
            output = method(self, pixels, grid)
            levels = getattr(output, "deepstack_features", None) or []  # [level][video] → [n, d]
            for index, tokens in enumerate(output.pooler_output[:len(group)]):
                deepstack = torch.stack([level[index] for level in levels]).to("cpu") if levels else None
                out.append(VideoFeatures(tokens.to("cpu"), deepstack))
        return out

    def _merger_inputs(self, method, pixels: torch.Tensor, grid: torch.Tensor) -> list[VideoFeatures]:
        """What the mergers were called with in one tower call, cut into its videos: a video's rows
        are consecutive (the window index of a packed call orders windows video by video)."""
        with recorded_merger_inputs(self.visual) as (last, deepstack):
            method(self, pixels, grid)
        unit, width = self.merger_input_shape
        counts = (grid.prod(-1) // unit).tolist()
        per_video = [part.reshape(-1, unit, width) for part in torch.split(last[0], [n * unit for n in counts])]
        levels = [[part.reshape(-1, unit, width) for part in torch.split(level[0], [n * unit for n in counts])]
                  for level in deepstack]
        return [VideoFeatures(tokens.to("cpu"), torch.stack([level[i] for level in levels]).to("cpu")
                              if levels else None) for i, tokens in enumerate(per_video)]

    @torch.inference_mode()
    def encode_audio(self, audios: list[AudioInput]) -> list[torch.Tensor]:
        """Audio tokens [m, d] of each track (its windows' tokens back to back), on the CPU."""
        if self.audio_tower is None:
            raise SettingsError("this model has no audio tower")
        out: list[torch.Tensor] = []
        for group in _groups([a.mel.shape[1] for a in audios], self.budget.audio_frames):
            features, mask, per_video = self._padded_windows([audios[i] for i in group])
            hidden = self._features.get_audio_features(self, features, mask).last_hidden_state
            lengths = self.family.audio_token_counts(self.audio_tower, mask.sum(-1))
            windows = torch.split(hidden, lengths.tolist())
            start = 0
            for count in per_video:
                out.append(torch.cat(windows[start:start + count]).to("cpu"))
                start += count
        return out

    def _padded_windows(self, audios: list[AudioInput]):
        """The processor's layout: one padded row per window plus its mask. What sits in the padding
        does not matter, `get_audio_features` drops it through the mask."""
        lengths = [n for audio in audios for n in audio.window_lengths]
        bins = audios[0].mel.shape[0]
        features = torch.zeros((len(lengths), bins, max(lengths)), dtype=torch.float32)
        mask = torch.zeros((len(lengths), max(lengths)), dtype=torch.int32)
        row = 0
        for audio in audios:
            for chunk in torch.split(audio.mel, list(audio.window_lengths), dim=1):
                features[row, :, : chunk.shape[1]] = chunk
                mask[row, : chunk.shape[1]] = 1
                row += 1
        features = features.to(self.device_name, torch_dtype(self.dtype_name))
        return features, mask.to(self.device_name), [len(a.window_lengths) for a in audios]


@contextlib.contextmanager
def recorded_merger_inputs(visual):
    """Record the input of `visual.merger` and of each deepstack merger while the block runs:
    ([merger input], [[level 0 input], ...]), filled as the tower's forward calls them."""
    last: list[torch.Tensor] = []
    mergers = list(getattr(visual, "deepstack_merger_list", None) or [])
    deepstack: list[list[torch.Tensor]] = [[] for _ in mergers]
    hooks = [visual.merger.register_forward_pre_hook(lambda module, args: last.append(args[0]))]
    for merger, level in zip(mergers, deepstack):
        hooks.append(merger.register_forward_pre_hook(lambda module, args, level=level: level.append(args[0])))
    try:
        yield last, deepstack
    finally:
        for hook in hooks:
            hook.remove()


def filler_grids(rows: int, config) -> list[tuple[int, int, int]]:
    """Grids of images of zeros that fill `rows` patch rows (a multiple of merge² = 4): one attention
    window each (Qwen2.5-VL's windows are window_size / patch_size patches a side; 8 × 8 for the
    others), so a filler costs what a small image costs, then a 2-patch-high strip for the rest."""
    side = getattr(config, "window_size", 0) // config.patch_size or 8
    side -= side % config.spatial_merge_size
    grids = [(1, side, side)] * (rows // (side * side))
    rest = rows - len(grids) * side * side
    if rest:
        height = config.spatial_merge_size
        grids.append((1, height, rest // height))
    return grids


def _groups(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices packed while their total stays within the budget (an item larger than
    the budget goes alone)."""
    groups: list[list[int]] = []
    total = 0
    for index, size in enumerate(sizes):
        if groups and total + size <= budget:
            groups[-1].append(index)
            total += size
        else:
            groups.append([index])
            total = size
    return groups

