"""The language model alone, fed with cached tower outputs.

Only the text model and `lm_head` are built and only their weights read: no tower is constructed
and no tower weight leaves the disk. What the full model does around them is reproduced with the
model's own code: the cached tokens are scattered into the placeholder positions of the text
embeddings (as the model's `masked_scatter`), positions come from the model class's own
`get_rope_index` (on a weightless meta-device instance: it needs only the config) and are always
passed explicitly, and the loss is the model's own `loss_function`.

From a store of the merger's input (level "merger-input"), the vision tower's mergers are built too
(`qprep.train.merger`, their weights alone) and turn the cached input into the merged tokens (and
deepstack levels) first, as the tower's forward does: frozen, or trained beside the LoRA.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass

import torch
from transformers.loss.loss_utils import LOSS_MAPPING

from qprep.models.checkpoint import Checkpoint, load_weights
from qprep.schemas.dtypes import resolve_dtype, torch_dtype


@dataclass
class Batch:
    """One padded batch in the model's terms. Cached tokens are concatenated in placeholder order."""

    input_ids: torch.Tensor  # [batch, length]
    attention_mask: torch.Tensor  # [batch, length]
    labels: torch.Tensor  # [batch, length], -100 where no loss
    # The merged visual tokens of the batch's images and videos, in placeholder order (sample by
    # sample): the order of their positions. None: no image or video (text-only samples). From a
    # store of the merger's input: that input, [all visual tokens, merge², vision width].
    video_tokens: torch.Tensor | None  # [all visual tokens, hidden]
    video_grid_thw: torch.Tensor | None  # [videos, 3]; None: no video
    second_per_grid: torch.Tensor | None  # [videos] float64
    # The audio tokens of the batch's audio files and (with `audio_in_video`) of its videos' own tracks,
    # in placeholder order, and each one's valid mel frames. None: no audio heard.
    audio_tokens: torch.Tensor | None = None  # [all audio tokens, hidden]
    mel_lengths: torch.Tensor | None = None  # [audio files and heard videos]
    deepstack: torch.Tensor | None = None  # [levels, all visual tokens, hidden] (towers with deepstack)
    # packed: one row of several samples side by side (no padding), their lengths in order
    sample_lengths: tuple[int, ...] | None = None
    image_grid_thw: torch.Tensor | None = None  # [images, 3]; None: no image
    # each sample's media kinds in placeholder order (None: one video per sample)
    media_kinds: tuple[tuple[str, ...], ...] | None = None
    # merger input only, towers that attend in windows: where each row of the mergers' output goes
    # (`Family.merger_order` of each medium, offset by the tokens before it); None: as they come
    merger_order: torch.Tensor | None = None
    # whether the videos' blocks hold their audio (one flag for the batch, as the model takes it)
    audio_in_video: bool = False

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "Batch":
        return self._map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":  # called by torch's DataLoader with pin_memory=True
        return self._map_tensors(torch.Tensor.pin_memory)

    def _map_tensors(self, change) -> "Batch":
        return Batch(**{name: change(value) if isinstance(value, torch.Tensor) else value
                        for name, value in vars(self).items()})


