"""Training samples from LongVALE-style conversations and a cache.

A record is `{"id": ..., "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}` and names the
cached media its conversation reads (`load_records` reads the published formats `qprep.datasets`
knows into this form):

* without a `media` key, one video: the cached entry whose id is the record's id (LongVALE's form);
* with `"media": [id, ...]`, those cached entries in the order the conversation places them (any
  number; the same entry may come twice); `"media": []` is a text-only sample. The record's `id` is
  then only its name (optional: `#<index>` when absent).

Each `<video>`, `<image>` or `<audio>` in a user turn marks where the next medium goes (as LLaMA-Factory
and ms-swift write them; the cached entry's kind decides its placeholder). Media without a mark go, in
order, at the start of the first user turn; more marks than media is an error. An audio file (Omni
families) takes the block the family's processor gives an audio item: its start token, one
placeholder per cached audio token, its end token. Prompts are rendered by the tokenizer's own chat
template; labels cover the assistant turns only (their text and closing
`<|im_end|>`), -100 elsewhere. A record that cannot be used (a medium missing or failed in the
cache, too long, no answer to learn) is reported with its reason before training starts, never in the
middle of an epoch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qprep.errors import SettingsError
from qprep.models.families import PromptLayout
from qprep.schemas.manifest import ManifestRow

VIDEO_MARK, IMAGE_MARK, AUDIO_MARK = "<video>", "<image>", "<audio>"
MARKS = re.compile("|".join(re.escape(mark) for mark in (VIDEO_MARK, IMAGE_MARK, AUDIO_MARK)))
ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
IGNORE = -100


@dataclass
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]
    has_audio: bool = False  # its videos' audio tokens go into their blocks (batched apart: `loader`)
    # (an audio file's tokens have a block of their own: they need no such flag)
    media: tuple[str, ...] | None = None  # cached entry ids in placeholder order; None: the one video `id`

    def __post_init__(self):
        if self.media is None:
            self.media = (self.id,)


@dataclass
class Dataset:
    samples: list[Sample]
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason → ids
    cut: list[str] = field(default_factory=list)  # ids whose text was cut at max_length

    def report(self) -> str:
        lines = [f"{len(self.samples)} samples"]
        if self.cut:
            lines.append(f"cut {len(self.cut)} to --max-length in their text: {_some(self.cut)}")
        return "\n".join(lines + left_out_lines(self.skipped))


def left_out_lines(skipped: dict[str, list[str]]) -> list[str]:
    """One line per reason records were left out, with the first few ids."""
    return [f"left out {len(ids)}: {reason} ({_some(ids)})" for reason, ids in skipped.items()]


def _some(ids: list[str]) -> str:
    return ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")


def load_records(path, format: str | None = None, media_dir: str | Path | None = None) -> list[dict]:
    """The records of a data file in any format `qprep.datasets` reads (LLaMA-Factory, ms-swift,
    LLaVA, content blocks, LongVALE, grounding sets, qprep's own), in the form above. `path` may be
    a `qprep.datasets.DataFile` carrying the format and media folder (and reader options) to every
    rank. Records that cannot be used are on the list's `skipped` (reason → names)."""
    from qprep.datasets import DataFile, load

    if not isinstance(path, DataFile):
        path = DataFile(Path(path), format=format, media_dir=media_dir)
    return load(path)


def record_id(record: dict, index: int) -> str:
    """What a record is called in reports: its id, else its place in the file."""
    return str(record["id"]) if "id" in record else f"#{index}"


def record_media(record: dict) -> tuple[str, ...]:
    """The cached entries a record reads, in placeholder order."""
    media = record.get("media")
    return (str(record["id"]),) if media is None else tuple(media)


def messages(conversations: list[dict], media: int | Sequence[str] = 1) -> list[dict]:
    """LongVALE turns → chat-template messages, with the media (their kinds in order, or a count of
    videos) where `<video>` / `<image>` / `<audio>` marks them, the unmarked ones, in order, at the
    start of the first user turn. A mark stands for the next medium whatever its kind (LLaVA-Video
    writes `<image>` for a video): the cached entry's kind decides its placeholder."""
    kinds = ["video"] * media if isinstance(media, int) else list(media)
    out: list[dict] = []
    for turn in conversations:
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise SettingsError(f"unknown speaker {turn.get('from')!r} (expected human or gpt)")
        out.append({"role": role, "content": [{"type": "text", "text": str(turn.get("value", ""))}]})
    users = [m for m in out if m["role"] == "user"]
    if not users:
        raise SettingsError("a conversation needs a human turn")
    marks = sum(len(MARKS.findall(m["content"][0]["text"])) for m in users)
    if marks > len(kinds):
        raise SettingsError(f"{marks} {VIDEO_MARK}/{IMAGE_MARK}/{AUDIO_MARK} marks for {len(kinds)} media")
    unmarked, marked = kinds[: len(kinds) - marks], iter(kinds[len(kinds) - marks:])
    for m in users:
        m["content"] = _placed(m["content"][0]["text"], unmarked if m is users[0] else [], marked)
    return out


def _placed(text: str, unmarked: list[str], marked) -> list[dict]:
    """A user turn's content: the `unmarked` media first, then its text with the next of `marked` at
    each mark."""
    content: list[dict] = [{"type": kind} for kind in unmarked]
    for index, piece in enumerate(MARKS.split(text)):
        if index:
            content.append({"type": next(marked)})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return content or [{"type": "text", "text": ""}]


def tokenize(conversation: list[dict], tokenizer, turn_end: int) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and its labels (assistant turns, up to and including
    the `turn_end` token that closes each)."""
    ids = _render(tokenizer, conversation, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, conversation[:index], generation_prompt=True))
        stop = len(_render(tokenizer, conversation[: index + 1], generation_prompt=False))
        if ids[:start] != _render(tokenizer, conversation[:index], generation_prompt=True):
            raise SettingsError("the chat template does not render a conversation as a prefix of its continuation")
        for position in range(start, stop):
            labels[position] = ids[position]
            if ids[position] == turn_end:
                break
    return ids, labels


def build_dataset(records: list[dict], cache, tokenizer, layout: PromptLayout, *, max_length: int | None = None,
                  cut: bool = False) -> Dataset:
    """Samples ready to collate. Longer than `max_length`: left out, or with `cut` cut at
    `max_length` provided the cut falls after the last media block and leaves an answer token."""
    dataset = Dataset(samples=[], skipped={reason: list(names) for reason, names in
                                           getattr(records, "skipped", {}).items()})  # left out when read
    ok = set(cache.ids())
    for index, record in enumerate(records):
        name, media = record_id(record, index), record_media(record)
        reason = unusable_media(media, cache, ok, layout.audio)
        if reason:
            dataset.skipped.setdefault(reason, []).append(name)
            continue
        rows = [cache.row(medium) for medium in media]
        try:
            text_ids, labels = tokenize(messages(record["conversations"], [row.kind for row in rows]), tokenizer,
                                        layout.turn_end_id)
        except SettingsError as exc:
            dataset.skipped.setdefault(f"bad conversation: {exc}", []).append(name)
            continue
        if all(label == IGNORE for label in labels):  # its loss would be 0/0
            dataset.skipped.setdefault("no assistant answer to learn", []).append(name)
            continue
        input_ids, labels, blocks_end = with_media_blocks(text_ids, labels, rows, layout)
        if max_length is not None and len(input_ids) > max_length:
            reason = _over_length(blocks_end, labels, max_length, cut)
            if reason:
                dataset.skipped.setdefault(reason, []).append(name)
                continue
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            dataset.cut.append(name)
        dataset.samples.append(Sample(id=name, input_ids=input_ids, labels=labels, media=media,
                                      has_audio=videos_heard(rows, layout)))
    return dataset


def videos_heard(rows: list[ManifestRow], layout: PromptLayout) -> bool:
    """Whether the model hears these media's videos' own audio (their blocks hold it)."""
    return layout.audio and any(row.has_audio for row in rows if row.kind == "video")


NOT_CACHED = "video not in the cache"  # `unusable_media`'s reason for a medium the store does not hold


def unusable_media(media: tuple[str, ...], cache, ok: set[str], audio: bool | None) -> str | None:
    """Why a sample reading these cached entries (`ok`: the cache's ids extracted ok) cannot be built,
    or None. `audio`: the model hears audio, videos' own and audio files (`PromptLayout.audio`; None:
    not known here)."""
    for medium in media:
        if medium not in cache:
            return NOT_CACHED
        if medium not in ok:
            return "video failed extraction"
    if audio is False and any(cache.row(medium).kind == "audio" for medium in media):
        return "an audio file, and the model has no audio tower to hear it"
    if audio and len({row.has_audio for row in map(cache.row, media) if row.kind == "video"}) > 1:
        # the model positions a sample's videos with one use_audio_in_video flag (so does its processor)
        return "videos with and without audio in one sample (the model takes one use_audio_in_video flag)"
    return None


def with_media_blocks(text_ids: list[int], labels: list[int], rows: list[ManifestRow],
                      layout: PromptLayout) -> tuple[list[int], list[int], int]:
    """Each of the chat template's media placeholders (start, pad, end), in order, replaced by its
    cached medium's block (`PromptLayout.block`), which the labels ignore: (input ids, labels, where
    the last block ends)."""
    ids, out_labels, blocks_end = list(text_ids), list(labels), 0
    placeholders = {layout.ids.video, layout.ids.image, layout.ids.audio} - {None}
    for index, row in enumerate(rows):
        at = next((i for i in range(blocks_end, len(ids)) if ids[i] in placeholders), None)
        if at is None or ids[at] != layout.placeholder(row.kind):
            raise ValueError(f"the prompt's placeholder {index} does not stand for a {row.kind} ({row.id})")
        block = layout.block(row, start=layout.block_start(ids[: at - 1], rows[:index]))
        ids[at - 1: at + 2] = block
        out_labels[at - 1: at + 2] = [IGNORE] * len(block)
        blocks_end = at - 1 + len(block)
    if placeholders & set(ids[blocks_end:]):
        raise ValueError(f"the prompt has more media placeholders than the {len(rows)} media given")
    return ids, out_labels, blocks_end


def prompt_ids(conversation: list[dict], rows: list[ManifestRow], tokenizer, layout: PromptLayout) -> list[int]:
    """The chat template's rendering of `conversation` with the assistant's turn opened, and its media's
    blocks in place as training lays them out: what generation continues from."""
    text_ids = _render(tokenizer, conversation, generation_prompt=True)
    input_ids, _, _ = with_media_blocks(text_ids, [IGNORE] * len(text_ids), rows, layout)
    return input_ids


def _over_length(block_end: int, labels: list[int], max_length: int, cut: bool) -> str | None:
    """Why a sample over `max_length` must be left out, or None when cutting its text is fine."""
    if not cut:
        return f"longer than --max-length {max_length}"
    if block_end > max_length:  # a cut video block makes the model's feature count disagree
        return f"its video alone reaches past --max-length {max_length}"
    if all(label == IGNORE for label in labels[:max_length]):
        return f"no answer token within --max-length {max_length}"
    return None


def _render(tokenizer, conversation: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (longest - len(s)) for s in sequences], dtype=torch.int64)


def collate(samples: list[Sample], cache, layout: PromptLayout):
    """Samples → one right-padded `Batch`, cached tokens concatenated in placeholder order."""
    from qprep.train.model import Batch

    return Batch(input_ids=pad([s.input_ids for s in samples], layout.pad_id),
                 attention_mask=pad([[1] * len(s.input_ids) for s in samples], 0),
                 labels=pad([s.labels for s in samples], IGNORE), **_media(samples, cache, layout))


def collate_packed(samples: list[Sample], cache, layout: PromptLayout):
    """Samples side by side in one row, no padding: a `Batch` whose `sample_lengths` tell the model
    where each sample starts (its positions restart there, and attention stays within it)."""
    from qprep.train.model import Batch

    input_ids = torch.tensor([[i for s in samples for i in s.input_ids]], dtype=torch.int64)
    return Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 labels=torch.tensor([[label for s in samples for label in s.labels]], dtype=torch.int64),
                 sample_lengths=tuple(len(s.input_ids) for s in samples), **_media(samples, cache, layout))


def _media(samples: list[Sample], cache, layout: PromptLayout) -> dict:
    """The batch's cached tokens, concatenated in placeholder order, and what places them in time
    (None where the batch has none of a kind: text-only samples, images without videos).

    The audio the model hears, in placeholder order: audio files, and with `audio_in_video` each
    video's own track (the one order in which the model scatters audio tokens and `get_rope_index`
    reads their mel lengths)."""
    media = [cache[medium] for s in samples for medium in s.media]
    visual = [m for m in media if m.kind != "audio"]
    videos = [m for m in media if m.kind == "video"]
    images = [m for m in media if m.kind == "image"]
    has_audio = {v.audio_tokens is not None for v in videos} if layout.audio else {False}
    if len(has_audio) > 1:  # get_rope_index takes one use_audio_in_video flag per batch
        raise ValueError("a batch mixes videos with and without audio; batch them apart")
    in_video = has_audio == {True}
    heard = [m for m in media if m.kind == "audio" or (in_video and m.kind == "video")]
    kinds = tuple(tuple(cache.row(medium).kind for medium in s.media) for s in samples)
    return dict(
        video_tokens=torch.cat([m.video_tokens for m in visual]) if visual else None,
        video_grid_thw=_grids(videos),
        second_per_grid=torch.tensor([v.second_per_grid for v in videos], dtype=torch.float64) if videos else None,
        audio_tokens=torch.cat([m.audio_tokens for m in heard]) if heard else None,
        mel_lengths=torch.tensor([m.mel_length for m in heard]) if heard else None,
        audio_in_video=in_video,
        deepstack=(torch.cat([m.deepstack for m in visual], dim=1)
                   if visual and visual[0].deepstack is not None else None),
        image_grid_thw=_grids(images),
        media_kinds=kinds,
        merger_order=_merger_order(visual, layout) if visual and visual[0].video_tokens.dim() == 3 else None,
    )


def _merger_order(media: list, layout: PromptLayout) -> torch.Tensor | None:
    """Where each row of the mergers' output over the batch's media goes (`Batch.merger_order`)."""
    if not layout.family.window_attention:
        return None
    orders, offset = [], 0
    for medium in media:
        orders.append(layout.family.merger_order(medium.grid_thw, layout.config.vision_config) + offset)
        offset += medium.video_tokens.shape[0]
    return torch.cat(orders)


def _grids(media: list) -> torch.Tensor | None:
    return torch.tensor([m.grid_thw for m in media], dtype=torch.int64) if media else None
