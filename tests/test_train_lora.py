"""LoRA from the cache: it trains the language model only, lowers the loss on a learnable task, and
the saved adapter loads onto transformers' full model with peft and changes its output the same way."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor

from qprep.models.checkpoint import open_checkpoint
from qprep.train.lora import LoraSettings, apply_lora
from qprep.train.model import Batch, LanguageModel
from reference import full_model


def text_batch(tokenizer, texts: list[str]) -> Batch:
    """A batch without video (the adapter mechanics do not depend on it)."""
    ids = [tokenizer(t)["input_ids"] for t in texts]
    longest = max(map(len, ids))
    input_ids = torch.tensor([i + [0] * (longest - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids])
    return Batch(input_ids=input_ids, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, -100),
                 video_tokens=torch.zeros(0, 64), video_grid_thw=torch.zeros(0, 3, dtype=torch.int64),
                 second_per_grid=torch.zeros(0, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_5_omni"])
def test_lora_trains_the_language_model_and_loads_onto_the_full_model(tiny_model, tmp_path, kind):
    from peft import PeftModel

    model_dir = tiny_model(kind)
    tokenizer = AutoProcessor.from_pretrained(model_dir).tokenizer
    torch.manual_seed(0)
    model = apply_lora(LanguageModel(open_checkpoint(model_dir)), LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and ".language_model.layers." in name for name in trainable)
    batch = text_batch(tokenizer, ["the video is what happens", "You are a helpful video"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(30):
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    # random tiny weights: LoRA alone moves it, slowly (about 1.0 over these steps; how much exactly
    # depends on the CPU kind, AVX-512 kernels move it by 0.97, so the bar sits well below that)
    assert losses[-1] < losses[0] - 0.5
    model.save_pretrained(tmp_path / "adapter")

    full = full_model(model_dir)
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    with torch.no_grad():
        before = full(**kwargs).logits
        adapted = PeftModel.from_pretrained(full, tmp_path / "adapter").eval()
        after = adapted(**kwargs).logits
        model.eval()
        _, ours = model(batch)
    real = batch.attention_mask.bool()  # padding positions carry no meaning on either side
    assert not torch.allclose(before[real], after[real], atol=1e-3)
    torch.testing.assert_close(after[real], ours[real], rtol=1e-5, atol=1e-5)