class LanguageModel(torch.nn.Module):
    # As the full models name their base (`model.language_model.*`): peft reads it when it scopes
    # transformers' weight conversions to the submodules it adapts.
    base_model_prefix = "model"

    def __init__(self, checkpoint: Checkpoint, dtype: str = "float32", device: str = "cpu",
                 attn_implementation: str = "sdpa", packing: bool = False, merger: bool = False):
        """`packing`: batches are packed rows (`Batch.sample_lengths`); with `sdpa`, each sample's
        attention then runs apart (`packed_attention.PACKED_SDPA`). `merger`: batches hold the
        merger's input (a store at the merger-input level); the vision tower's mergers are built."""
        super().__init__()
        from transformers.initialization import no_init_weights

        family = checkpoint.family
        module = importlib.import_module(family.module)
        self.config = checkpoint.model_config()
        self.family = family
        weights_dtype = torch_dtype(resolve_dtype(dtype, checkpoint.dtype))
        if packing:
            from qprep.train.packed_attention import attention_for_packing

            attn_implementation = attention_for_packing(attn_implementation)
        text_config = self.config.get_text_config()
        # Module paths mirror the full model's (`model.language_model.*`, `lm_head`): a LoRA adapter
        # trained here loads onto the full thinker / VL model with peft as it is.
        self.model = torch.nn.Module()
        with no_init_weights():
            self.model.language_model = getattr(module, family.text_class)._from_config(
                text_config, dtype=weights_dtype, attn_implementation=attn_implementation)
            self.lm_head = torch.nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False,
                                           dtype=weights_dtype)
        load_weights(self.model.language_model, checkpoint, family.text_prefixes)
        if getattr(self.config, "tie_word_embeddings", False):
            # as transformers ties them for this config (the smaller releases store no lm_head)
            self.lm_head.weight = self.language_model.get_input_embeddings().weight
        else:
            load_weights(self.lm_head, checkpoint, family.lm_head_prefixes)
        with torch.device("meta"):  # get_rope_index reads only the config: no weights behind it
            reference = getattr(module, family.feature_class)(self.config)
        if reference.loss_type not in LOSS_MAPPING:
            # transformers derives loss_type from the class name; for these multimodal classes it
            # finds none and its loss_function falls back to ForCausalLM, warning on every run that
            # the config set an unrecognized `loss_type=None`. Name that same fallback: same loss.
            reference.loss_type = "ForCausalLM"
        object.__setattr__(self, "_positions", reference)  # not a submodule: never moved, saved or trained
        self.mergers = None
        if merger:
            from qprep.train.merger import Merger

            self.mergers = Merger(checkpoint, dtype=dtype, device=device)
        self.to(device)

    @property
    def language_model(self):
        return self.model.language_model

    def position_ids(self, batch: Batch) -> torch.Tensor:
        """3-D (M-RoPE / TM-RoPE) positions, as the model computes them. A packed row: each sample's
        own positions side by side, under a text row that restarts at 0 with each sample (what the
        model reads to keep attention within a sample), [4, 1, length]."""
        if batch.sample_lengths is None:
            return self.family.position_ids(self._positions, batch, self.config).to(batch.input_ids.device)
        pieces = []
        for sample in unpacked(batch):
            positions = self.family.position_ids(self._positions, sample, self.config)
            text = torch.arange(positions.shape[-1], dtype=positions.dtype).view(1, 1, -1)
            pieces.append(torch.cat([text, positions]))
        return torch.cat(pieces, dim=-1).to(batch.input_ids.device)

    def merged(self, batch: Batch) -> Batch:
        """The batch with merged visual tokens (and deepstack levels): from the merger's input, the
        mergers' output; merged tokens as they are."""
        if batch.video_tokens is None or batch.video_tokens.dim() == 2:
            return batch
        if self.mergers is None:
            raise ValueError("the batch holds the merger's input; build the model with merger=True")
        deepstack = batch.deepstack
        if deepstack is not None:
            deepstack = self.mergers.deepstack(deepstack, batch.merger_order)
        return dataclasses.replace(batch, video_tokens=self.mergers.merged(batch.video_tokens, batch.merger_order),
                                   deepstack=deepstack, merger_order=None)

    def embed(self, batch: Batch) -> torch.Tensor:
        """Text embeddings with the cached tokens scattered into their placeholders (run through the
        mergers first where the batch holds their input: call `merged` once and pass its batch here
        and to `text_inputs`, or the mergers run twice)."""
        batch = self.merged(batch)
        embeds = self.language_model.get_input_embeddings()(batch.input_ids)
        video_id, audio_id = self.family.media_token_ids(self.config)
        visual = (batch.input_ids == video_id) | (batch.input_ids == self.family.image_token_id(self.config))
        if batch.video_tokens is not None or bool(visual.any()):
            embeds = _scatter(embeds, visual, batch.video_tokens)
        if batch.audio_tokens is not None:
            embeds = _scatter(embeds, batch.input_ids == audio_id, batch.audio_tokens)
        return embeds

    def text_inputs(self, batch: Batch) -> dict:
        """What the language model takes besides embeddings and positions (the family decides:
        deepstack features at the visual positions, for one)."""
        return self.family.text_model_inputs(self.merged(batch), self.config)

    def forward(self, batch: Batch | None, num_items_in_batch: int | None = None, *, run=None):
        """(loss, logits), the same as the full model's on the raw video. `num_items_in_batch`: divide
        the summed cross-entropy by this many label tokens (those of a whole accumulated step, as the
        Trainer passes it) instead of taking this batch's mean.

        `run`: instead, `run(self)`'s result, computed as this module's forward (see `run_as_forward`)."""
        if run is not None:
            return run(self)
        logits = self.lm_head(self.hidden_states(batch))
        loss = self._positions.loss_function(logits=logits, labels=batch.labels,
                                             vocab_size=self.config.get_text_config().vocab_size,
                                             num_items_in_batch=num_items_in_batch)
        return loss, logits

    def last_logits(self, batch: Batch, keep: int) -> torch.Tensor:
        """The logits of the last `keep` positions only, as the full model's `logits_to_keep` computes
        them (the same `lm_head` matmul shape): what scoring a completion needs, without a long
        prompt's full logits."""
        return self.lm_head(self.hidden_states(batch)[:, -keep:])

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """The language model's last hidden states [batch, length, hidden]."""
        # a packed row takes no attention mask: the model then keeps attention within each sample
        # from the restarting text positions (transformers' packed-sequence mask)
        mask = None if batch.sample_lengths is not None else batch.attention_mask
        batch = self.merged(batch)
        return self.language_model(inputs_embeds=self.embed(batch), attention_mask=mask,
                                   position_ids=self.position_ids(batch), use_cache=False,
                                   **self.text_inputs(batch)).last_hidden_state


