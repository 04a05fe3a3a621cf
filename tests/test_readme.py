"""The README's example that reads a store with zarr and pyarrow alone runs and reads the right tokens."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    match = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, "the README lost its store-reading example"
    return match.group(1)


def test_the_readme_example_reads_a_store_without_qprep(omni_store, capsys):
    _, cache = omni_store
    code = readme_example().replace('"clips.zarr"', repr(str(cache.store.root)))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    row = namespace["row"]
    expected = cache.video_tokens(row["id"]).float().numpy()
    assert np.array_equal(namespace["tokens"], expected)
    assert row["id"] in capsys.readouterr().out


def test_the_readme_bf16_widening_is_exact():
    """The example widens stored bf16 bits to float32 by shifting; torch agrees bit for bit."""
    values = torch.randn(1000, dtype=torch.float32).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    widened = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(widened, values.float().numpy())
