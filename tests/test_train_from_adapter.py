"""`qprep train --adapter`: a run's LoRA starts from a trained adapter (SFT, then GRPO from its adapter).
The first step's loss is the saved adapter's; GRPO's reference is that adapter frozen (KL 0 at the first
step, its log-probabilities those of the adapter loaded as `qprep infer` loads it); a resumed run
equals an uninterrupted one; adapters that are not the run's LoRA are refused. fp32, a tiny random
Qwen2.5-VL checkpoint."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from qprep.cli import main
from qprep.errors import SettingsError
from qprep.models.checkpoint import open_checkpoint
from qprep.schemas.training import GrpoSettings, LoraSettings, TrainSettings
from qprep.train.checkpoints import StartingAdapter, lora_weights
from qprep.train.data import build_dataset, collate, load_records
from qprep.train.infer import load_adapter
from qprep.train.lora import apply_lora
from qprep.train.loop import train
from qprep.train.model import LanguageModel
from qprep.train.rollout import completion_batch, completion_logps, reference_logps, rollout_generator, sample

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
SFT = TrainSettings(epochs=2, lr=1e-2, lr_scheduler="constant", batch_size=1, grad_accum=1, workers=0,
                    gradient_checkpointing=False, report_to=("none",), lora=LORA)
GRPO = dataclasses.replace(SFT, epochs=1, method="grpo",
                           grpo=GrpoSettings(rewards=("test_train_from_adapter:length",), num_generations=4,
                                             max_new_tokens=3, beta=0.04))


def length(prompts, completions, records):
    """A reward that differs between completions of the SFT adapter's model (most ids decode to nothing)."""
    return [float(len(text)) for text in completions]


def write_records(path, ids=("a", "b")) -> str:
    path.write_text(json.dumps([{"id": name, "conversations": [
        {"from": "human", "value": f"<video> where is it, {name}?"}, {"from": "gpt", "value": "From 0 to 1."}]}
        for name in ids]))
    return str(path)


def weights(folder) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def quiet(**kwargs) -> dict:
    return dict(progress=False, echo=lambda _: None, **kwargs)


@pytest.fixture(scope="module")
def sft_run(vl_train_store, tmp_path_factory):
    """(model dir, cache, data file, the SFT run folder) of a 4-step SFT run: its adapter moved off zero."""
    model_dir, cache = vl_train_store
    root = tmp_path_factory.mktemp("sft")
    data = write_records(root / "train.json")
    train(cache.store.root, data, model_dir, root / "sft", SFT, **quiet())
    return model_dir, cache, data, root / "sft"


def test_sft_from_an_adapter_starts_at_its_loss_and_moves_on(sft_run, tmp_path):
    """The first step's loss is the saved adapter's on that batch (loaded as `qprep infer` loads it), not
    a fresh LoRA's; the run's adapter moves on from it; run.json names it and its weights' digest."""
    model_dir, cache, _, sft = sft_run
    data = write_records(tmp_path / "one.json", ids=("a",))  # one sample: the first batch is it
    settings = dataclasses.replace(SFT, epochs=1, adapter=str(sft / "adapter"))
    summary = train(cache.store.root, data, model_dir, tmp_path / "next", settings, **quiet())
    fresh = train(cache.store.root, data, model_dir, tmp_path / "fresh", dataclasses.replace(settings, adapter=None),
                  **quiet())

    checkpoint = open_checkpoint(model_dir)
    tokenizer = checkpoint.tokenizer()
    layout = checkpoint.family.prompt_layout(checkpoint, tokenizer)
    samples = build_dataset(load_records(data), cache, tokenizer, layout).samples
    saved = load_adapter(LanguageModel(checkpoint), sft / "adapter")
    with torch.no_grad():
        loss = float(saved(collate(samples, cache, layout))[0])
    assert summary.first_loss == pytest.approx(loss, rel=1e-6, abs=0)  # the token-weighted sum, divided back
    assert fresh.first_loss != pytest.approx(loss, rel=1e-3)  # the adapter is what sets it

    start, end = weights(sft / "adapter"), weights(tmp_path / "next" / "adapter")
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)
    run = json.loads((tmp_path / "next" / "run.json").read_text())
    assert run["adapter"]["path"] == str(sft / "adapter") and len(run["adapter"]["weights_sha256"]) == 64
    assert "adapter" not in run["settings"] and "adapter" not in json.loads(
        (tmp_path / "fresh" / "run.json").read_text())


