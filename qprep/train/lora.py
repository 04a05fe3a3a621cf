"""LoRA on the language model only, in peft's format, loadable onto the full transformers model.

The recipe's plain target list (q/k/v/o/up/down_proj) also names modules inside the vision and
audio towers of the full models. Targets here are a regex anchored on `language_model`, so the same
adapter config hits the language model alone wherever it is applied. MoE experts, fused 3-D
parameters in transformers 5, are targeted by parameter name (peft's `target_parameters`; only the
language model has experts). The towers are also excluded by name (`LoraSettings.tower_regex`), for
the model types whose regex targets peft rewrites into bare module names.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from qprep.errors import SettingsError
from qprep.schemas.training import LoraSettings


def apply_lora(language_model, settings: LoraSettings = LoraSettings()):
    """Wrap a `qprep.train.model.LanguageModel` with LoRA adapters (only they train)."""
    from peft import get_peft_model

    with no_tower_warning():
        return get_peft_model(language_model, lora_config(settings, language_model.family.lora_targets))


def lora_config(settings: LoraSettings, family_targets: tuple[str, ...]):
    """peft's `LoraConfig` of `settings` on a model family with these default targets."""
    from peft import LoraConfig

    modules, parameters = settings.split_targets(family_targets)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_regex(family_targets) if modules else [],
                      target_parameters=list(parameters) or None, exclude_modules=settings.tower_regex(),
                      bias="none")


def check_same_lora(adapter: Path, settings: LoraSettings, family_targets: tuple[str, ...]) -> None:
    """Refuse to start a run's LoRA from the adapter in `adapter` (its adapter_config.json) where its rank,
    alpha or targets differ from the run's: its weights would not be the run's LoRA. Dropout may differ
    (it is how the run trains, not what the weights mean)."""
    try:
        saved = json.loads((adapter / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise SettingsError(f"--adapter {adapter}: its adapter_config.json is not JSON ({exc})") from None
    config = lora_config(settings, family_targets)
    run = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": _targets(config.target_modules),
           "target_parameters": _targets(config.target_parameters)}
    flags = {"r": "--lora-r", "lora_alpha": "--lora-alpha"}
    differing = [name for name, value in run.items()
                 if (saved.get(name) if name in flags else _targets(saved.get(name))) != value]
    if not differing:
        return
    given = ", ".join(f"{name} {saved.get(name)!r} (this run: {run[name]!r})" for name in differing)
    fix = " ".join(f"{flags[name]} {saved[name]}" for name in differing if name in flags)
    targets = any(name not in flags for name in differing)
    raise SettingsError(f"--adapter {adapter} was trained with another LoRA: {given}; train with its settings"
                        + (f": pass {fix}" if fix else "")
                        + (" and set lora_targets in a --job file's [train] table to the targets it was trained "
                           "with" if targets else ""))


def _targets(value):
    """A target list or regex as comparable: a regex as is, a list as a sorted list, none as []."""
    if value is None:
        return []
    return value if isinstance(value, str) else sorted(value)


@contextlib.contextmanager
def no_tower_warning():
    """peft warns that the excluded towers matched nothing: they are excluded for where the adapter
    is loaded onto the full model, and the language model alone has none."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You have passed exclude_modules")
        yield
