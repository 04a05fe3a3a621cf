"""Training settings: what `qprep train` does, from defaults, a job preset's `[train]` table and flags.

The defaults are the research recipe's: LoRA r 16, alpha 16, dropout 0.05 on the model family's
default targets in the language model (q/k/v/o/up/down_proj for the Qwen2.5 families), lr 1e-4,
gradient accumulation 2, 2 epochs; and for everything the recipe left at transformers' `Trainer`
defaults, the Trainer's: a linear decay to 0 with no warmup, AdamW (β 0.9/0.999, ε 1e-8) without
weight decay, the global gradient norm clipped to 1.0, token-weighted accumulation. In a preset and
on the command line the LoRA fields are spelled flat: `lora_r`, `lora_alpha`, `lora_dropout`,
`lora_targets`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from qprep.errors import SettingsError

EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")  # transformers 5's fused MoE experts


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    # None: the model family's default targets. A name with a dot names a parameter, not a module:
    # MoE experts are fused 3-D parameters ("experts.gate_up_proj", "experts.down_proj"; "experts"
    # for both), adapted through peft's `target_parameters`.
    targets: tuple[str, ...] | None = None

    def target_regex(self, family_targets: tuple[str, ...]) -> str:
        """The module targets inside the language model only (the towers of the full model have the same names)."""
        modules, _ = self.split_targets(family_targets)
        return r".*\blanguage_model\.layers\.\d+\..*\.(" + "|".join(modules) + r")$"

    @staticmethod
    def tower_regex() -> str:
        """The full model's towers, excluded by name as well: for MoE model types that transformers
        converts at load time (Qwen3-Omni's), peft rewrites a regex `target_modules` into bare module
        names (`q_proj`, ...), which the audio tower's projections also carry."""
        return r".*\b(visual|audio_tower)\..*"

    def split_targets(self, family_targets: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(module names, parameter names) of the targets."""
        chosen: list[str] = []
        for name in self.targets or family_targets:
            chosen += list(EXPERT_PARAMETERS) if name == "experts" else [name]
        return tuple(n for n in chosen if "." not in n), tuple(n for n in chosen if "." in n)


SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")  # transformers' get_scheduler names
LOSS_WEIGHTING = ("tokens", "batches")


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 2
    lr: float = 1e-4  # the peak: the schedule scales it
    lr_scheduler: str = "linear"
    warmup_steps: int = 0  # optimizer steps; 0: warmup_ratio decides
    warmup_ratio: float = 0.0  # of the run's optimizer steps, rounded up
    weight_decay: float = 0.0  # on everything but biases and norms
    max_grad_norm: float = 1.0  # 0: no clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    loss_weighting: str = "tokens"  # "tokens": every label token of a step weighs the same; "batches": every batch
    batch_size: int = 1
    grad_accum: int = 2
    max_length: int | None = None  # tokens, video included
    cut_to_max_length: bool = False  # cut longer samples' text (never a video block) instead of leaving them out
    packing: bool = False  # several samples side by side in each row, up to max_length tokens, no padding
    # the language model's attention (transformers' names): with packing, "flash_attention_2" attends
    # within each sample (variable length); "sdpa" masks a whole row's attention to its samples
    attn_implementation: str = "sdpa"
    # FSDP2 over the ranks: each keeps 1/N of the frozen base, the adapter and the optimizer state
    shard: bool = False
    seed: int = 0
    save_every: int = 0  # optimizer steps between checkpoints (0: at epoch ends only)
    eval_every: int = 0  # optimizer steps between validations, with held-out records (0: at epoch ends only)
    save_best: bool = False  # keep the adapter with the lowest validation loss in best-adapter/
    gradient_checkpointing: bool = True
    dtype: str | None = None  # None: bf16 on GPU, float32 on CPU
    # processes reading the cache ahead of the model; None: 2 on GPU, 0 on CPU, where the cores are
    # the compute and workers would take them from it (measured: 1.21x the in-memory floor vs 1.04x)
    workers: int | None = None
    # experiment trackers (`qprep.train.trackers`), as the Trainer's report_to: names, "all" or "none";
    # None: TensorBoard when it is installed
    report_to: tuple[str, ...] | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    # the vision tower's mergers, from a store of their input: "none" (frozen) or "full" (trained
    # beside the LoRA, at merger_lr; None: lr, as Qwen's finetune scripts' mm_projector_lr)
    train_merger: str = "none"
    merger_lr: float | None = None

    def __post_init__(self) -> None:
        from qprep.train.trackers import parse_report_to

        object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        scheduler = self.lr_scheduler.replace("-", "_")
        object.__setattr__(self, "lr_scheduler", scheduler)
        if scheduler not in SCHEDULERS:
            raise SettingsError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.train_merger not in ("none", "full"):
            raise SettingsError(f"train_merger must be none or full, got {self.train_merger!r}")
        if self.shard and self.train_merger != "none":
            raise SettingsError("--shard shards the language model alone; a trained merger (--train-merger) is "
                                "not sharded with it: train it without --shard")
        if self.merger_lr is not None and (self.train_merger == "none" or not self.merger_lr > 0):
            raise SettingsError("merger_lr is the learning rate of a trained merger: a positive number, with "
                                "train_merger full")
        if self.loss_weighting not in LOSS_WEIGHTING:
            raise SettingsError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTING)}, got {self.loss_weighting!r}")
        if not 0 <= self.warmup_ratio < 1 or min(self.warmup_steps, self.max_grad_norm, self.weight_decay,
                                                 self.eval_every) < 0:
            raise SettingsError("need warmup_ratio in [0, 1), and warmup_steps, max_grad_norm, weight_decay, "
                                "eval_every >= 0")

    def updated(self, values: dict[str, Any], source: str = "flags") -> "TrainSettings":
        """These settings with `values` (flat names; None means "not given") on top."""
        values = {k: v for k, v in values.items() if v is not None}
        unknown = sorted(set(values) - flat_names())
        if unknown:
            raise SettingsError(f"{source}: unknown training settings {unknown}; known: {sorted(flat_names())}")
        lora = {k[len("lora_"):]: v for k, v in values.items() if k.startswith("lora_")}
        plain = {k: v for k, v in values.items() if not k.startswith("lora_")}
        if "targets" in lora:
            lora["targets"] = tuple(lora["targets"])
        return replace(self, **plain, lora=replace(self.lora, **lora))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flat_names() -> set[str]:
    return ({f.name for f in fields(TrainSettings)} - {"lora"}) | {f"lora_{f.name}" for f in fields(LoraSettings)}
