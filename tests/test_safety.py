"""Nothing read from disk is unpickled: weights come from safetensors only, trainer state loads with
`weights_only`, and `trust_remote_code` is never turned on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from qprep.errors import SettingsError

SOURCES = sorted((Path(__file__).resolve().parent.parent / "qprep").rglob("*.py"))


def test_no_source_unpickles_or_trusts_remote_code():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"pickle\.loads?\(|Unpickler\(|np\.load\(|allow_pickle", text), path
        assert "trust_remote_code=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_trainer_state_with_a_pickled_object_is_refused(tmp_path):
    """--resume's loader refuses a trainer.pt holding an arbitrary object, and never runs it."""
    from qprep.train.loop import load_trainer_state

    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (ran,))

    state = {"optimizer": {}, "rng": torch.get_rng_state()}
    torch.save(state, tmp_path / "good.pt")
    assert torch.equal(load_trainer_state(tmp_path / "good.pt")["rng"], state["rng"])
    torch.save({**state, "evil": Payload()}, tmp_path / "trainer.pt")
    with pytest.raises(SettingsError, match="trainer.pt holds objects other than tensors"):
        load_trainer_state(tmp_path / "trainer.pt")
    assert not ran.exists()


def test_an_adapter_without_safetensors_is_refused(tmp_path):
    from qprep.train.infer import load_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SettingsError, match="safetensors only"):
        load_adapter(torch.nn.Linear(1, 1), tmp_path)
