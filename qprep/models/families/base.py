"""What a model family means to qprep, behind one small interface.

A family is one transformers model type (or a few sharing classes). Its module in this package is
the one place that knows, for that family:

* the checkpoint: which towers exist, their transformers classes, the key prefixes of their weights
  (in the released hub layout and in the one `save_pretrained` writes) and the conversions the
  releases' weights need (`weight_conversions`), the language model's and `lm_head`'s, and the
  full-model class that `verify` and the parity tests compare against;
* the video processor's frame-size rule (`video_pixel_bounds`, `pixel_bounds_per_clip`);
* the prompt: the placeholder tokens, the token layout of a video block (`video_block`: time stamps
  as text, audio interleave) and how the model positions it (`position_ids`: the family's own
  `get_rope_index`, called as its model does);
* the store and training: what the tower returns beside the merged tokens (`deepstack_levels`),
  what the language model takes besides embeddings and positions (`text_model_inputs`), and the
  default LoRA targets.

The rest of qprep asks a `Family` (through `Checkpoint.family`) or the `PromptLayout` it binds to a
checkpoint and tokenizer; nothing outside `qprep/models/` names a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from qprep.schemas.manifest import ManifestRow

# peft target module names of the language model's attention and MLP projections.
ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class PlaceholderIds:
    """The tokenizer's ids of the placeholders (they are also in the model config)."""

    vision_start: int  # the token opening a video (or image) block
    vision_end: int
    video: int  # one per merged visual token of a video
    audio: int | None = None  # one per audio token (families with an audio tower)
    audio_start: int | None = None
    audio_end: int | None = None
    image: int | None = None  # one per merged visual token of an image


@dataclass
class RopeInputs:
    """What `Family.position_ids` reads of a batch (`qprep.train.model.Batch` has the same fields)."""

    input_ids: "torch.Tensor"  # [batch, length]
    attention_mask: "torch.Tensor"
    video_grid_thw: "torch.Tensor | None"  # [videos, 3] in placeholder order; None: no video
    second_per_grid: "torch.Tensor | None"  # [videos] float64
    mel_lengths: "torch.Tensor | None" = None  # [videos] valid mel frames, with audio in the videos
    audio_in_video: bool = False  # the videos' blocks hold their audio (one flag for all)
    image_grid_thw: "torch.Tensor | None" = None  # [images, 3] in placeholder order; None: no image


def as_cpu(values: "torch.Tensor | None") -> "torch.Tensor | None":
    return None if values is None else values.cpu()


