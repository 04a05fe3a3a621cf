"""`--packing`: samples side by side in one row, each with its own positions and attention kept
within it, read from the restarting text positions: by transformers' packed-sequence mask (its
`sdpa`, block-diagonal over the row), and by qprep's `PACKED_SDPA`, which runs transformers'
`sdpa_attention_forward` once per sample (what `--packing` uses with sdpa).

Tolerance. A packed row runs the language model's matmuls (and, with the block mask, attention) on
other shapes than each sample alone, so the logits differ by float32 rounding: measured up to
3.6e-7 with the block mask and 0 per sample on this machine's AVX-512 (each sample's attention is
the very call it gets alone; that the matmuls round a row alike whatever the row count is no BLAS
promise, so the tests allow 1e-5 for both). Attention leaking across samples would move the
logits by 1e-2 and more. The packed row's loss is the padded batch's token-level
mean: the same sum over the same tokens, equal within 1e-6 relative.
"""

from __future__ import annotations

import json

import pytest
import torch

from qprep.errors import SettingsError
from qprep.models.checkpoint import open_checkpoint
from qprep.schemas.training import LoraSettings, TrainSettings
from qprep.train.data import Sample, build_dataset, collate, collate_packed, load_records
from qprep.train.loader import first_fit_packs, plan_packed
from qprep.train.loop import train
from qprep.train.model import LanguageModel
from qprep.train.packed_attention import PACKED_SDPA


def records(path, ids) -> str:
    path.write_text(json.dumps([{"id": video_id, "conversations": [
        {"from": "human", "value": "<video>\nWhat happens, and when?"},
        {"from": "gpt", "value": f"From 0 to 1, event {n} in {video_id}." + " More." * n}]}
        for n, video_id in enumerate(ids)]))
    return str(path)


