"""Training samples from LongVALE-style conversations and a cache.

A record is `{"id": ..., "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}`; its video is
the cached entry with that id, placed where `<video>` appears in a human turn (at the start of the
first human turn when absent). Prompts are rendered by the tokenizer's own chat template; labels
cover the assistant turns only (their text and closing `<|im_end|>`), -100 elsewhere. A record that
cannot be used (its video missing or failed in the cache, too long) is reported with its reason
before training starts, never in the middle of an epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qprep.errors import SettingsError
from qprep.models.families import PromptLayout
from qprep.schemas.manifest import ManifestRow

VIDEO_MARK = "<video>"
ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
IGNORE = -100


@dataclass
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]
    has_audio: bool = False  # its cached entry has audio tokens that go into its block


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


def load_records(path: str | Path) -> list[dict]:
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SettingsError(f"--data {path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(records, list):
        raise SettingsError(f"--data {path}: expected a JSON list of {{id, conversations}} records")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("conversations"), list):
            raise SettingsError(f"--data {path}: record {index} lacks an id or a conversations list")
    return records


def messages(conversations: list[dict]) -> list[dict]:
    """LongVALE turns → chat-template messages, with the video where `<video>` marks it."""
    out: list[dict] = []
    for turn in conversations:
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise SettingsError(f"unknown speaker {turn.get('from')!r} (expected human or gpt)")
        out.append({"role": role, "content": [{"type": "text", "text": str(turn.get("value", ""))}]})
    users = [m for m in out if m["role"] == "user"]
    if not users:
        raise SettingsError("a conversation needs a human turn")
    marked = [m for m in users if VIDEO_MARK in m["content"][0]["text"]]
    target = marked[0] if marked else users[0]
    before, _, after = target["content"][0]["text"].partition(VIDEO_MARK)
    if not marked:
        before, after = "", target["content"][0]["text"]
    for m in users:  # any further marks are dropped: one video per record
        m["content"][0]["text"] = m["content"][0]["text"].replace(VIDEO_MARK, "")
    target["content"] = [c for c in ({"type": "text", "text": before.strip()}, {"type": "video"},
                                     {"type": "text", "text": after.strip()}) if c.get("text", True)]
    return out


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
    `max_length` provided the cut falls after the video block and leaves an answer token."""
    dataset = Dataset(samples=[])
    ok = set(cache.ids())
    for record in records:
        video_id = str(record["id"])
        if video_id not in cache:
            dataset.skipped.setdefault("video not in the cache", []).append(video_id)
            continue
        if video_id not in ok:
            dataset.skipped.setdefault("video failed extraction", []).append(video_id)
            continue
        try:
            text_ids, labels = tokenize(messages(record["conversations"]), tokenizer, layout.turn_end_id)
        except SettingsError as exc:
            dataset.skipped.setdefault(f"bad conversation: {exc}", []).append(video_id)
            continue
        row = cache.row(video_id)
        input_ids, labels, block_end = with_video_block(text_ids, labels, row, layout)
        if max_length is not None and len(input_ids) > max_length:
            reason = _over_length(block_end, labels, max_length, cut)
            if reason:
                dataset.skipped.setdefault(reason, []).append(video_id)
                continue
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            dataset.cut.append(video_id)
        dataset.samples.append(Sample(id=video_id, input_ids=input_ids, labels=labels,
                                      has_audio=layout.audio and row.has_audio))
    return dataset


def with_video_block(text_ids: list[int], labels: list[int], row: ManifestRow,
                     layout: PromptLayout) -> tuple[list[int], list[int], int]:
    """The chat template's video placeholder (start, pad, end) replaced by the cached video's block
    (the family's `video_block`), which the labels ignore: (input ids, labels, where the block ends)."""
    at = text_ids.index(layout.ids.video)
    block = layout.video_block(row, start=at - 1)  # one video per prompt: its position is its index
    return (text_ids[: at - 1] + block + text_ids[at + 2:], labels[: at - 1] + [IGNORE] * len(block) + labels[at + 2:],
            at - 1 + len(block))


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
                 labels=pad([s.labels for s in samples], IGNORE), **_media([cache[s.id] for s in samples], layout))


def collate_packed(samples: list[Sample], cache, layout: PromptLayout):
    """Samples side by side in one row, no padding: a `Batch` whose `sample_lengths` tell the model
    where each sample starts (its positions restart there, and attention stays within it)."""
    from qprep.train.model import Batch

    input_ids = torch.tensor([[i for s in samples for i in s.input_ids]], dtype=torch.int64)
    return Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 labels=torch.tensor([[label for s in samples for label in s.labels]], dtype=torch.int64),
                 sample_lengths=tuple(len(s.input_ids) for s in samples),
                 **_media([cache[s.id] for s in samples], layout))


def _media(videos: list, layout: PromptLayout) -> dict:
    """The batch's cached tokens, concatenated in placeholder order, and what places them in time."""
    has_audio = {v.audio_tokens is not None for v in videos} if layout.audio else {False}
    if len(has_audio) > 1:  # get_rope_index takes one use_audio_in_video flag per batch
        raise ValueError("a batch mixes videos with and without audio; batch them apart")
    with_audio = has_audio == {True}
    return dict(
        video_tokens=torch.cat([v.video_tokens for v in videos]),
        video_grid_thw=torch.tensor([v.grid_thw for v in videos], dtype=torch.int64),
        second_per_grid=torch.tensor([v.second_per_grid for v in videos], dtype=torch.float64),
        audio_tokens=torch.cat([v.audio_tokens for v in videos]) if with_audio else None,
        mel_lengths=torch.tensor([v.mel_length for v in videos]) if with_audio else None,
        deepstack=torch.cat([v.deepstack for v in videos], dim=1) if videos[0].deepstack is not None else None,
    )