def run_as_forward(model, computation):
    """`computation(language_model)` (any use of a `LanguageModel`: decoding, scoring completions) run
    inside the model's own forward call, through peft's wrapper where there is one. A model sharded
    with `--shard` (FSDP2) gathers its root weights (embeddings, final norm, `lm_head`) in the forward
    hooks of its outermost module only, and each decoder layer's in its own: a computation that
    reaches the embeddings or `lm_head` without passing through that forward would find their shards.
    Unsharded, this is `computation(language_model)` itself."""
    return model(None, run=computation)


def _scatter(embeds: torch.Tensor, where: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    count, cached = int(where.sum()), 0 if tokens is None else tokens.shape[0]
    if count != cached:
        raise ValueError(f"{count} placeholders but {cached} cached tokens")
    return embeds.masked_scatter(where.unsqueeze(-1).expand_as(embeds), tokens.to(embeds.device, embeds.dtype))


def unpacked(batch: Batch) -> list[Batch]:
    """The samples of a packed row, each a batch of one (what its positions are computed from)."""
    kinds = batch.media_kinds or (("video",),) * len(batch.sample_lengths)
    out, start, first = [], 0, {"video": 0, "image": 0, "heard": 0}
    for length, sample_kinds in zip(batch.sample_lengths, kinds):
        ids = batch.input_ids[:, start:start + length]
        counts = {kind: sample_kinds.count(kind) for kind in ("video", "image")}
        # the audio it hears, in `Batch.mel_lengths`: its audio files, and its videos' with audio_in_video
        counts["heard"] = sum(kind == "audio" or (batch.audio_in_video and kind == "video") for kind in sample_kinds)
        videos, images, heard = (slice(first[kind], first[kind] + counts[kind]) for kind in ("video", "image", "heard"))
        labels = batch.labels[:, start:start + length]
        out.append(Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                         video_tokens=None, video_grid_thw=_part(batch.video_grid_thw, videos),
                         second_per_grid=_part(batch.second_per_grid, videos),
                         mel_lengths=_part(batch.mel_lengths, heard),
                         audio_in_video=batch.audio_in_video and counts["video"] > 0,
                         image_grid_thw=_part(batch.image_grid_thw, images),
                         media_kinds=(sample_kinds,)))
        start += length
        first = {kind: first[kind] + counts[kind] for kind in first}
    return out


def _part(values: torch.Tensor | None, media: slice) -> torch.Tensor | None:
    """Some media's entries of a per-medium tensor; None where there are none."""
    return None if values is None or media.start == media.stop else values[media]