@pytest.mark.parametrize("store", ["omni_store", "vl_train_store", "qwen3_vl_store", "qwen3_omni_store"])
def test_each_samples_logits_in_a_packed_row_equal_its_logits_alone(request, store, tmp_path):
    model_dir, cache = request.getfixturevalue(store)
    checkpoint = open_checkpoint(model_dir)
    tokenizer = checkpoint.tokenizer()
    layout = checkpoint.family.prompt_layout(checkpoint, tokenizer)
    with_audio = [i for i in cache.ids() if (cache.row(i).audio_length or 0) > 0] if layout.audio else cache.ids()
    ids = (with_audio * 2)[:3]  # three samples of one kind, one video twice
    dataset = build_dataset(load_records(records(tmp_path / "data.json", ids)), cache, tokenizer, layout)
    samples = dataset.samples
    model = LanguageModel(checkpoint).eval()  # transformers' sdpa: the block-diagonal packed-sequence mask
    per_sample = LanguageModel(checkpoint, packing=True).eval()
    assert per_sample.config.get_text_config()._attn_implementation == PACKED_SDPA
    packed = collate_packed(samples, cache, layout)
    assert packed.input_ids.shape == (1, sum(len(s.input_ids) for s in samples)) and packed.sample_lengths
    with torch.no_grad():
        packed_loss, packed_logits = model(packed)
        per_sample_loss, per_sample_logits = per_sample(packed)
        start = 0
        for sample in samples:
            _, alone = model(collate([sample], cache, layout))
            n = len(sample.input_ids)
            for logits in (packed_logits, per_sample_logits):
                gap = float((logits[0, start:start + n] - alone[0]).abs().max())
                assert gap < 1e-5, (sample.id, gap)
            start += n
        padded = collate(samples, cache, layout)
        padded_loss, padded_logits = model(padded)
        # an unpacked padded batch goes to sdpa itself, with sdpa's own mask: the same bits
        assert torch.equal(per_sample(padded)[1], padded_logits)
    assert float((per_sample_logits - packed_logits).abs().max()) < 1e-5
    for loss in (packed_loss, per_sample_loss):
        assert float(loss) == pytest.approx(float(padded_loss), rel=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_per_sample_attention_equals_sdpa_under_the_block_diagonal_mask_and_refuses_what_it_cannot_split(kv_heads):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from qprep.train.packed_attention import packed_sdpa_attention

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4 // kv_heads, True
    lengths = [5, 17, 1, 9]
    total = sum(lengths)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, total, 8, generator=generator)
    key, value = (torch.randn(1, kv_heads, total, 8, generator=generator) for _ in range(2))
    positions = torch.cat([torch.arange(n) for n in lengths]).view(1, -1)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    block = (sample[:, None] == sample[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    expected, _ = sdpa_attention_forward(module, query, key, value, block.view(1, 1, total, total), scaling=0.3)
    got, _ = packed_sdpa_attention(module, query, key, value, None, scaling=0.3, position_ids=positions)
    assert got.shape == expected.shape == (1, total, 4, 8)
    assert float((got - expected).abs().max()) < 1e-6  # softmax over other shapes: float32 rounding
    start = 0
    for n in lengths:  # each sample's attention is the call it gets alone, bit for bit
        alone, _ = sdpa_attention_forward(module, *(t[:, :, start:start + n] for t in (query, key, value)), None,
                                          scaling=0.3)
        assert torch.equal(got[:, start:start + n], alone)
        start += n
    with pytest.raises(ValueError, match="needs the text positions"):
        packed_sdpa_attention(module, query, key, value, None, scaling=0.3)
    with pytest.raises(ValueError, match="sliding-window"):
        packed_sdpa_attention(module, query, key, value, None, position_ids=positions, sliding_window=8)


def samples_of(lengths: list[int], audio: str) -> list[Sample]:
    return [Sample(id=str(i), input_ids=[0] * n, labels=[0] * n, has_audio=flag == "a")
            for i, (n, flag) in enumerate(zip(lengths, audio))]


def test_the_packing_plan_puts_every_sample_once_per_epoch_into_rows_of_one_kind_within_max_length():
    lengths = [300, 1200, 50, 700, 900, 400, 1000, 80, 260, 640, 1199, 30]
    samples = samples_of(lengths, "aavavvaavvaa")
    packs = first_fit_packs(samples, seed=3, max_length=1200)
    assert packs == first_fit_packs(samples, seed=3, max_length=1200)  # fixed by the seed
    assert sorted(i for row in packs for i in row) == list(range(len(samples)))  # none cut, none left out
    for row in packs:
        assert sum(lengths[i] for i in row) <= 1200 and len({samples[i].has_audio for i in row}) == 1
    assert len(packs) < len(samples) and sum(lengths) / (len(packs) * 1200) > 0.75  # rows are filled
    planned = plan_packed(packs, seed=3, packs_per_batch=2, epochs=3)
    for epoch in range(3):
        batches = [p for p in planned if p.epoch == epoch]
        assert sorted(i for p in batches for i in p.samples) == list(range(len(samples)))
        assert all(len(p.rows) <= 2 for p in batches)
    assert [p.rows for p in planned if p.epoch == 0] != [p.rows for p in planned if p.epoch == 1]  # reshuffled
    assert plan_packed(packs, seed=3, packs_per_batch=2, epochs=3, start=(1, 2)) == [
        p for p in planned if (p.epoch, p.index) >= (1, 2)]  # a resumed plan is the tail of the whole one
    with pytest.raises(ValueError, match="more than the 1000"):
        first_fit_packs(samples, seed=0, max_length=1000)


def test_train_with_packing_takes_fewer_steps_of_the_same_loss_and_refuses_what_it_cannot_pack(
        omni_store, tiny_model, tmp_path):
    model_dir, cache = omni_store
    data = records(tmp_path / "data.json", ["a", "b", "a", "b"])
    base = TrainSettings(epochs=1, lr=1e-3, grad_accum=4, workers=0, max_length=4096,
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    unpacked = train(cache.store.root, data, model_dir, tmp_path / "unpacked", base, progress=False, echo=lambda _: None)
    packed = train(cache.store.root, data, model_dir, tmp_path / "packed", TrainSettings(**{
        **base.__dict__, "packing": True}), progress=False, echo=lambda _: None)
    rows = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(rows("packed")) < len(rows("unpacked")) == 4  # the four samples in fewer rows
    # one optimizer step over the same four samples: the same token-level mean
    assert rows("packed")[-1]["step_loss"] == pytest.approx(rows("unpacked")[-1]["step_loss"], rel=1e-6)
    assert packed.steps == unpacked.steps == 1

    with pytest.raises(SettingsError, match="needs --max-length"):
        train(cache.store.root, data, model_dir, tmp_path / "x", TrainSettings(packing=True), progress=False,
              echo=lambda _: None)
    from qprep.train.loop import check_packing

    with pytest.raises(SettingsError, match="qwen3_5's transformers implementation cannot keep packed samples apart"):
        check_packing(TrainSettings(packing=True, max_length=1024), open_checkpoint(tiny_model("qwen3_5")))


def test_packed_rows_are_dealt_one_per_rank_and_a_resumed_rank_count_takes_them_in_turn():
    from qprep.train.distributed import Part, World, deal
    from qprep.train.loader import PlannedBatch

    def dealt(batch, size, part_size=1, even=False):
        return [[part.samples for part in deal(batch, part_size, World(rank=r, size=size), even)] for r in range(size)]

    batch = PlannedBatch(0, 0, (4, 1, 7, 2, 5), rows=((4, 1), (7, 2, 5)))
    assert dealt(batch, 2) == [[(4, 1)], [(7, 2, 5)]]
    assert dealt(batch, 1) == [[(4, 1), (7, 2, 5)]]  # one rank: both rows, one after the other
    assert dealt(batch, 3) == [[(4, 1)], [(7, 2, 5)], []]
    unpacked = PlannedBatch(0, 0, (4, 1, 7, 2, 5))
    assert dealt(unpacked, 2, part_size=2) == [[(4, 1), (5,)], [(7, 2)]]
    # sharded weights: every rank runs as many parts, the short ones topped up with a stand-in
    assert deal(unpacked, 2, World(rank=1, size=2), even=True) == [Part((7, 2)), Part((4, 1), counted=False)]
    assert dealt(batch, 3, even=True) == [[(4, 1)], [(7, 2, 5)], [(4, 1)]]
    assert all(part.counted for part in deal(unpacked, 2, World(rank=0, size=2), even=True))
