"""`qprep train`: LoRA on the language model from a cache. No tower is built, no video decoded.

Each epoch visits the samples in an order fixed by (seed, epoch), so a resumed run sees exactly
the batches an uninterrupted run would. Checkpoints (`checkpoint-<step>/`: the adapter in peft's
format, the optimizer and the position in the data) are written every `save_every` optimizer steps
and at the end of each epoch; the final adapter is `adapter/`. Metrics go to `metrics.jsonl`, the loss curve to `loss.png`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qprep.errors import SettingsError
from qprep.schemas.layout import PlaceholderIds
from qprep.train.lora import LoraSettings
from qprep.train.plot import plot_loss

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 2
    max_length: int | None = None
    seed: int = 0
    save_every: int = 0  # optimizer steps between checkpoints (0: at epoch ends only)
    gradient_checkpointing: bool = True
    dtype: str | None = None  # None: bf16 on GPU, float32 on CPU
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class TrainSummary:
    samples: int
    skipped: dict
    steps: int
    first_loss: float | None
    last_loss: float | None
    seconds: float


def train(cache_path: str | Path, data_path: str | Path, model: str, out: str | Path,
          settings: TrainSettings = TrainSettings(), *, resume: bool = False, device: str | None = None,
          progress: bool = True, echo=print) -> TrainSummary:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from qprep.models.checkpoint import open_checkpoint
    from qprep.store.reader import open_cache
    from qprep.train.data import build_dataset, collate, load_records
    from qprep.train.lora import apply_lora
    from qprep.train.model import LanguageModel

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = settings.dtype or ("bfloat16" if device == "cuda" else "float32")
    checkpoint = open_checkpoint(model)
    cache = open_cache(cache_path)
    _check_cache_fits(cache, checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.source, revision=checkpoint.revision)
    omni = checkpoint.has_audio
    ids = placeholder_ids(tokenizer, omni)
    dataset = build_dataset(load_records(data_path), cache, tokenizer, ids, merge_size=_merge_size(checkpoint),
                            audio=omni, max_length=settings.max_length)
    echo(dataset.report())
    if not dataset.samples:
        raise SettingsError("no sample left to train on")

    torch.manual_seed(settings.seed)
    language_model = LanguageModel(checkpoint, dtype=dtype, device=device)
    if settings.gradient_checkpointing:
        language_model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})  # reentrant breaks with injected embeddings
    peft_model = apply_lora(language_model, settings.lora)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=settings.lr)
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batches_per_epoch = -(-len(dataset.samples) // settings.batch_size)
    state = {"epoch": 0, "batch": 0, "step": 0}
    if resume:
        state = _restore(out, peft_model, optimizer) or state

    metrics = open(out / "metrics.jsonl", "a")
    bar = tqdm(total=settings.epochs * batches_per_epoch, initial=state["epoch"] * batches_per_epoch + state["batch"],
               desc="train", unit="batch", disable=not progress)
    first_loss = last_loss = None
    peft_model.train()
    try:
        for epoch in range(state["epoch"], settings.epochs):
            order = torch.randperm(len(dataset.samples), generator=torch.Generator().manual_seed(settings.seed + epoch))
            start_batch = state["batch"] if epoch == state["epoch"] else 0
            for index in range(start_batch, batches_per_epoch):
                tick = time.perf_counter()
                chosen = [dataset.samples[i] for i in order[index * settings.batch_size:(index + 1) * settings.batch_size]]
                batch = _to(collate(chosen, cache, pad_id, audio=omni), device)
                loss, _ = peft_model(batch)
                (loss / settings.grad_accum).backward()
                last_loss = float(loss)
                first_loss = last_loss if first_loss is None else first_loss
                boundary = (index + 1) % settings.grad_accum == 0 or index + 1 == batches_per_epoch
                if boundary:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                state.update(epoch=epoch, batch=index + 1)
                elapsed = time.perf_counter() - tick
                metrics.write(json.dumps({
                    "epoch": epoch, "batch": index, "step": state["step"], "loss": last_loss, "lr": settings.lr,
                    "tokens_per_s": int(batch.attention_mask.sum()) / elapsed, "step_time_s": elapsed,
                    "memory_mb": _memory_mb(device)}) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", epoch=epoch)
                if boundary and settings.save_every and state["step"] % settings.save_every == 0:
                    _save(out, peft_model, optimizer, state)
            state.update(epoch=epoch + 1, batch=0)
            _save(out, peft_model, optimizer, state)
    finally:
        bar.close()
        metrics.close()
    peft_model.save_pretrained(out / "adapter")
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    return TrainSummary(samples=len(dataset.samples), skipped=dataset.skipped, steps=state["step"],
                        first_loss=first_loss, last_loss=last_loss, seconds=time.perf_counter() - started)


def placeholder_ids(tokenizer, omni: bool) -> PlaceholderIds:
    get = tokenizer.convert_tokens_to_ids
    if omni:
        return PlaceholderIds(get("<|vision_bos|>"), get("<|vision_eos|>"), get("<|VIDEO|>"), get("<|AUDIO|>"),
                              get("<|audio_bos|>"), get("<|audio_eos|>"))
    return PlaceholderIds(get("<|vision_start|>"), get("<|vision_end|>"), get("<|video_pad|>"))


def _check_cache_fits(cache, checkpoint) -> None:
    family = cache.config["model"]["family"]
    if family != checkpoint.family.name or cache.hidden_size != checkpoint.hidden_size:
        raise SettingsError(f"the cache holds {family} tokens of width {cache.hidden_size}; --model "
                            f"{checkpoint.source} is {checkpoint.family.name} of width {checkpoint.hidden_size}")


def _merge_size(checkpoint) -> int:
    return int(checkpoint.tower_config["vision_config"].get("spatial_merge_size", 2))


def _to(batch, device: str):
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            setattr(batch, name, value.to(device))
    return batch


def _memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _save(out: Path, peft_model, optimizer, state: dict) -> None:
    directory = out / f"{CHECKPOINT_PREFIX}{state['step']:07d}"
    peft_model.save_pretrained(directory)
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, directory / "trainer.pt")
    (directory / "state.json").write_text(json.dumps(state))


def _restore(out: Path, peft_model, optimizer) -> dict | None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    checkpoints = sorted(p for p in out.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").is_file())
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    set_peft_model_state_dict(peft_model, load_file(str(latest / "adapter_model.safetensors")))
    saved = torch.load(latest / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    return json.loads((latest / "state.json").read_text())

