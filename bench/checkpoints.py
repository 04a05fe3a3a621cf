"""What the bench checkpoints share: a model saved with transformers' real classes gets the
tokenizer, chat template and processor files of a tiny template checkpoint of the same family."""

from __future__ import annotations

import shutil
from pathlib import Path

WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def finish_from_template(template: Path, partial: Path, path: Path, check=None) -> Path:
    """Copy `template`'s non-weight files into `partial` (where the model was saved), check that
    its processor loads offline (and `check(partial)`, if given), and move it into place at `path`
    (only complete checkpoints do)."""
    from transformers import AutoProcessor

    for item in template.iterdir():
        if item.name not in WEIGHT_FILES and not item.name.startswith("model-"):
            shutil.copy2(item, partial / item.name)
    AutoProcessor.from_pretrained(partial)
    if check is not None:
        check(partial)
    shutil.rmtree(template)
    partial.rename(path)
    return path
