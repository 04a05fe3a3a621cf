"""LoRA on the language model only, in peft's format, loadable onto the full transformers model.

The recipe's plain target list (q/k/v/o/up/down_proj) also names modules inside the vision and
audio towers of the full models. Targets here are a regex anchored on `language_model`, so the same
adapter config hits the language model alone wherever it is applied.
"""

from __future__ import annotations

from qprep.schemas.training import LoraSettings


def apply_lora(language_model, settings: LoraSettings = LoraSettings()):
    """Wrap a `qprep.train.model.LanguageModel` with LoRA adapters (only they train)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_regex(language_model.family.lora_targets), bias="none")
    return get_peft_model(language_model, config)
