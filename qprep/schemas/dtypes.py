"""The dtypes qprep runs towers and language models in and stores tokens in: one table.

For each: what the Zarr arrays hold (Zarr and NumPy have no bfloat16, so its bits are kept as
uint16) and `qprep verify`'s default token tolerance (why those values: `qprep.audit.verify`).
torch is imported only when a torch dtype is asked for: a no-op re-run never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qprep.errors import SettingsError


@dataclass(frozen=True)
class Dtype:
    name: str
    storage: str  # the NumPy dtype of the stored arrays
    verify_tolerance: float  # relative to the reference's largest magnitude; 0 = bit-exact


DTYPES = {dtype.name: dtype for dtype in (
    Dtype("float32", "float32", 0.0),
    Dtype("bfloat16", "uint16", 2.0**-6),
    Dtype("float16", "float16", 2.0**-9),
)}
DTYPE_NAMES = tuple(DTYPES)


def dtype_facts(name: str) -> Dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise SettingsError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}") from None


def torch_dtype(name: str):
    """The torch dtype of one of `DTYPE_NAMES`."""
    import torch

    return getattr(torch, dtype_facts(name).name)


def storage_dtype(name: str) -> np.dtype:
    return np.dtype(dtype_facts(name).storage)


def resolve_dtype(name: str, checkpoint_dtype: str) -> str:
    """'auto' is the dtype the checkpoint was saved in (bf16 for Qwen's releases)."""
    resolved = checkpoint_dtype if name == "auto" else name
    if resolved not in DTYPES:
        raise SettingsError(f"dtype must be auto or one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return resolved


def compute_dtype(device: str) -> str:
    """The default dtype to train and generate in: bf16 on a GPU (as the Trainer's `bf16=True`),
    float32 on CPU (exact, and CPUs have no fast bf16 path for most kernels)."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def to_tensor(values: np.ndarray, dtype):
    """Stored values → torch in the logical dtype (bf16 from its uint16 bits, no copy)."""
    import torch

    if dtype is torch.bfloat16:
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def to_storage(tokens) -> np.ndarray:
    """Tower output → what the Zarr array holds (bf16 as its uint16 bits, lossless)."""
    import torch

    tokens = tokens.detach().to("cpu").contiguous()
    if tokens.dtype is torch.bfloat16:
        return tokens.view(torch.int16).numpy().view(np.uint16)
    return tokens.numpy()