def test_adapters_that_are_not_the_runs_lora_are_refused(sft_run, tmp_path):
    model_dir, cache, data, sft = sft_run
    base = ["train", "--cache", str(cache.store.root), "--data", data, "--model", model_dir, "--quiet",
            "--report-to", "none", "--workers", "0", "--out", str(tmp_path / "run"), "--lora-alpha", "8"]
    result = CliRunner().invoke(main, base + ["--adapter", str(sft / "adapter"), "--lora-r", "8"])
    assert result.exit_code == 3 and "r 4 (this run: 8)" in result.output and "pass --lora-r 4" in result.output, \
        result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, base + ["--adapter", str(tmp_path / "empty"), "--lora-r", "4"])
    assert result.exit_code == 3 and f"--adapter {tmp_path / 'empty'}: no adapter_config.json" in result.output

    # another model's adapter: a weight of another shape
    other = tmp_path / "other"
    shutil.copytree(sft / "adapter", other)
    tensors = weights(other)
    name = next(k for k in tensors if "lora_A" in k)
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, str(other / "adapter_model.safetensors"), metadata={"format": "pt"})
    settings = dataclasses.replace(SFT, adapter=str(other))
    with pytest.raises(SettingsError, match=f"--adapter {other} does not fit the model"):
        train(cache.store.root, data, model_dir, tmp_path / "run2", settings, **quiet())
    # a trained merger beside it, and a run that leaves the merger frozen: it would be lost
    shutil.copy(sft / "adapter" / "adapter_model.safetensors", other / "adapter_model.safetensors")
    (other / "merger.safetensors").write_bytes(b"")
    with pytest.raises(SettingsError, match="holds a trained merger"):
        train(cache.store.root, data, model_dir, tmp_path / "run3", settings, **quiet())


def test_the_reference_with_the_starting_adapter_is_that_adapter_and_leaves_no_trace(sft_run, tmp_path):
    """`reference_logps` with the starting adapter's weights swapped in equals the log-probabilities of
    the model with that adapter loaded by `load_adapter`, bit for bit; the model's own weights, their
    gradients and its training mode are as they were, and its next forward and backward unchanged."""
    model_dir, cache, data, sft = sft_run
    checkpoint = open_checkpoint(model_dir)
    tokenizer = checkpoint.tokenizer()
    layout = checkpoint.family.prompt_layout(checkpoint, tokenizer)
    saved = load_adapter(LanguageModel(checkpoint), sft / "adapter")
    prompt = build_dataset(load_records(write_records(tmp_path / "a.json", ids=("a",))), cache, tokenizer,
                           layout).samples[0]
    prompt = dataclasses.replace(prompt, input_ids=prompt.input_ids[:-6], labels=[-100] * (len(prompt.input_ids) - 6))
    completions = sample(saved, completion_batch(prompt, [[]], cache, layout), copies=3, max_new_tokens=4, stop=set(),
                         generator=rollout_generator(0, 0, 0, 0))
    rows, width = completion_batch(prompt, completions, cache, layout), max(map(len, completions))
    with torch.no_grad():
        expected = completion_logps(saved, rows, width)

    torch.manual_seed(1)
    model = apply_lora(LanguageModel(checkpoint), LORA)
    StartingAdapter.check(sft / "adapter", SFT, checkpoint.family.lora_targets).load(model)
    start = lora_weights(model)
    with torch.no_grad():  # the policy moved on from the start, and gradients held from an earlier batch
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
                parameter.grad = torch.randn_like(parameter)
    model.train()
    before = {name: (p.detach().clone(), p.grad.clone()) for name, p in model.named_parameters() if p.requires_grad}
    twin = apply_lora(LanguageModel(checkpoint), LORA)  # the same model, never swapped
    twin.load_state_dict(model.state_dict())
    for name, parameter in twin.named_parameters():
        if parameter.requires_grad:
            parameter.grad = before[name][1].clone()

    reference = reference_logps(model, rows, width, weights=start)
    assert torch.equal(reference, expected)
    assert model.training
    for name, parameter in model.named_parameters():
        if name in before:
            assert torch.equal(parameter, before[name][0]) and torch.equal(parameter.grad, before[name][1]), name
    completion_logps(model, rows, width).sum().backward()
    completion_logps(twin, rows, width).sum().backward()
    theirs = dict(twin.named_parameters())
    assert all(torch.equal(p.grad, theirs[name].grad) for name, p in model.named_parameters() if p.requires_grad)

    # under autocast (bf16 on GPU; CPU's caches its casts of the weights alike), no cast of the swapped-in
    # weights serves the policy's forward after the reference's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alone = completion_logps(model, rows, width).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference_logps(model, rows, width, weights=start)
        after = completion_logps(model, rows, width).detach()
    assert torch.equal(after, alone)


