"""The optimizer step as transformers' `Trainer` takes it, from the same library calls.

* optimizer: the class and arguments `Trainer.get_optimizer_cls_and_kwargs` picks for the settings
  (AdamW; torch's fused kernel where the Trainer uses it), over the Trainer's two parameter groups:
  weight decay on what `Trainer.get_decay_parameter_names` names, none on biases and norms;
* schedule: transformers' `get_scheduler`, over the run's optimizer steps, with the Trainer's
  warmup rule (`warmup_steps`, else `ceil(warmup_ratio · steps)`);
* accumulation: an optimizer step is `grad_accum` consecutive batches, or fewer at an epoch's end.
  Token-weighted (the default), each batch's loss is its summed cross-entropy over the number of
  label tokens of the whole step (counted after the causal shift, as the Trainer's
  `num_items_in_batch`), so every token weighs the same; "batches": each batch's mean, over the
  number of batches in the step (what the Trainer does for model classes that take no loss kwargs,
  Qwen2.5-VL's and Qwen3-VL's);
* clipping: `torch.nn.utils.clip_grad_norm_` to `max_grad_norm` (0: no clipping), whose returned
  norm, before clipping, is what the metrics record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qprep.schemas.training import TrainSettings


def build_optimizer(model, settings: TrainSettings) -> torch.optim.Optimizer:
    from transformers import Trainer

    arguments = trainer_arguments(settings)
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(arguments, model)
    # a method of the Trainer that reads nothing of it: the same names, from the same rule
    decay = set(Trainer.get_decay_parameter_names(None, model))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # a trained merger's parameters: their own groups at merger_lr where it is given (the Trainer
    # subclass of Qwen's finetune scripts does the same for mm_projector_lr)
    merger = {id(p) for p in trained_merger_parameters(model)} if settings.merger_lr is not None else set()
    rest = [(n, p) for n, p in trainable if id(p) not in merger]
    groups = [{"params": [p for n, p in rest if n in decay], "weight_decay": settings.weight_decay},
              {"params": [p for n, p in rest if n not in decay], "weight_decay": 0.0}]
    if merger:
        own = [(n, p) for n, p in trainable if id(p) in merger]
        groups += [{"params": [p for n, p in own if n in decay], "weight_decay": settings.weight_decay,
                    "lr": settings.merger_lr},
                   {"params": [p for n, p in own if n not in decay], "weight_decay": 0.0, "lr": settings.merger_lr}]
    return optimizer_class(groups, **kwargs)


def trained_merger_parameters(model) -> list:
    from qprep.train.merger import trained_merger

    merger = trained_merger(model)
    return [] if merger is None else list(merger.parameters())


def build_scheduler(optimizer, settings: TrainSettings, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(settings, total_steps),
                         num_training_steps=total_steps)


def warmup_steps(settings: TrainSettings, total_steps: int) -> int:
    return settings.warmup_steps if settings.warmup_steps > 0 else math.ceil(total_steps * settings.warmup_ratio)


def trainer_arguments(settings: TrainSettings):
    """`TrainingArguments` holding the optimizer settings (what the Trainer's own choice reads)."""
    import tempfile

    from transformers import TrainingArguments

    return TrainingArguments(output_dir=tempfile.gettempdir(), learning_rate=settings.lr,
                             weight_decay=settings.weight_decay, adam_beta1=settings.adam_beta1,
                             adam_beta2=settings.adam_beta2, adam_epsilon=settings.adam_eps, report_to=[])


@dataclass(frozen=True)
class StepShare:
    """What one batch knows of the optimizer step it belongs to (its objective computes it when the
    step starts: `qprep.train.objectives`)."""

    batches: int  # batches in the step
    label_tokens: int  # label tokens of the whole step (after the causal shift)
    last: bool  # the step's last batch: the optimizer steps after it


def optimizer_steps(planned: list, grad_accum: int, per_epoch: int) -> list[list]:
    """The planned batches grouped into optimizer steps, in plan order: `grad_accum` consecutive batches,
    fewer at an epoch's end (a step never crosses one). `planned` begins at a step's first batch (a
    resumed run starts where a step ended)."""
    steps: list[list] = []
    group: list = []
    for batch in planned:
        group.append(batch)
        if (batch.index + 1) % grad_accum == 0 or batch.index + 1 == per_epoch:
            steps.append(group)
            group = []
    return steps


def label_tokens(labels: list[int]) -> int:
    """Tokens a causal LM's loss counts: labels after the first that are not ignored."""
    from qprep.train.data import IGNORE

    return sum(1 for label in labels[1:] if label != IGNORE)


def steps_in_run(settings: TrainSettings, per_epoch: int) -> int:
    return settings.epochs * math.ceil(per_epoch / settings.grad_accum)


def clip(parameters, max_grad_norm: float) -> float:
    """Clip the global gradient norm (0: leave it) and return it as it was before."""
    from qprep.train.sharding import full_norm

    limit = max_grad_norm if max_grad_norm > 0 else math.inf
    return full_norm(torch.nn.utils.clip_grad_norm_(parameters, limit))
