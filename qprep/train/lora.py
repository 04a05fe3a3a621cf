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
import warnings

from qprep.schemas.training import LoraSettings


def apply_lora(language_model, settings: LoraSettings = LoraSettings()):
    """Wrap a `qprep.train.model.LanguageModel` with LoRA adapters (only they train)."""
    from peft import LoraConfig, get_peft_model

    family_targets = language_model.family.lora_targets
    modules, parameters = settings.split_targets(family_targets)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_regex(family_targets) if modules else [],
                        target_parameters=list(parameters) or None, exclude_modules=settings.tower_regex(),
                        bias="none")
    with no_tower_warning():
        return get_peft_model(language_model, config)


@contextlib.contextmanager
def no_tower_warning():
    """peft warns that the excluded towers matched nothing: they are excluded for where the adapter
    is loaded onto the full model, and the language model alone has none."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You have passed exclude_modules")
        yield
