"""Training settings: what `qprep train` does, from defaults, a job preset's `[train]` table and flags.

The defaults are the research recipe's: LoRA r 16, alpha 16, dropout 0.05 on the model family's
default targets in the language model (q/k/v/o/up/down_proj for the Qwen2.5 families), lr 1e-4,
gradient accumulation 2, 2 epochs; and for everything the recipe left at transformers' `Trainer`
defaults, the Trainer's: a linear decay to 0 with no warmup, AdamW (β 0.9/0.999, ε 1e-8) without
weight decay, the global gradient norm clipped to 1.0, token-weighted accumulation. In a preset and
on the command line the LoRA fields are spelled flat: `lora_r`, `lora_alpha`, `lora_dropout`,
`lora_targets`.

`adapter` starts the LoRA from a trained adapter's weights instead of a fresh init (its rank, alpha
and targets must be the run's). `method` "grpo" trains by reinforcement instead
(`qprep.train.objectives.grpo`), with `GrpoSettings`, spelled flat as well (`num_generations`, `temperature`, ...); their defaults are TRL's `GRPOConfig`'s
(TRL 1.13): G 8, temperature 1, top-p 1, 512 new tokens, β 0, ε 0.2, the `dapo` loss, rewards scaled
by their group's spread.
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


METHODS = ("sft", "grpo")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")  # TRL's names (`qprep.train.objectives.grpo_loss`)


@dataclass(frozen=True)
class GrpoSettings:
    # `qprep.train.rewards` names: built-ins or `package.module:function`. Plain temporal IoU by default:
    # grounding is what the field trains with GRPO, IoU is what R1@m measures, and it reads the answer
    # form qprep's grounding records and prompts already use ("From xx to xx"); a format term pays only
    # where the prompt asks for a form (Time-R1's <answer> tags), so it is asked for by name.
    rewards: tuple[str, ...] = ("tiou",)
    num_generations: int = 8  # G: completions per prompt, their rewards normalised within the group
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512  # a completion's most tokens (TRL's max_completion_length)
    # the KL term's weight (0: none), against the model with the adapter disabled, or with the adapter
    # the run started from (`adapter`) frozen
    beta: float = 0.0
    epsilon: float = 0.2  # the ratio's clip: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon
    loss_type: str = "dapo"  # TRL's default since 0.2x; "grpo" (per-sequence means), "dr_grpo"
    scale_rewards: bool = True  # divide each group's centred rewards by its std + 1e-4 (TRL's "group")
    # optimizer steps on each step's rollouts (TRL's num_iterations, μ): after the first, the clipped
    # ratio against the policy that sampled them bounds how far each step moves
    num_iterations: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "rewards", tuple(self.rewards))
        if not self.rewards:
            raise SettingsError("--reward: GRPO needs at least one reward")
        if self.num_generations < 2:
            raise SettingsError(f"--num-generations {self.num_generations}: GRPO compares completions within a "
                                f"group, it needs 2 or more")
        if not self.temperature > 0:
            raise SettingsError(f"--temperature {self.temperature}: must be above 0 (sampling divides by it)")
        if not 0 < self.top_p <= 1:
            raise SettingsError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise SettingsError(f"--max-new-tokens {self.max_new_tokens}: must be 1 or more")
        if self.beta < 0 or not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise SettingsError("need --beta >= 0, --epsilon in (0, 1) and --epsilon-high > 0")
        if self.num_iterations < 1:
            raise SettingsError(f"--num-iterations {self.num_iterations}: must be 1 or more")
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise SettingsError(f"loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}, got {self.loss_type!r}")


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
    method: str = "sft"  # "sft": next-token loss on the answers; "grpo": reinforcement from sampled answers
    # an adapter folder written by `qprep train` the run's LoRA starts from (None: a fresh init); run.json
    # records it apart from the settings, with a digest of its weights (`qprep.train.run_folder`)
    adapter: str | None = None
    grpo: GrpoSettings = field(default_factory=GrpoSettings)

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
        if self.method not in METHODS:
            raise SettingsError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
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
        grpo = {k: v for k, v in values.items() if k in _grpo_names()}
        plain = {k: v for k, v in values.items() if not k.startswith("lora_") and k not in grpo}
        if "targets" in lora:
            lora["targets"] = tuple(lora["targets"])
        return replace(self, **plain, lora=replace(self.lora, **lora), grpo=replace(self.grpo, **grpo))

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        del values["adapter"]  # the run's identity records it, with its weights' digest
        if self.method == "sft":  # a supervised run records what it did before GRPO existed (and resumes)
            del values["method"], values["grpo"]
        return values


def flat_names() -> set[str]:
    return (({f.name for f in fields(TrainSettings)} - {"lora", "grpo"}) | {f"lora_{f.name}" for f in fields(LoraSettings)}
            | _grpo_names())


def _grpo_names() -> set[str]:
    return {f.name for f in fields(GrpoSettings)}
