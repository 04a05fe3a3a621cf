"""GRPO from the cache: the completions' log-probabilities equal transformers' full model on the raw video
with the same adapter; sampling draws as `generate(do_sample=True)`; the loss and its LoRA gradients equal
the formula on the full model; a learnable reward is learnt; a resumed run equals an uninterrupted one;
two ranks follow one. fp32, tiny random checkpoints in the hub's released layout."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from qprep import open_cache
from qprep.cli import main
from qprep.errors import SettingsError
from qprep.extraction.run import ExtractOptions, extract
from qprep.models.checkpoint import open_checkpoint
from qprep.schemas.settings import VideoSettings
from qprep.schemas.training import GrpoSettings, LoraSettings, TrainSettings
from qprep.synth import VideoSpec, make_video
from qprep.train.data import IGNORE, Sample
from qprep.train.infer import DENSE_CAPTION_PROMPT, Generator, choose_requests, greedy
from qprep.train.lora import apply_lora
from qprep.train.loop import train
from qprep.train.model import LanguageModel
from qprep.train.objectives.grpo import COMPLETIONS_LOGGED
from qprep.train.objectives.grpo_loss import policy_loss
from qprep.train.rollout import (completion_batch, completion_logps, completion_mask, media_tokens, reference_logps,
                                 rollout_generator, sample)
from reference import full_model


def speaks(prompts, completions, records):
    """A toy reward a tiny model can learn: 1 when the answer has any text (the tiny tokenizer decodes
    few of the model's 8192 ids, about 4 % of a random model's draws)."""
    return [1.0 if text else 0.0 for text in completions]


@pytest.fixture(scope="module")
def released_store(tiny_model, tmp_path_factory):
    """`released_store(kind)` → (model dir, open cache) of a float32 store of the released tiny checkpoint:
    video a (2 s, no audio)."""
    made: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"grpo-{kind}")
            make_video(root / "videos" / "a.mp4", VideoSpec(width=112, height=84, fps=25, seconds=2, audio=False))
            model_dir = str(tiny_model(kind, "released"))
            extract(root / "videos", root / "store.zarr", model_dir, VideoSettings(fps=2), dtype="float32", shards=1,
                    options=ExtractOptions(progress=False, executor="local"))
            made[kind] = model_dir, open_cache(root / "store.zarr")
        return made[kind]

    return get


def random_adapter(model_dir, path) -> torch.nn.Module:
    """A LoRA adapter with random weights on both sides (a fresh one's B is zero: it would change
    nothing), saved in peft's format; the language model with it, in eval mode."""
    torch.manual_seed(0)
    model = apply_lora(LanguageModel(open_checkpoint(model_dir)), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    model.save_pretrained(path)
    return model.eval()


def prompt_of(model_dir, cache, kind) -> tuple[Sample, dict]:
    """Video a's dense-captioning prompt as a sample, and the processor's inputs for it on the raw video."""
    from test_infer import raw_inputs
    from test_train_parity import true_metadata

    checkpoint = open_checkpoint(model_dir)
    generator = Generator(checkpoint, checkpoint.tokenizer(), cache)
    request = choose_requests(cache, ids=["a"])[0][0]
    ids = generator.prompt_ids(request)
    row = cache.row("a")
    path = cache.store.root.parent / "videos" / row.path
    metadata = true_metadata(path, row.frame_indices) if kind.startswith("qwen3") else None
    inputs = raw_inputs(model_dir, path, row, DENSE_CAPTION_PROMPT, omni=False, metadata=metadata)
    assert inputs["input_ids"][0].tolist() == ids
    return Sample(id="a", input_ids=ids, labels=[IGNORE] * len(ids)), inputs


def full_logps(model, inputs, prompt: list[int], completions: list[list[int]], pad: int) -> torch.Tensor:
    """[G, C] the completions' log-probabilities from transformers' full model on the raw video, as TRL's
    GRPO trainer computes them: the pixels repeated for each completion, right padding masked, the
    logits of the last C + 1 positions (`logits_to_keep`), the log-probability of each next token."""
    width, count = max(map(len, completions)), len(completions)
    input_ids = torch.tensor([prompt + c + [pad] * (width - len(c)) for c in completions])
    kwargs = dict(inputs, input_ids=input_ids,
                  attention_mask=torch.tensor([[1] * (len(prompt) + len(c)) + [0] * (width - len(c))
                                               for c in completions]),
                  pixel_values_videos=inputs["pixel_values_videos"].repeat(count, 1),
                  video_grid_thw=inputs["video_grid_thw"].repeat(count, 1))
    for seconds in ("second_per_grid_ts", "video_second_per_grid"):  # VL's name, the Omni thinkers'
        if seconds in inputs:
            kwargs[seconds] = inputs[seconds].repeat(count)
    if "mm_token_type_ids" in inputs:  # Qwen3-VL: the completion tokens are text
        types = inputs["mm_token_type_ids"]
        kwargs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, width)], dim=1).repeat(count, 1)
    # the Omni thinkers take `logits_to_keep` and multiply every position anyway: the last C + 1 kept here
    logits = model(**kwargs, logits_to_keep=width + 1).logits[:, -(width + 1):-1].float()
    # TRL's `selective_log_softmax` for float32: the chosen logit minus the row's logsumexp
    return logits.gather(-1, input_ids[:, -width:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


# completions cut to these lengths: the batch then holds right padding
LENGTHS = (6, 2, 4, 5)
# The Omni thinkers multiply every position by lm_head whatever `logits_to_keep` says, where qprep
# multiplies the last C + 1 alone: another matmul shape, whose kernel may sum in another order, so
# their log-probabilities are held to the rounding bound of that sum instead of bit for bit.
WHOLE_PROMPT_HEAD = ("qwen2_5_omni", "qwen3_omni_moe")


def completions_padded(completions: list[list[int]]) -> list[list[int]]:
    width = max(map(len, completions))
    return [c + [0] * (width - len(c)) for c in completions]


def logp_bound(hidden: torch.Tensor, weight: torch.Tensor, logps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How far two evaluations of `logit[target] - logsumexp(logits)` may lie when their `hidden @
    weight.T` sum in different orders: the chosen logit's bound plus the largest over the vocabulary
    (logsumexp moves by at most its inputs' largest move), plus 4 float32 ulps of the result for the
    subtraction and logsumexp's own rounding."""
    from test_infer import reordered_sum_bound

    logits = reordered_sum_bound(hidden, weight)  # [G, C, vocab]
    chosen = logits.gather(-1, targets[..., None]).squeeze(-1)
    return chosen + logits.amax(-1) + 4 * 2.0 ** -23 * logps.double().abs()


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl", "qwen2_vl", "qwen2_5_omni", "qwen3_vl_moe", "qwen3_5",
                                  "qwen3_5_moe", "qwen3_omni_moe"])
def test_completion_logps_from_the_cache_equal_the_full_model_with_the_same_adapter(released_store, kind, tmp_path):
    """Policy (adapter on) and reference (adapter disabled) log-probabilities of sampled completions, for
    every family, bit for bit: the same forward, the same `lm_head` shape (the last C + 1 positions), the
    same log-probability arithmetic, on the cached tokens and on the tower's output of the raw video.
    The Omni thinkers' `lm_head` multiplies every position: within that sum's rounding bound there."""
    from peft import PeftModel

    model_dir, cache = released_store(kind)
    ours = random_adapter(model_dir, tmp_path / "adapter")
    prompt, inputs = prompt_of(model_dir, cache, kind)
    checkpoint = open_checkpoint(model_dir)
    layout = checkpoint.family.prompt_layout(checkpoint, checkpoint.tokenizer())
    prompt_batch = completion_batch(prompt, [[]], cache, layout)
    drawn = sample(ours, prompt_batch, copies=len(LENGTHS), max_new_tokens=max(LENGTHS), stop=set(),
                   generator=rollout_generator(0, 0, 0, 0))
    completions = [tokens[:n] for tokens, n in zip(drawn, LENGTHS)]
    assert len({tuple(c) for c in completions}) == len(LENGTHS)
    rows = completion_batch(prompt, completions, cache, layout)
    mask = completion_mask(completions).bool()
    policy = completion_logps(ours, rows, max(LENGTHS))
    assert policy.requires_grad  # a training forward: the loss's gradients flow through it
    reference = reference_logps(ours, rows, max(LENGTHS))

    full = PeftModel.from_pretrained(full_model(model_dir), str(tmp_path / "adapter")).eval()
    head = full.get_output_embeddings()
    multiplied: list = []  # the rows lm_head multiplied, each forward's
    hook = head.register_forward_hook(lambda module, args, output: multiplied.append(args[0].detach()))
    with torch.no_grad():
        theirs = full_logps(full, inputs, prompt.input_ids, completions, layout.pad_id)
        with full.disable_adapter():
            base = full_logps(full, inputs, prompt.input_ids, completions, layout.pad_id)
    hook.remove()
    if kind not in WHOLE_PROMPT_HEAD:
        assert torch.equal(policy.detach()[mask], theirs[mask])
        assert torch.equal(reference[mask], base[mask])
    else:
        width = max(LENGTHS)
        for ours_, theirs_, rows_ in ((policy.detach(), theirs, multiplied[0]), (reference, base, multiplied[1])):
            bound = logp_bound(rows_[:, -(width + 1):-1], head.weight, ours_, torch.tensor(completions_padded(completions)))
            gap = (ours_.double() - theirs_.double()).abs()
            print(f"{kind}: gap at most {float(gap[mask].max()):.3g}, bound at least {float(bound[mask].min()):.3g}")
            assert bool((gap[mask] <= bound[mask]).all()), f"{float((gap - bound)[mask].max()):.3g} past the bound"
    assert not torch.equal(policy.detach()[mask], reference[mask]), "the adapter must change them"


def test_sampling_draws_as_generate_with_the_same_seed(released_store, tmp_path):
    """One completion at temperature 0.7 and top-p 0.9 is `generate(do_sample=True)`'s, token for token,
    with its RNG seeded as ours; G completions of one prompt differ; a seed reproduces them; a tiny top-p
    leaves the greedy answer."""
    from peft import PeftModel

    model_dir, cache = released_store("qwen2_5_vl")
    ours = random_adapter(model_dir, tmp_path / "adapter")
    prompt, inputs = prompt_of(model_dir, cache, "qwen2_5_vl")
    checkpoint = open_checkpoint(model_dir)
    layout = checkpoint.family.prompt_layout(checkpoint, checkpoint.tokenizer())
    batch = completion_batch(prompt, [[]], cache, layout)
    stop = Generator(checkpoint, checkpoint.tokenizer(), cache).stop
    full = PeftModel.from_pretrained(full_model(model_dir), str(tmp_path / "adapter")).eval()
    for seed in (1, 2, 3):
        mine = sample(ours, batch, copies=1, max_new_tokens=8, stop=stop, temperature=0.7, top_p=0.9,
                      generator=torch.Generator().manual_seed(seed), suppress=media_tokens(layout))[0]
        torch.manual_seed(seed)
        with torch.no_grad():
            out = full.generate(**inputs, do_sample=True, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=8,
                                eos_token_id=sorted(stop), suppress_tokens=media_tokens(layout))
        assert mine == out[0, inputs["input_ids"].shape[1]:].tolist(), f"seed {seed}"

    def draw(seed, **kwargs):
        return sample(ours, batch, copies=4, max_new_tokens=5, stop=stop, generator=rollout_generator(seed, 0, 0, 0),
                      **kwargs)

    group = draw(7)
    assert len({tuple(c) for c in group}) == 4 and draw(7) == group and draw(8) != group
    answer = greedy(ours.get_base_model(), batch, 5, stop)
    assert draw(7, top_p=1e-6) == [answer] * 4


def test_grpo_loss_and_lora_gradients_equal_the_formula_on_the_full_model(released_store, tmp_path):
    """Fixed completions, rewards' advantages and old log-probabilities (apart from the current ones,
    so the clip acts), β 0.04 against the adapter disabled: for each loss type, qprep's loss from the
    cache and every LoRA gradient equal TRL's formula written out here on the full model's
    log-probabilities. The two sides sum in other orders: within 1e-6 (loss) and 1e-5 (gradients)
    relative."""
    from peft import PeftModel

    model_dir, cache = released_store("qwen2_5_vl")
    ours = random_adapter(model_dir, tmp_path / "adapter").train()
    prompt, inputs = prompt_of(model_dir, cache, "qwen2_5_vl")
    checkpoint = open_checkpoint(model_dir)
    layout = checkpoint.family.prompt_layout(checkpoint, checkpoint.tokenizer())
    completions = [[11, 12, 13, 14], [21, 22], [31, 32, 33], [41]]
    width, beta, epsilon, epsilon_high, longest = 4, 0.04, 0.2, 0.28, 8
    advantages = torch.tensor([1.2, -0.4, 0.7, -1.5])
    mask = completion_mask(completions)
    old = torch.randn(4, width, generator=torch.Generator().manual_seed(5)) * 0.3 - 6.0

    rows = completion_batch(prompt, completions, cache, layout)
    logps = completion_logps(ours, rows, width)
    reference = reference_logps(ours, rows, width)
    trained = [p for p in ours.parameters() if p.requires_grad]

    full = PeftModel.from_pretrained(full_model(model_dir), str(tmp_path / "adapter"), is_trainable=True)
    with torch.no_grad(), full.disable_adapter():
        ref = full_logps(full, inputs, prompt.input_ids, completions, layout.pad_id)
    theirs_logps = full_logps(full, inputs, prompt.input_ids, completions, layout.pad_id)
    their_trained = [p for p in full.parameters() if p.requires_grad]
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in full.named_parameters() if p.requires_grad] and trained
    ratio = torch.exp(theirs_logps - old)
    assert float((ratio.detach() * mask).max()) > 1 + epsilon_high or float(ratio.min()) < 1 - epsilon, "clip unused"
    surrogate = torch.min(ratio * advantages[:, None], ratio.clamp(1 - epsilon, 1 + epsilon_high) * advantages[:, None])
    per_token = -surrogate + beta * (torch.exp(ref - theirs_logps) - (ref - theirs_logps) - 1)
    formulas = {"grpo": lambda: ((per_token * mask).sum(-1) / mask.sum(-1)).mean(),
                "dr_grpo": lambda: (per_token * mask).sum() / (len(completions) * longest),
                "dapo": lambda: (per_token * mask).sum() / mask.sum()}
    for loss_type, formula in formulas.items():
        loss, _ = policy_loss(logps, old, advantages, mask, loss_type=loss_type, epsilon_low=epsilon,
                              epsilon_high=epsilon_high, beta=beta, ref_logps=reference,
                              max_completion_length=longest)
        expected = formula()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0, msg=loss_type)
        mine = torch.autograd.grad(loss, trained, retain_graph=True)
        theirs = torch.autograd.grad(expected, their_trained, retain_graph=True)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=loss_type)