def plain_video_block(grid_thw, ids: PlaceholderIds, merge_size: int, placeholder: int | None = None) -> list[int]:
    """Start, one placeholder per merged token, end: a video block with no audio and no time text
    (an image's block, with `placeholder` the image's)."""
    grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
    tokens = grid_t * (grid_h // merge_size) * (grid_w // merge_size)
    return [ids.vision_start] + [ids.video if placeholder is None else placeholder] * tokens + [ids.vision_end]


def token_types(ids, config, video_type: int, image_type: int):
    """`mm_token_type_ids` as the processors mark them: `video_type` at video tokens, `image_type` at
    image tokens, 0 elsewhere."""
    import torch

    return ((ids == config.video_token_id).to(torch.int32) * video_type
            + (ids == config.image_token_id).to(torch.int32) * image_type)


@dataclass(frozen=True)
class Family:
    """One model family: where its parts live in a checkpoint and which classes run them.

    Subclasses add the behaviour that differs between families (`placeholder_ids`, `video_block`,
    `position_ids`, `media_token_ids`)."""

    name: str
    module: str  # the transformers module holding every class named below
    vision_class: str
    audio_class: str | None  # None: the family has no audio tower
    feature_class: str  # owns get_video_features / get_audio_features / get_rope_index
    text_class: str  # the language model alone
    full_model: tuple[str, str | None]  # transformers class of the whole checkpoint, and the part that sees video
    thinker_key: str | None  # the sub-config holding the towers' configs (None: the top config)
    vision_prefixes: tuple[str, ...]  # checkpoint key prefixes, first match wins
    audio_prefixes: tuple[str, ...]
    text_prefixes: tuple[str, ...]  # (tower keys never count for these)
    lm_head_prefixes: tuple[str, ...]
    # the vision config's key for the merged tokens' width (the language model's): Qwen2-VL's tower
    # calls it hidden_size, the later ones out_hidden_size (their hidden_size is the tower's own)
    merged_width_key: str = "out_hidden_size"
    vision_width_key: str = "hidden_size"  # the vision config's key for the vision transformer's own width
    lora_targets: tuple[str, ...] = ATTENTION_AND_MLP
    pixel_bounds_per_clip: bool = False  # the video processor's size bounds all frames together, not each
    # the processor featurizes an audio track whole (padded to its own length, never cut), not in
    # padded windows of the feature extractor's chunk_length
    audio_whole_track: bool = False
    # transformers' implementation keeps packed samples apart (its attention reads the packed-sequence
    # mask); False where some layer would carry state from one sample into the next
    isolates_packed_samples: bool = True
    # (state dict, module) -> state dict: what transformers converts at load time for this family's
    # checkpoints (released weight names or shapes that differ from the module's), applied in order
    weight_conversions: tuple[Callable[[dict, Any], dict], ...] = ()
    # the vision transformer attends within windows and runs its blocks and merger on the patches in
    # window order, putting the merger's output back in the processor's order (Qwen2.5's)
    window_attention: bool = False

    @property
    def has_audio(self) -> bool:
        return self.audio_class is not None

    def video_pixel_bounds(self, processor) -> tuple[int, int]:
        """(min, max) pixels per frame that the checkpoint's own processor (`AutoProcessor`, as
        released) resizes video within when the caller names none.

        That is the processor's own default for video where its class has one, which wins over the
        video processor's config: `Qwen2_5OmniProcessor` resizes within 128·28²–768·28² whatever the
        released `preprocessor_config.json` says (its bounds, 3136–12845056, are the image
        processor's). Read through the processor's own kwargs merge, so the rule is transformers'."""
        merged = processor._merge_kwargs(getattr(processor, "valid_processor_kwargs", None),
                                         tokenizer_init_kwargs=processor.tokenizer.init_kwargs)
        size = merged["videos_kwargs"].get("size") or processor.video_processor.size
        return int(size["shortest_edge"]), int(size["longest_edge"])

    def image_pixel_bounds(self, processor) -> tuple[int, int]:
        """(min, max) pixels of one image as the checkpoint's own processor resizes it when the caller
        names none: its images kwargs' size where its class sets one, else its image processor's."""
        merged = processor._merge_kwargs(getattr(processor, "valid_processor_kwargs", None),
                                         tokenizer_init_kwargs=processor.tokenizer.init_kwargs)
        size = merged["images_kwargs"].get("size") or processor.image_processor.size
        return int(size["shortest_edge"]), int(size["longest_edge"])

    def merger_input_shape(self, vision_config: dict) -> tuple[int, int]:
        """(merge², vision width): the merger's input rows for one merged token (`vision_config` as
        config.json holds it)."""
        return int(vision_config.get("spatial_merge_size", 2)) ** 2, int(vision_config[self.vision_width_key])

    def placeholder_ids(self, tokenizer) -> PlaceholderIds:
        raise NotImplementedError

    def media_token_ids(self, config) -> tuple[int, int | None]:
        """(video placeholder id, audio placeholder id or None) as the model config names them."""
        raise NotImplementedError

    def image_token_id(self, config) -> int:
        """The image placeholder id as the model config names it."""
        return config.image_token_id

    def image_block(self, layout: "PromptLayout", row: ManifestRow) -> list[int]:
        """The ids that stand for one cached image: start, a placeholder per merged token, end."""
        return plain_video_block(row.grid_thw, layout.ids, layout.merge_size, placeholder=layout.ids.image)

    def video_block(self, layout: "PromptLayout", row: ManifestRow, start: int = 0) -> list[int]:
        """The ids that stand for one cached video (its manifest row) in a prompt, with its audio
        where the layout puts audio in the block. `start`: the position of the block's first token
        in the prompt (where the layout depends on it)."""
        raise NotImplementedError

    def audio_token_counts(self, audio_tower, mel_lengths: "torch.Tensor") -> "torch.Tensor":
        """Audio tokens the tower makes of tracks (or windows) of these many mel frames."""
        raise NotImplementedError

    def deepstack_levels(self, config) -> int:
        """How many deepstack feature levels the vision tower returns beside its merged tokens
        (`config`: `Checkpoint.model_config()`)."""
        return 0

    def merger_order(self, grid_thw, vision_config) -> "torch.Tensor | None":
        """Where each merged token of one medium's merger output goes in the processor's order (the
        merger's input sits in the order the vision transformer's blocks leave it); None: the same
        order. Window attention: the inverse of the window index, from transformers' own
        `get_vision_window_index`, as the vision tower's forward computes it."""
        if not self.window_attention:
            return None
        import torch
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            torch.tensor([list(grid_thw)], dtype=torch.int64), spatial_merge_size=vision_config.spatial_merge_size,
            window_size=vision_config.window_size, patch_size=vision_config.patch_size)
        return torch.argsort(window_index)

    def text_model_inputs(self, batch, config) -> dict:
        """What the language model takes besides embeddings and positions (e.g. deepstack features)."""
        return {}

    def position_ids(self, rope_model, batch, config) -> "torch.Tensor":
        """[3, batch, length] positions of a batch, from the family's own `get_rope_index` on
        `rope_model` (a weightless instance of `feature_class`)."""
        raise NotImplementedError

    def prompt_layout(self, checkpoint, tokenizer) -> "PromptLayout":
        get = tokenizer.convert_tokens_to_ids
        return PromptLayout(family=self, ids=self.placeholder_ids(tokenizer), config=checkpoint.model_config(),
                            merge_size=checkpoint.merge_size, pad_id=get("<|endoftext|>"), turn_end_id=get("<|im_end|>"),
                            tokenizer=tokenizer)


