"""A model family is one module under `qprep/models/families/`: the rest of qprep names none."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from qprep.models.families import FAMILIES

PACKAGE = Path(__file__).resolve().parents[1] / "qprep"
# Spellings of a family in code: model types and transformers class names, in names and in strings.
# Qwen2-VL's processor classes are not among them: `Qwen2VLVideoProcessor` is every Qwen2/2.5
# family's video processor (and Qwen3-Omni's), which qprep's CPU stage reproduces for all of them.
FAMILY_NAME = re.compile(r"qwen2_5|qwen2_vl|qwen3|omni", re.IGNORECASE)
FAMILY_STRING = re.compile(r"qwen2_5_|qwen2_vl|qwen3|Qwen2_5|Qwen3|Qwen2VL(?:For|Model|Text)|Qwen2Vision")


def code_names_and_strings(path: Path):
    """(line, text) of every identifier and every string constant that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id, FAMILY_NAME
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr, FAMILY_NAME
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            yield node.lineno, node.name, FAMILY_NAME
        elif isinstance(node, ast.arg):
            yield node.lineno, node.arg, FAMILY_NAME
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value, FAMILY_STRING


def test_no_module_outside_the_models_package_names_a_family():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if PACKAGE / "models" in path.parents:
            continue
        for line, text, pattern in code_names_and_strings(path):
            if pattern.search(text):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text[:60]!r}")
    assert not found, "family names outside qprep/models/:\n" + "\n".join(found)


def test_the_scan_finds_a_family_name_where_there_is_one(tmp_path):
    """The check above can fail: an `is_omni` branch and a model type in a string are both caught, and
    so is a Qwen2-VL model class, but not the video processor every family shares."""
    sample = tmp_path / "sample.py"
    sample.write_text('"""Qwen2.5-Omni in prose is fine."""\nis_omni = model_type == "qwen2_5_omni"\n'
                      'is_qwen2_vl = name == "Qwen2VLForConditionalGeneration"\nQwen2VLVideoProcessor()\n')
    assert sorted(text for _, text, pattern in code_names_and_strings(sample) if pattern.search(text)) == [
        "Qwen2VLForConditionalGeneration", "is_omni", "is_qwen2_vl", "qwen2_5_omni"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_class_a_family_names_exists_in_transformers(name):
    import transformers

    family = FAMILIES[name]
    module = importlib.import_module(family.module)
    for class_name in (family.vision_class, family.audio_class, family.feature_class, family.text_class):
        if class_name is not None:
            assert hasattr(module, class_name), f"{name}: {family.module} has no {class_name}"
    assert hasattr(transformers, family.full_model[0])
    assert family.has_audio == bool(family.audio_prefixes)