def sharpened(model_dir, target) -> str:
    """A copy of a tiny checkpoint with its `lm_head` ten times larger: a random tiny model's answers
    are otherwise near uniform over its 8192 ids, too flat for LoRA to move far in a few steps."""
    shutil.copytree(model_dir, target)
    index = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(key for key in index if key.endswith("lm_head.weight"))
    weights = load_file(str(target / index[name]))
    weights[name] = weights[name] * 10
    save_file(weights, str(target / index[name]), metadata={"format": "pt"})
    return str(target)


def write_prompts(path, count: int = 4) -> str:
    records = [{"id": "a", "conversations": [{"from": "human", "value": f"<video> question {n}"},
                                             {"from": "gpt", "value": "From 0 to 1."}]} for n in range(count)]
    path.write_text(json.dumps(records))
    return str(path)


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


GRPO = TrainSettings(epochs=10, lr=1e-2, lr_scheduler="constant", batch_size=2, grad_accum=1, workers=0,
                     gradient_checkpointing=False, report_to=("none",), lora=LoraSettings(r=4, alpha=8, dropout=0.0),
                     method="grpo", grpo=GrpoSettings(rewards=("test_grpo:speaks",), num_generations=8, max_new_tokens=1))


@pytest.fixture(scope="module")
def sharp_store(released_store, tmp_path_factory):
    model_dir, cache = released_store("qwen2_5_vl")
    return sharpened(model_dir, tmp_path_factory.mktemp("sharp") / "model"), cache


