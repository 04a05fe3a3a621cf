"""Rollouts from the cache: a prompt's G sampled completions, and the log-probabilities a model gives them.

Sampling runs `qprep.train.infer.decode`, the KV-cache decoding `qprep infer` trusts (the prompt's
3-D positions from the model's own `get_rope_index`, generated tokens at `last + 1`): the prompt runs
once and its cache is copied for the G completions, decoded side by side, each to its end-of-sequence
token. Each step draws as `generate(do_sample=True)` does: the logits in float32 through transformers'
own `TemperatureLogitsWarper` and `TopPLogitsWarper`, a softmax, `torch.multinomial`. The draws come
from a `torch.Generator` seeded by (seed, epoch, batch, prompt), never from the global RNG, so a resumed
run, or one on another number of ranks, samples the same completions.

Log-probabilities come from a training forward over the prompt and its completions side by side
(`qprep.train.data.collate`: the cached tokens in the placeholders, the completions right-padded), so
they carry gradients; `lm_head` multiplies only the last C + 1 positions (C: the longest completion),
as the full model's `logits_to_keep` and TRL's GRPO trainer do. Like TRL, the logits are divided by the
sampling temperature first: the log-probabilities are those of the distribution sampled from. The
reference model is the same model with its adapter disabled (`reference_logps`), or, for a run started
from an adapter, the same model with that adapter's weights put in place of the LoRA's for the forward
(`with_weights`): a copy of the LoRA weights, not of the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
from contextlib import contextmanager, nullcontext

import torch

from qprep.train.data import IGNORE, Sample, collate
from qprep.train.infer import decode
from qprep.train.model import run_as_forward


def rollout_generator(seed: int, *keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded by the run's seed and `keys` (epoch, batch, prompt): the same stream wherever
    and whenever that prompt is rolled out."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def media_tokens(layout) -> list[int]:
    """The ids of the media placeholders and block delimiters (`layout`: a `PromptLayout`). A completion
    holding one could not be scored: a training forward over it (qprep's, or the full model's) would
    count one more placeholder than there are cached tokens, or open a block. They are never drawn,
    as `generate(suppress_tokens=...)` never draws them."""
    return sorted({value for value in dataclasses.astuple(layout.ids) if value is not None})


def sampler(temperature: float, top_p: float, generator: torch.Generator, suppress: list[int] = ()):
    """`choose(logits)` for `decode`: one draw per row, as `generate(do_sample=True, suppress_tokens=...)`
    makes it (the suppressed ids' logits to -inf first, then the warpers)."""
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor, TemperatureLogitsWarper, \
        TopPLogitsWarper

    warpers = LogitsProcessorList()
    if suppress:
        warpers.append(SuppressTokensLogitsProcessor(list(suppress), device=generator.device))
    if temperature != 1.0:  # generate adds a warper only where it changes the logits
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))

    def choose(logits: torch.Tensor) -> torch.Tensor:
        scores = warpers(None, logits.to(dtype=torch.float32, copy=True))
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)

    return choose


@torch.no_grad()
def sample(model, batch, *, copies: int, max_new_tokens: int, stop: set[int], temperature: float = 1.0,
           top_p: float = 1.0, generator: torch.Generator, suppress: list[int] = (),
           all_done=None) -> list[list[int]]:
    """`copies` completions of one prompt (`batch`: one unpadded prompt), each ending at its first
    end-of-sequence token where it reached one. `model`: a `LanguageModel` (with LoRA layers in place,
    or a peft model around one); the caller puts it in eval mode. `suppress`: ids never drawn
    (`media_tokens`). `all_done`: for ranks decoding in step (`qprep.train.infer.decode`)."""
    choose = sampler(temperature, top_p, generator, suppress)
    return run_as_forward(model, lambda language_model: decode(language_model, batch, max_new_tokens, stop, choose,
                                                               copies=copies, all_done=all_done))


def completion_batch(prompt: Sample, completions: list[list[int]], cache, layout):
    """The prompt followed by each completion, one row each (right-padded), labels on the completions."""
    rows = [Sample(id=prompt.id, input_ids=prompt.input_ids + tokens,
                   labels=[IGNORE] * len(prompt.input_ids) + tokens, media=prompt.media, has_audio=prompt.has_audio)
            for tokens in completions]
    return collate(rows, cache, layout)


def completion_mask(completions: list[list[int]], device: str | torch.device = "cpu") -> torch.Tensor:
    """[G, C] 1.0 on each completion's tokens, 0.0 on the padding after the shorter ones."""
    width = max(map(len, completions))
    return torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in completions], device=device)


def completion_logps(model, batch, width: int, temperature: float = 1.0) -> torch.Tensor:
    """[G, width] log-probabilities of each row's last `width` tokens (its completion, padded) given what
    precedes them, from the model's forward (with gradients where the caller allows them)."""
    logits = run_as_forward(model, lambda language_model: language_model.last_logits(batch, width + 1))
    logits = logits[:, :-1].float() / temperature
    targets = batch.input_ids[:, -width:].unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def reference_logps(model, batch, width: int, temperature: float = 1.0,
                    weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """`completion_logps` under the reference model: the same model with its LoRA adapter disabled
    (peft's `disable_adapter`), as TRL's GRPO trainer takes it with peft; with `weights` (the adapter a
    run started from, by parameter name), the model with those weights in eval mode (`with_weights`), as
    TRL keeps a starting PEFT adapter as its frozen reference. Call it before any forward whose graph
    holds the LoRA weights."""
    if weights is not None:
        with with_weights(model, weights):
            return completion_logps(model, batch, width, temperature)
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with disabled:
        return completion_logps(model, batch, width, temperature)


@contextmanager
def with_weights(model, weights: dict[str, torch.Tensor]):
    """`model` with `weights` copied into its parameters of those names, in eval mode (a frozen model has
    no dropout), and autocast's cast-weight cache off (a cast of the swapped-in weights must not serve
    a later forward); its own parameters back after, bit for bit, the mode and the cache as they were.
    The copies are in place, without gradients: the parameters stay the optimizer's and keep their
    gradients. Only before a forward whose graph holds them: copying in place changes their version."""
    parameters = dict(model.named_parameters())
    own = {name: parameters[name].detach().clone() for name in weights}
    training, caching = model.training, torch.is_autocast_cache_enabled()
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(_laid_out_as(value, parameters[name]))
    model.eval()
    torch.set_autocast_cache_enabled(False)
    try:
        yield model
    finally:
        torch.set_autocast_cache_enabled(caching)
        model.train(training)
        with torch.no_grad():
            for name, value in own.items():
                parameters[name].copy_(value)


def _laid_out_as(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """`value` (a whole weight) as `parameter` holds it: this rank's shard of it where the parameter is
    sharded (`--shard`: a DTensor), cut from the whole weight every rank holds, without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(parameter, DTensor):
        return value
    return distribute_tensor(value.to(parameter.device), parameter.device_mesh, parameter.placements,
                             src_data_rank=None)