@dataclass(frozen=True)
class PromptLayout:
    """How a cached video enters a prompt for one checkpoint: its family's layout, with the
    tokenizer's placeholder ids and the model config's numbers bound."""

    family: Family
    ids: PlaceholderIds
    config: Any  # the transformers config `get_rope_index` reads (`Checkpoint.model_config`)
    merge_size: int
    pad_id: int  # what pads a batch (ChatML's <|endoftext|>)
    turn_end_id: int  # what closes a turn (<|im_end|>), the last label of an answer
    tokenizer: Any = None  # for text inside a block (time stamps)
    _text_ids: dict = field(default_factory=dict, compare=False, repr=False)  # text → ids, tokenized once
    _rope: dict = field(default_factory=dict, compare=False, repr=False)  # the weightless rope model, made once

    @property
    def audio(self) -> bool:
        """Whether a video's own audio goes into its block (families with an audio tower)."""
        return self.family.has_audio

    def video_block(self, row: ManifestRow, start: int = 0) -> list[int]:
        """The block of one cached video (its manifest row), its first token at position `start`."""
        return self.family.video_block(self, row, start)

    def block(self, row: ManifestRow, start: int = 0) -> list[int]:
        """The block of one cached medium, whatever its kind."""
        return self.family.image_block(self, row) if row.kind == "image" else self.video_block(row, start)

    def placeholder(self, kind: str) -> int:
        """The token of the chat template's placeholder for a medium of `kind`."""
        return self.ids.image if kind == "image" else self.ids.video

    def block_start(self, prefix: list[int], earlier: list[ManifestRow]):
        """The position of a block's first token when `prefix` (ids, holding the blocks of the
        `earlier` media) comes before it: the family's own `get_rope_index` continues from the last
        position of the prefix (a scalar tensor of its dtype: Qwen3-Omni's positions are float)."""
        if not earlier:
            return len(prefix)  # text alone before it: one position per token
        import torch

        videos = [row for row in earlier if row.kind != "image"]
        images = [row for row in earlier if row.kind == "image"]
        audio = self.audio and bool(videos) and all(row.has_audio for row in videos)
        ids = torch.tensor([prefix], dtype=torch.int64)
        inputs = RopeInputs(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            video_grid_thw=torch.tensor([row.grid_thw for row in videos], dtype=torch.int64) if videos else None,
            second_per_grid=(torch.tensor([row.second_per_grid for row in videos], dtype=torch.float64)
                             if videos else None),
            mel_lengths=torch.tensor([row.mel_length for row in videos]) if audio else None, audio_in_video=audio,
            image_grid_thw=torch.tensor([row.grid_thw for row in images], dtype=torch.int64) if images else None)
        return self.family.position_ids(self.rope_model, inputs, self.config)[..., -1].max() + 1

    @property
    def rope_model(self):
        """A weightless instance of the family's `feature_class` (`get_rope_index` reads only the config)."""
        if "model" not in self._rope:
            import importlib

            import torch

            with torch.device("meta"):
                self._rope["model"] = getattr(importlib.import_module(self.family.module),
                                              self.family.feature_class)(self.config)
        return self._rope["model"]

    def text_ids(self, text: str) -> list[int]:
        """`text` tokenized alone, as the processor's prompt tokenizes it between special tokens."""
        if text not in self._text_ids:  # a data set repeats the same few hundred time stamps
            self._text_ids[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(self._text_ids[text])