def strip(table: list[dict]) -> list[dict]:
    timing = ("tokens_per_s", "step_time_s", "data_wait_s", "allreduce_s", "host_peak_rss_mb", "val_time_s")
    return [{k: v for k, v in row.items() if k not in timing} for row in table]


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_grpo_from_an_adapter_starts_at_kl_zero_and_resumes_bit_for_bit(sft_run, tmp_path):
    """β > 0 from the SFT adapter: the first step's KL is exactly 0 (the policy is the reference), later
    ones not; killed after step 2 of 4, the resumed run (its reference still the starting adapter, its
    LoRA the checkpoint's) logs the same rows and ends with the same adapter; a resume with another
    adapter, or none, is refused."""
    model_dir, cache, data, sft = sft_run
    settings = dataclasses.replace(GRPO, epochs=2, save_every=1, adapter=str(sft / "adapter"))
    run = lambda out, resume=False, used=settings: train(cache.store.root, data, model_dir, tmp_path / out, used,
                                                         **quiet(resume=resume))
    assert run("whole").steps == 4
    logged = metrics(tmp_path / "whole")
    assert logged[0]["kl"] == 0.0 and logged[-1]["kl"] > 0

    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "adapter")
    for later in sorted((tmp_path / "split").glob("checkpoint-*"))[2:]:
        shutil.rmtree(later)
    shutil.copytree(tmp_path / "split", tmp_path / "other")
    run("split", resume=True)
    assert strip(metrics(tmp_path / "split")) == strip(logged)
    ours, theirs = weights(tmp_path / "split" / "adapter"), weights(tmp_path / "whole" / "adapter")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    shutil.copytree(sft / "checkpoint-0000002", tmp_path / "earlier")  # the same LoRA, other weights
    for used in (dataclasses.replace(settings, adapter=str(tmp_path / "earlier")),
                 dataclasses.replace(settings, adapter=None)):
        with pytest.raises(SettingsError, match="trained with a different adapter"):
            run("other", resume=True, used=used)


@pytest.mark.slow
def test_two_ranks_from_an_adapter_follow_one_rank(sft_run, tmp_path):
    """β > 0 from the SFT adapter on two CPU ranks, one prompt each, against one rank of both: each rank
    swaps the starting adapter in for its own reference, so the rows are the same (KL 0 at the first
    step), the losses within float rounding, the adapter within 1e-6 (as GRPO's two-rank test allows)."""
    model_dir, cache, data, sft = sft_run
    settings = dataclasses.replace(GRPO, epochs=3, adapter=str(sft / "adapter"),
                                   grpo=dataclasses.replace(GRPO.grpo, num_generations=8, max_new_tokens=6))
    train(cache.store.root, data, model_dir, tmp_path / "two", settings, ranks=2, device="cpu", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        train(cache.store.root, data, model_dir, tmp_path / "one", dataclasses.replace(settings, batch_size=2),
              **quiet())
    finally:
        torch.set_num_threads(threads)
    ours, theirs = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert len(ours) == len(theirs) == 3 and ours[0]["kl"] == theirs[0]["kl"] == 0.0
    assert any(row["kl"] > 0 for row in theirs)  # the policy moved off the reference
    same = ("epoch", "batch", "step", "reward", "completions/mean_length")
    assert [{k: row[k] for k in same} for row in ours] == [{k: row[k] for k in same} for row in theirs]
    for mine, reference in zip(ours, theirs):
        assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-7)
        assert mine["kl"] == pytest.approx(reference["kl"], rel=1e-5, abs=1e-7)
    two, one = weights(tmp_path / "two" / "adapter"), weights(tmp_path / "one" / "adapter")
    assert max(float((two[k] - one[k]).abs().max()) for k in two) < 1e-6
