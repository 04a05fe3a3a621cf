"""GRPO's advantages and policy loss equal TRL's own on the same tensors (TRL 1.13, the test extra).

TRL computes the loss inside `GRPOTrainer._compute_loss`, after a model forward. The harness below
builds a trainer with `object.__new__` (no model, no accelerator) and sets the attributes that method
reads; the forward (`_get_per_token_logps_and_entropies`) returns the test's log-probabilities, so
TRL's arithmetic runs on exactly the tensors `policy_loss` gets. One process, no accumulation
(`current_gradient_accumulation_steps` 1, `steps_per_generation` 1), token-level ratios, no entropy
mask, no vLLM correction: the configuration `qprep train --method grpo` reproduces.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from qprep.train.objectives.grpo_loss import group_advantages, k3_kl, policy_loss

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")  # in the test extra; absent only in a bare install
from trl.trainer.utils import nanstd  # noqa: E402

B, T, MAX_LENGTH = 6, 7, 9
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
TOLERANCE = dict(rtol=1e-6, atol=1e-7)  # fp32, where the sums run in another order (parts of a batch)


class _Identity:
    """The accelerator of one process: reductions and gathers return what they get."""

    num_processes = 1

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor


def trl_loss(logps, old_logps, advantages, mask, *, loss_type, epsilon_low=0.2, epsilon_high=None, beta=0.0,
             ref_logps=None):
    """TRL's `GRPOTrainer._compute_loss` on these tensors, with the metrics it logged."""
    trainer = object.__new__(trl_grpo.GRPOTrainer)
    trainer.__dict__.update(
        loss_type=loss_type, beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_low if epsilon_high is None else epsilon_high,
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, current_gradient_accumulation_steps=1, max_completion_length=MAX_LENGTH,
        model=SimpleNamespace(training=True), accelerator=_Identity(),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, torch.zeros_like(logps), None)
    prompt = torch.zeros(B, 2, dtype=torch.long)
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logps, "num_items_in_batch": mask.sum()}
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def tensors(seed: int, spread: float):
    """Completions of uneven lengths (one of a single token), policy log-probs `spread` away from the
    old ones (0.05: every ratio inside the clip range; 0.8: many outside, both sides), rewards'
    advantages of both signs."""
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=generator, dtype=torch.float64).float() * 3
    logps = (old + (torch.rand(B, T, generator=generator) * 2 - 1) * spread).requires_grad_(True)
    ref = old + (torch.rand(B, T, generator=generator) * 2 - 1) * 0.5
    lengths = torch.tensor([T, 3, 1, 5, T, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    advantages = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.0, 0.9])
    return logps, old, ref, mask, advantages


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("spread", [0.05, 0.8])
def test_policy_loss_and_its_gradient_equal_trls(loss_type, beta, spread):
    logps, old, ref, mask, advantages = tensors(seed=3, spread=spread)
    ratio = torch.exp(logps - old)
    outside = ((ratio < 0.8) | (ratio > 1.2))[mask.bool()].float().mean().item()
    assert (outside == 0) if spread == 0.05 else (outside > 0.3)  # the cases are what they claim

    ours, metrics = policy_loss(logps, old, advantages, mask, loss_type=loss_type, beta=beta,
                                ref_logps=ref if beta else None, max_completion_length=MAX_LENGTH)
    theirs, logged = trl_loss(logps, old, advantages, mask, loss_type=loss_type, beta=beta,
                              ref_logps=ref if beta else None)
    assert torch.equal(ours, theirs)  # the same operations in the same order: bit for bit
    (our_grad,) = torch.autograd.grad(ours, logps)
    (their_grad,) = torch.autograd.grad(theirs, logps)
    assert our_grad.abs().sum() > 0
    assert torch.equal(our_grad, their_grad)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert metrics[name] == pytest.approx(logged[name], rel=1e-6, abs=1e-7), name
    assert (metrics["clip_ratio/region_mean"] > 0) == (spread == 0.8)
    assert metrics["completion_tokens"] == mask.sum().item()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_asymmetric_clipping_equals_trls(loss_type):
    logps, old, _, mask, advantages = tensors(seed=5, spread=0.8)
    ours, metrics = policy_loss(logps, old, advantages, mask, loss_type=loss_type, epsilon_low=0.2,
                                epsilon_high=0.28, max_completion_length=MAX_LENGTH)
    theirs, logged = trl_loss(logps, old, advantages, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28)
    assert torch.equal(ours, theirs)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(logged["clip_ratio/high_mean"], rel=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_parts_of_a_batch_sum_to_the_whole_batchs_loss_and_gradient(loss_type):
    """Gradient accumulation or ranks: each part given the whole batch's counts."""
    logps, old, ref, mask, advantages = tensors(seed=7, spread=0.8)
    settings = dict(loss_type=loss_type, beta=0.04, max_completion_length=MAX_LENGTH)
    whole, _ = policy_loss(logps, old, advantages, mask, ref_logps=ref, **settings)
    parts = [slice(0, 2), slice(2, 3), slice(3, B)]
    summed = sum(policy_loss(logps[p], old[p], advantages[p], mask[p], ref_logps=ref[p], num_sequences=B,
                             num_items=int(mask.sum()), **settings)[0] for p in parts)
    torch.testing.assert_close(summed, whole, **TOLERANCE)
    torch.testing.assert_close(torch.autograd.grad(summed, logps)[0], torch.autograd.grad(whole, logps)[0],
                               **TOLERANCE)


def test_on_policy_loss_is_minus_the_mean_advantage_and_the_kl_estimator_is_zero_at_the_reference():
    logps, _, _, mask, advantages = tensors(seed=1, spread=0.0)
    loss, metrics = policy_loss(logps, logps.detach(), advantages, mask, loss_type="grpo", beta=0.1,
                                ref_logps=logps.detach())
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-7)
    assert metrics["kl"] == 0.0 and metrics["clip_ratio/region_mean"] == 0.0
    assert torch.all(k3_kl(logps, logps.detach() + 0.3) > 0)


def test_policy_loss_refuses_what_it_cannot_compute():
    logps, old, _, mask, advantages = tensors(seed=1, spread=0.1)
    with pytest.raises(ValueError, match="loss type 'ppo'"):
        policy_loss(logps, old, advantages, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, advantages, mask, loss_type="grpo", beta=0.04)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logps, old, advantages, mask, loss_type="dr_grpo")


def trl_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """The lines of TRL's `_generate_and_score_completions` (`multi_objective_aggregation`
    "sum_then_normalize", `scale_rewards` "group" or "none") that turn rewards into advantages."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, group_size), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(group_size, dim=0)
    std_rewards = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    advantages = rewards - mean_grouped_rewards
    return advantages / (std_rewards + 1e-4) if scale else advantages


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_equal_trls(scale):
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.7, 0.7, 0.7, 0.7, 0.1, 0.9, 0.3, 0.0])  # 3 prompts, G = 4
    ours = group_advantages(rewards, 4, scale=scale)
    torch.testing.assert_close(ours, trl_advantages(rewards, 4, scale), **TOLERANCE)
    assert torch.all(ours[4:8] == 0)  # a group of equal rewards teaches nothing
    assert ours.view(3, 4).sum(dim=1).abs().max() < 1e-5


def test_group_advantages_refuse_rewards_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    assert torch.equal(group_advantages(torch.tensor([0.3, 0.8]), 1), torch.zeros(2))
