"""SDPA that attends each sample of a packed row on its own.

transformers' `sdpa` keeps the samples of a packed row apart with a block-diagonal mask over the
whole row: a row of T tokens then costs T² in attention whatever its samples' lengths, and an
arbitrary mask keeps SDPA off the kernels that `is_causal` reaches (flash attention on GPU and CPU).
`PACKED_SDPA` runs transformers' own `sdpa_attention_forward` once per sample instead (causal, no
mask), as transformers' vision towers do for their windows without flash attention: Σ Lᵢ² rather
than T², and each sample's attention the very call it gets alone. The samples' bounds are read from
the text positions the model passes down (they restart at each sample, the rule transformers'
packed-sequence mask reads).

Anything that is not a packed row goes to `sdpa_attention_forward` as `sdpa` would send it: a
padding mask is sdpa's own 4-D mask, and so are a cache's steps.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED_SDPA = "qprep_packed_sdpa"


def attention_for_packing(attn_implementation: str) -> str:
    """The implementation a packed run uses for `attn_implementation`: sdpa per sample for `sdpa`;
    the others as they are (flash attention has its own variable-length path)."""
    return PACKED_SDPA if attn_implementation == "sdpa" else attn_implementation


def packed_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    if attention_mask is not None or query.shape[2] != key.shape[2]:  # padding, or a cache's step
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("sliding_window"):
        raise ValueError("packed rows are attended per sample over all of each sample; "
                         "a sliding-window layer cannot be packed")
    lengths = _sample_lengths(kwargs.get("position_ids"), query.shape[0], query.shape[2])
    pieces = zip(*(tensor.split(lengths, dim=2) for tensor in (query, key, value)))
    outputs = [sdpa_attention_forward(module, q, k, v, None, **kwargs)[0] for q, k, v in pieces]
    return torch.cat(outputs, dim=1), None  # sdpa_attention_forward gives [batch, length, heads, dim]


def _packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    # No padding: no mask at all (the attention reads the samples' bounds from the positions). With
    # padding, sdpa's own mask, so that an unpacked batch is attended exactly as by `sdpa`.
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _sample_lengths(position_ids: torch.Tensor | None, batch: int, length: int) -> list[int]:
    if position_ids is None:
        raise ValueError("packed attention needs the text positions the model passes to its attention layers, "
                         "to find where each sample of the row starts")
    restarts = position_ids[:, 1:] - position_ids[:, :-1] != 1
    if batch > 1:
        if bool(restarts.any()):
            raise ValueError("packed samples come one row per batch")
        lengths = [length]
    else:
        bounds = [0, *(restarts[0].nonzero().flatten() + 1).tolist(), length]
        lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    return lengths


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, _packed_sdpa_mask)