def test_a_learnable_reward_is_learnt(sharp_store, tmp_path):
    """20 steps of 2 prompts × 8 answers: the reward (answers with text, ~6 % of draws at first) ends
    near 1 (measured: 0.06 → 0.94–1.0 from step 4 on; other seeds 0.12 → 0.8 by step 10, so the bound
    leaves room for a trajectory that rounding moves)."""
    model_dir, cache = sharp_store
    summary = train(cache.store.root, write_prompts(tmp_path / "train.json"), model_dir, tmp_path / "run", GRPO,
                    progress=False, echo=lambda _: None)
    assert summary.steps == 20
    rewards = [row["reward"] for row in rows(tmp_path / "run")]
    print("mean reward per step:", [round(r, 2) for r in rewards])
    assert sum(rewards[:3]) / 3 < 0.4 and sum(rewards[-5:]) / 5 > 0.6


def test_a_resumed_run_equals_an_uninterrupted_one_and_validation_keeps_the_highest_reward(sharp_store, tmp_path):
    """Killed after step 2 of 4 (LoRA dropout on, β > 0, validation each step): the resumed run samples
    the same completions, logs the same rows and ends with the same adapter, bit for bit."""
    model_dir, cache = sharp_store
    data = write_prompts(tmp_path / "train.json")
    (tmp_path / "val.json").write_text(json.dumps(json.loads((tmp_path / "train.json").read_text())[:2]))
    settings = dataclasses.replace(GRPO, epochs=2, save_every=1, eval_every=1, save_best=True,
                                   lora=LoraSettings(r=4, alpha=8, dropout=0.1),
                                   grpo=dataclasses.replace(GRPO.grpo, num_generations=4, max_new_tokens=3, beta=0.04,
                                                            loss_type="grpo"))
    run = lambda out, resume=False: train(cache.store.root, data, model_dir, tmp_path / out, settings, resume=resume,
                                          eval_data=tmp_path / "val.json", progress=False, echo=lambda _: None)
    whole = run("whole")
    assert whole.steps == 4
    logged = rows(tmp_path / "whole")
    validations = [row for row in logged if "val_reward" in row]
    assert [row["step"] for row in validations] == [1, 2, 3, 4]
    assert whole.best_val_loss == max(row["val_reward"] for row in validations)
    assert {"reward", "rewards/speaks/mean", "rewards/speaks/std", "reward_std", "kl", "clip_ratio/region_mean",
            "completions/mean_length", "completions/min_length", "completions/max_length"} <= set(logged[0])
    completions = (tmp_path / "whole" / "completions.jsonl").read_text().splitlines()
    assert len(completions) == 8 and {"step", "id", "completion", "rewards", "advantage"} <= set(json.loads(completions[0]))

    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "adapter")
    for later in sorted((tmp_path / "split").glob("checkpoint-*"))[2:]:
        shutil.rmtree(later)
    run("split", resume=True)
    timing = ("tokens_per_s", "step_time_s", "data_wait_s", "allreduce_s", "host_peak_rss_mb", "val_time_s")
    strip = lambda table: [{k: v for k, v in row.items() if k not in timing} for row in table]
    assert strip(rows(tmp_path / "split")) == strip(logged)
    assert (tmp_path / "split" / "completions.jsonl").read_text().splitlines() == completions
    ours, theirs = (load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors")) for name in ("split", "whole"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_cli_train_grpo_records_its_settings_and_refuses_nonsense(sharp_store, tmp_path):
    model_dir, cache = sharp_store
    base = ["train", "--cache", str(cache.store.root), "--data", write_prompts(tmp_path / "train.json", 2),
            "--model", model_dir, "--quiet", "--report-to", "none", "--workers", "0"]
    result = CliRunner().invoke(main, base + ["--out", str(tmp_path / "run"), "--method", "grpo", "--epochs", "1",
                                              "--reward", "test_grpo:speaks", "--reward", "format",
                                              "--num-generations", "2", "--max-new-tokens", "2", "--beta", "0.1",
                                              "--loss-type", "dr_grpo", "--no-scale-rewards", "--num-iterations", "2"])
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["method"] == "grpo"
    assert settings["grpo"] == {"rewards": ["test_grpo:speaks", "format"], "num_generations": 2, "temperature": 1.0,
                                "top_p": 1.0, "max_new_tokens": 2, "beta": 0.1, "epsilon": 0.2, "epsilon_high": None,
                                "loss_type": "dr_grpo", "scale_rewards": False, "num_iterations": 2}
    assert {"rewards/speaks/mean", "rewards/format/mean", "kl"} <= set(rows(tmp_path / "run")[0])
    for flags, message in ((["--num-generations", "1"], "needs 2 or more"), (["--temperature", "0"], "above 0"),
                           (["--top-p", "1.5"], "(0, 1]"), (["--num-iterations", "0"], "1 or more"), (["--packing", "--max-length", "900"], "GRPO samples"),
                           (["--reward", "nowhere:fn"], "cannot import nowhere")):
        result = CliRunner().invoke(main, base + ["--out", str(tmp_path / "bad"), "--method", "grpo"] + flags)
        assert result.exit_code == 3 and message in result.output, (flags, result.output)
    with pytest.raises(SettingsError, match="no prompt left"):
        (tmp_path / "none.json").write_text(json.dumps([{"id": "gone", "conversations": [
            {"from": "human", "value": "<video>"}, {"from": "gpt", "value": "From 0 to 1."}]}]))
        train(cache.store.root, tmp_path / "none.json", model_dir, tmp_path / "none", GRPO, progress=False,
              echo=lambda _: None)


@pytest.mark.slow
def test_two_ranks_follow_one_rank_with_the_same_global_batch(sharp_store, tmp_path):
    """Two CPU ranks of one prompt each against one rank of both: the same completions (seeded per
    prompt, not per rank), so the same rewards; the loss normalised by the whole step's completion
    tokens summed over the ranks; the adapter within float32 rounding (the gradients of the two groups
    are summed by the all-reduce on one side, by autograd on the other: 1e-6, as SFT's test allows)."""
    model_dir, cache = sharp_store
    data = write_prompts(tmp_path / "train.json")
    settings = dataclasses.replace(GRPO, epochs=2, batch_size=1, lr=1e-2,
                                   grpo=dataclasses.replace(GRPO.grpo, max_new_tokens=4))
    train(cache.store.root, data, model_dir, tmp_path / "two", settings, ranks=2, device="cpu", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (the launcher gives each its share of the cores)
    try:
        train(cache.store.root, data, model_dir, tmp_path / "one", dataclasses.replace(settings, batch_size=2),
              progress=False, echo=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    ours, theirs = rows(tmp_path / "two"), rows(tmp_path / "one")
    assert len(ours) == len(theirs) == 4 and any(row["reward"] > 0 for row in ours)  # a gradient to follow
    same = ("epoch", "batch", "step", "reward", "rewards/speaks/mean", "rewards/speaks/std", "reward_std",
            "completions/mean_length", "completions/min_length", "completions/max_length")
    assert [{k: row[k] for k in same} for row in ours] == [{k: row[k] for k in same} for row in theirs]
    for mine, reference in zip(ours, theirs):
        assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-7)
    lines = [(tmp_path / run / "completions.jsonl").read_text() for run in ("two", "one")]
    assert lines[0] == lines[1]
    two, one = (load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("two", "one"))
    gap = max(float((two[k] - one[k]).abs().max()) for k in two)
    print(f"2 ranks against 1 rank with the same global batch: adapter weights within {gap:.3g}")
    assert any(bool(v.any()) for k, v in one.items() if "lora_B" in k) and gap < 1e-6


def test_more_passes_over_the_rollouts_clip_against_the_policy_that_sampled_them(sharp_store, tmp_path):
    """`num_iterations` 2 (TRL's μ): each step's rollouts train two optimizer steps. The first pass's
    old log-probabilities are the policy's own (ratio 1: nothing clipped, and its step is the μ = 1
    run's, bit for bit); the second's are still those of the policy that sampled them, so with a
    tiny clip range its ratios are clipped. The rollouts are drawn and logged once; a run killed
    after its second rollout step resumes to the uninterrupted run's rows and adapter."""
    model_dir, cache = sharp_store
    data = write_prompts(tmp_path / "train.json")
    settings = dataclasses.replace(GRPO, epochs=1, save_every=1,
                                   grpo=dataclasses.replace(GRPO.grpo, num_generations=16, max_new_tokens=3,
                                                            epsilon=1e-4, num_iterations=2))
    run = lambda out, chosen=settings, resume=False: train(cache.store.root, data, model_dir, tmp_path / out, chosen,
                                                           resume=resume, progress=False, echo=lambda _: None)
    assert run("twice").steps == 4  # 2 rollout steps × 2 passes
    logged = rows(tmp_path / "twice")
    assert [(row["batch"], row["iteration"], row["step"]) for row in logged] == [(0, 0, 1), (0, 1, 2), (1, 0, 3),
                                                                                (1, 1, 4)]
    assert all(row["reward_std"] > 0 for row in logged)  # advantages that move the policy
    assert [row["clip_ratio/region_mean"] for row in logged[::2]] == [0.0, 0.0]
    assert all(row["clip_ratio/region_mean"] > 0 for row in logged[1::2])
    assert [row["reward"] for row in logged[::2]] == [row["reward"] for row in logged[1::2]]  # the same rollouts
    assert len((tmp_path / "twice" / "completions.jsonl").read_text().splitlines()) == 2 * COMPLETIONS_LOGGED
    assert sorted(path.name for path in (tmp_path / "twice").glob("checkpoint-*")) == ["checkpoint-0000002",
                                                                                      "checkpoint-0000004"]

    run("once", dataclasses.replace(settings, epochs=1, grpo=dataclasses.replace(settings.grpo, num_iterations=1)))
    assert rows(tmp_path / "once")[0]["loss"] == logged[0]["loss"]

    shutil.copytree(tmp_path / "twice", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "adapter")
    shutil.rmtree(tmp_path / "split" / "checkpoint-0000004")
    run("split", resume=True)
    timing = ("tokens_per_s", "step_time_s", "data_wait_s", "allreduce_s", "host_peak_rss_mb")
    strip = lambda table: [{k: v for k, v in row.items() if k not in timing} for row in table]
    assert strip(rows(tmp_path / "split")) == strip(logged)
    ours, theirs = (load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors")) for name in ("split", "twice"))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_sharded_ranks_draw_score_and_train_as_unsharded_ranks(sharp_store, tmp_path):
    """--shard (FSDP2, 2 CPU ranks): each forward gathers weights from both ranks, so they roll out,
    score and validate in step. 3 prompts over 2 ranks of 1 leave rank 1 a stand-in part on each
    epoch's last batch; 3 held-out prompts leave it a stand-in answer; decoding lengths differ by
    rank (sampled, up to 4 tokens); β > 0 from `--adapter` puts the reference's weights onto the
    shards. The same completions, rewards, losses, KL, validation and adapter as the same run
    unsharded, bit for bit (clipping off: a sharded run computes the gradient norm from its shards'
    norms, which may differ in the last bits)."""
    model_dir, cache = sharp_store
    model_dir = shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["eos_token_id"] = list(range(0, 8192, 2))  # completions end early, each at its own length
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    model_dir = str(model_dir)
    data = write_prompts(tmp_path / "train.json", count=3)
    (tmp_path / "val.json").write_text((tmp_path / "train.json").read_text())
    random_adapter(model_dir, tmp_path / "start")
    settings = dataclasses.replace(GRPO, epochs=2, batch_size=1, eval_every=1, max_grad_norm=0.0,
                                   adapter=str(tmp_path / "start"),
                                   grpo=dataclasses.replace(GRPO.grpo, num_generations=4, max_new_tokens=4, beta=0.04))
    runs = {}
    for name, shard in (("sharded", True), ("unsharded", False)):
        runs[name] = train(cache.store.root, data, model_dir, tmp_path / name, dataclasses.replace(settings, shard=shard),
                           ranks=2, device="cpu", eval_data=tmp_path / "val.json", progress=False)
    assert runs["sharded"].steps == runs["unsharded"].steps == 4
    timing = ("tokens_per_s", "step_time_s", "data_wait_s", "allreduce_s", "host_peak_rss_mb", "val_time_s",
              "grad_norm")
    strip = lambda table: [{k: v for k, v in row.items() if k not in timing} for row in table]
    ours, theirs = rows(tmp_path / "sharded"), rows(tmp_path / "unsharded")
    assert strip(ours) == strip(theirs)
    assert {"kl", "val_reward"} <= {key for row in ours for key in row}
    trained = [row for row in ours if "reward" in row]
    lengths = {row["completions/min_length"] for row in trained} | {row["completions/max_length"] for row in trained}
    print("completion lengths (min, max) per batch:",
          [(row["completions/min_length"], row["completions/max_length"]) for row in trained])
    assert len(lengths) > 1  # the decoding loops ended at different steps
    completions = [(tmp_path / name / "completions.jsonl").read_text() for name in ("sharded", "unsharded")]
    assert completions[0] == completions[1]
    sharded, unsharded = (load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
                          for name in ("sharded", "unsharded"))
    assert sharded.keys() == unsharded.keys() and all(torch.equal(sharded[k], unsharded[k]) for k in sharded)


def test_media_placeholders_are_never_drawn(released_store):
    """A completion holding a placeholder could not be scored (one more placeholder than cached
    tokens): the sampler never draws the media tokens, even where they hold nearly all the mass."""
    from qprep.train.rollout import sampler

    model_dir, _ = released_store("qwen2_5_vl")
    checkpoint = open_checkpoint(model_dir)
    layout = checkpoint.family.prompt_layout(checkpoint, checkpoint.tokenizer())
    suppressed = media_tokens(layout)
    assert {layout.ids.video, layout.ids.image, layout.ids.vision_start} <= set(suppressed)
    logits = torch.zeros(64, layout.config.get_text_config().vocab_size)
    logits[:, suppressed] = 30.0  # e^30: every other id together holds ~1e-9 of the mass
    choose = sampler(1.0, 1.0, torch.Generator().manual_seed(0), suppressed)
    assert not set(choose(logits).tolist()) & set(suppressed)
    unsuppressed = sampler(1.0, 1.0, torch.Generator().manual_seed(0))
    assert set(unsuppressed(logits).tolist()) <= set(suppressed)  # what the test guards against
