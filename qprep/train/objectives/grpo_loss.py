"""GRPO's advantages and policy loss on per-token log-probabilities, as TRL's `GRPOTrainer` computes them
(`trl/trainer/grpo_trainer.py`, `_generate_and_score_completions` and `_compute_loss`, TRL 1.13).

Pure tensor arithmetic: the objective that samples completions and scores them hands in the rewards,
the completions' log-probabilities under the policy being trained (`logps`), under the policy that
sampled them (`old_logps`) and, with a KL term, under the reference (`ref_logps`).

* advantage of completion i of a group of G: `r_i - mean(r)`, divided by `std(r) + 1e-4` (Bessel's
  std, as TRL's `nanstd`) when the rewards are scaled (TRL's `scale_rewards="group"`);
* per token: ratio `ρ = exp(logp - old_logp)`, loss `-min(ρ·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A)`,
  plus `β · (exp(ref - logp) - (ref - logp) - 1)` (the k3 estimator of KL) when β > 0;
* reduced over the completion tokens (`mask`) as each loss type says:
  - `grpo`: each sequence's mean over its tokens, then the mean over the sequences;
  - `dr_grpo`: the sum over all tokens / (sequences · `max_completion_length`);
  - `dapo`: the sum over all tokens / the number of completion tokens in the whole batch.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
ADVANTAGE_EPS = 1e-4  # TRL's, added to the group's std


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Each reward minus its group's mean (groups: `group_size` consecutive completions of one prompt),
    over the group's std + 1e-4 when `scale`. A group of one has std 0 (its advantage is 0)."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    advantages = groups - mean
    if scale:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        advantages = advantages / (std + ADVANTAGE_EPS)
    return advantages.reshape(-1)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                loss_type: str, epsilon_low: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                ref_logps: torch.Tensor | None = None, max_completion_length: int | None = None,
                num_items: int | float | None = None,
                num_sequences: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped policy-gradient loss of B completions and its metrics.

    `logps`, `old_logps`, `ref_logps` and `mask` are [B, T]: per completion token (padding masked
    out by `mask`, 1 on a completion's tokens); `advantages` is [B]. `epsilon_high` defaults to
    `epsilon_low`; `ref_logps` is needed when `beta > 0`; `max_completion_length` for `dr_grpo`. With
    one iteration per batch the sampling policy is the current one: `old_logps` is `logps.detach()`
    (TRL's shortcut), every ratio 1, and the gradient the plain policy gradient.

    Splitting a batch (gradient accumulation, ranks): call this on each part with the whole batch's
    counts, `num_sequences` (the whole batch's completions; `grpo`, `dr_grpo`) and `num_items` (the
    whole batch's completion tokens, every part's `mask.sum()` summed over parts and ranks; `dapo`).
    Each part's loss is then its share, and the parts' losses (and gradients) sum to the loss of the
    whole batch computed at once. Without them the part is the whole batch.

    Metrics, as Python floats, means over this part's completion tokens (TRL's names):
    `clip_ratio/low_mean` (ρ < 1 - ε_low with A < 0), `clip_ratio/high_mean` (ρ > 1 + ε_high with
    A > 0), `clip_ratio/region_mean` (either), `kl` when `beta > 0`, and `completion_tokens` (the
    count, to weigh parts' means into the batch's).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if beta > 0 and ref_logps is None:
        raise ValueError("a KL term (beta > 0) needs the reference's log-probabilities (ref_logps)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("dr_grpo divides by the maximum completion length: pass max_completion_length")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    if beta > 0:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    loss = _reduced(per_token, mask, loss_type, max_completion_length, num_items,
                    num_sequences or logps.size(0))
    metrics = _clip_metrics(ratio, advantages, mask, epsilon_low, epsilon_high)
    if beta > 0:
        metrics["kl"] = _masked_mean(kl, mask)
    return loss, metrics


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per token, the k3 estimator of KL(policy ‖ reference): exp(ref - logp) - (ref - logp) - 1 ≥ 0."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def _reduced(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int | None,
             num_items, num_sequences: int) -> torch.Tensor:
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / num_sequences
    if loss_type == "dr_grpo":
        return masked.sum() / (num_sequences * max_completion_length)
    tokens = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype, device=mask.device)
    return masked.sum() / tokens.clamp(min=1.0)


def _clip_metrics(ratio, advantages, mask, epsilon_low: float, epsilon_high: float) -> dict[str, float]:
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return {"clip_ratio/low_mean": _masked_mean(low, mask), "clip_ratio/high_mean": _masked_mean(high, mask),
            "clip_ratio/region_mean": _masked_mean(low | high, mask), "completion_tokens": float(mask.sum())}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    values = values.detach().to(mask.dtype)
    return float((values * mask).sum() / mask.sum().clamp(min=1.0))
