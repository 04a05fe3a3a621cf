"""`qprep train`: LoRA on the language model from a cache. No tower is built, no video decoded.

The optimizer step is the Trainer's (`qprep.train.optim`: its optimizer, parameter groups, schedule,
clipping and token-weighted accumulation); on GPU the forward runs under bf16 autocast with the
adapter and the optimizer state in float32, as the Trainer's `bf16=True`. Each epoch visits the samples in an order fixed by (seed, epoch), so a resumed run sees exactly
the batches an uninterrupted run would. Checkpoints (`checkpoint-<step>/`: the adapter in peft's
format, the optimizer and the position in the data) are written every `save_every` optimizer steps
and at the end of each epoch; the final adapter is `adapter/`. With held-out records, the
validation loss (`qprep.train.validation`) goes beside the training loss. Metrics go to
`metrics.jsonl` and to the experiment trackers asked for (`qprep.train.trackers`), the loss curves to
`loss.png` (`qprep.train.plot`), the effective settings and the cache's content key to `run.json`:
`--resume` refuses a run whose settings, data or cache changed since. Data-parallel runs (`--gpus`, `--cpu-ranks`,
torchrun, Ray Train) run this same loop in every rank (`qprep.train.distributed`): rank 0 alone
writes, and the plan is dealt over the ranks by global batch.
"""

from __future__ import annotations

import json
import os
import pickle  # for its error type only: nothing here unpickles
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qprep.errors import SettingsError
from qprep.schemas.dtypes import compute_dtype
from qprep.schemas.training import TrainSettings
from qprep.train.optim import build_optimizer, build_scheduler, clip, step_shares, steps_in_run
from qprep.train.run_folder import RunFolder, state_file, trainer_file
from qprep.train.sharding import full_optimizer_state, load_full_optimizer_state, save_adapter, shard
from qprep.train.trackers import Trackers, check as check_trackers, chosen
from qprep.train.validation import Validation, best_so_far, keep_best, validation_row

# How often a resumed run saves; every other setting decides what it computes (the number of epochs
# too: the learning-rate schedule spans the whole run).
# None changes the training; batch_size is per rank: a resumed run keeps the run's global batch
CHANGEABLE_ON_RESUME = frozenset({"save_every", "eval_every", "save_best", "batch_size", "report_to"})


@dataclass
class TrainSummary:
    samples: int
    skipped: dict
    steps: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    last_val_loss: float | None = None
    best_val_loss: float | None = None  # with save_best: the loss of best-adapter/


def train(cache_path: str | Path, data_path: str | Path, model: str, out: str | Path,
          settings: TrainSettings = TrainSettings(), *, resume: bool = False, device: str | None = None,
          eval_data: str | Path | None = None, ranks: int = 1, ray_address: str | None = None,
          ray_restarts: int = 2, progress: bool = True, echo=print) -> TrainSummary | None:
    """Train LoRA on the language model from the cache; with `eval_data` (records as `data_path`'s),
    the validation loss every `settings.eval_every` optimizer steps and at each epoch's end.

    `ranks` > 1 starts that many data-parallel processes on this machine (one per GPU with
    `device="cuda"`, gloo ranks on CPU); a process started by torchrun or Ray Train joins its
    process group by itself (`qprep.train.distributed`). Rank 0 returns the summary, the other
    ranks None."""
    from qprep.train.distributed import launch, launch_on_ray

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # a tracker asked for and not installed, or MLflow's store unreachable: refused before any rank starts
    trackers = chosen(settings.report_to)
    if os.environ.get("RANK", "0") == "0":  # torchrun starts every rank here: rank 0 alone will report
        check_trackers(trackers, RunFolder(Path(out)))
    if ray_address:
        summary = launch_on_ray(ray_address, ranks, device, str(RunFolder(Path(out)).ray_storage), ray_restarts, _rank_main,
                                cache_path, data_path, model, out, settings, resume, eval_data, progress)
        return TrainSummary(**summary)
    if ranks > 1 and "WORLD_SIZE" not in os.environ:
        if device == "cuda" and torch.cuda.device_count() < ranks:
            raise SettingsError(f"--gpus {ranks}: this machine has {torch.cuda.device_count()} GPUs")
        from qprep.models.checkpoint import open_checkpoint

        open_checkpoint(model).require_tokenizer()  # once, before the ranks start, rather than from each
        return launch(ranks, device, _rank_main, cache_path, data_path, model, out, settings, resume, eval_data,
                      progress)
    return _train(cache_path, data_path, model, out, settings, resume=resume, device=device, eval_data=eval_data,
                  progress=progress, echo=echo)


def _rank_main(device, cache_path, data_path, model, out, settings, resume, eval_data, progress, *,
               restarted: bool = False, reporter=None) -> TrainSummary | None:
    """One launched rank (a top-level function: the launcher starts it in a fresh process). Its
    error, if any, goes to the launcher (torch's `record`), which names it with the rank. Under Ray
    Train, a restarted attempt resumes from the checkpoints the last one wrote."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_train)(cache_path, data_path, model, out, settings, resume=resume or restarted, device=device,
                          eval_data=eval_data, progress=progress, echo=print, reporter=reporter)


def _train(cache_path, data_path, model, out, settings: TrainSettings, *, resume: bool, device: str, eval_data,
           progress: bool, echo, reporter=None) -> TrainSummary | None:
    from tqdm.auto import tqdm

    from qprep.models.checkpoint import open_checkpoint
    from qprep.store.reader import open_cache
    from qprep.train.data import build_dataset, load_records
    from qprep.train.distributed import deal, join_world, leave_world, rank_device
    from qprep.train.loader import PlannedBatch, batch_stream, batches_per_epoch, first_fit_packs, plan, plan_packed
    from qprep.train.lora import apply_lora
    from qprep.train.model import LanguageModel
    from qprep.train.optim import label_tokens

    started = time.perf_counter()
    world = join_world(device)
    device = rank_device(device, world)
    echo = echo if world.main else (lambda _: None)
    checkpoint = open_checkpoint(model)
    checkpoint.require_tokenizer()  # before the run folder is made
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(out)
    dtype = settings.dtype or compute_dtype(device)
    cache = open_cache(cache_path)
    check_cache_fits(cache, checkpoint)
    tokenizer = checkpoint.tokenizer()
    layout = checkpoint.family.prompt_layout(checkpoint, tokenizer)
    dataset = build_dataset(load_records(data_path), cache, tokenizer, layout, max_length=settings.max_length,
                            cut=settings.cut_to_max_length)
    echo(dataset.report())
    if not dataset.samples:
        raise SettingsError(f"--data {data_path}: no sample left to train on (the reasons are listed above); its ids "
                            f"must be the cache's video ids (`qprep status {cache.store.location}` lists them)")
    validation = _validation(eval_data, cache, tokenizer, layout, settings, echo)
    identity = _run_identity(settings, cache, dataset, checkpoint, data_path)
    # the global batch is the run's: a run resumed on another number of ranks deals the same batches
    check_packing(settings, checkpoint)
    if settings.shard and world.size == 1:
        raise SettingsError("--shard shards the model over the ranks: start two or more (--gpus N, --cpu-ranks N, "
                            "torchrun --nproc-per-node N)")
    global_batch = _saved_global_batch(folder) if resume else None  # samples, or packed rows with packing
    identity["global_batch"] = global_batch or (1 if settings.packing else settings.batch_size) * world.size
    if resume and world.main:
        _check_resumable(folder, identity)
    if world.main:
        _write_json(folder.run_file, identity)
    global_batch = identity["global_batch"]

    torch.manual_seed(settings.seed)
    language_model = LanguageModel(checkpoint, dtype=dtype, device=device,
                                   attn_implementation=settings.attn_implementation, packing=settings.packing)
    if settings.gradient_checkpointing:
        language_model.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})  # reentrant breaks with injected embeddings
    peft_model = apply_lora(language_model, settings.lora)
    latest = folder.complete_checkpoints()[-1:] if resume else []
    if latest:
        _restore_adapter(latest[0], peft_model)
    if settings.shard:
        shard(peft_model, device, world)
    optimizer = build_optimizer(peft_model, settings)
    packs = first_fit_packs(dataset.samples, settings.seed, settings.max_length) if settings.packing else None
    per_epoch = -(-len(packs) // global_batch) if packs else batches_per_epoch(dataset.samples, global_batch)
    scheduler = build_scheduler(optimizer, settings, steps_in_run(settings, per_epoch))
    state = {"epoch": 0, "batch": 0, "step": 0}
    if latest:
        state = _restore_trainer(latest[0], peft_model, optimizer, scheduler, settings.shard)
        logged = state.pop("metrics_bytes", None)
        if world.main and logged is not None:
            folder.keep_metrics_up_to(logged)  # the rows past the checkpoint are logged again as they re-run

    start = (state["epoch"], state["batch"])
    planned = (plan_packed(packs, seed=settings.seed, packs_per_batch=global_batch, epochs=settings.epochs, start=start)
               if packs else plan(dataset.samples, seed=settings.seed, batch_size=global_batch, epochs=settings.epochs,
                                  start=start))
    shares = step_shares(planned, dataset.samples, settings.grad_accum, per_epoch)
    # this rank's parts of each global batch, read ahead in plan order
    parts = {(p.epoch, p.index): deal(p, settings.batch_size, world, even=settings.shard) for p in planned}
    mine = [PlannedBatch(p.epoch, p.index, part.samples, packed=packs is not None)
            for p in planned for part in parts[p.epoch, p.index]]
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda") and dtype == "bfloat16")
    workers = settings.workers if settings.workers is not None else (2 if device.startswith("cuda") else 0)
    stream = batch_stream(mine, dataset.samples, cache, layout, workers=workers, pin_memory=device.startswith("cuda"))
    metrics = open(folder.metrics, "a") if world.main else None
    bar = tqdm(total=settings.epochs * per_epoch, initial=state["epoch"] * per_epoch + state["batch"],
               desc="train", unit="batch", disable=not progress or not world.main)
    first_loss = last_loss = val_loss = None
    best_val = best_so_far(folder) if resume else None
    step_loss = 0.0
    peft_model.train()
    trackers = Trackers([])  # rank 0's
    try:
        if world.main:
            trackers = Trackers.open(chosen(settings.report_to), folder, identity["settings"],
                                     resumed=bool(latest))
            for where in trackers.where():
                echo(f"reporting to {where}")
        for position in planned:
            tick = time.perf_counter()
            share = shares[position.epoch, position.index]
            batch_tokens = sum(label_tokens(dataset.samples[i].labels) for i in position.samples)
            whole = len(parts[position.epoch, position.index]) == 1 and world.size == 1  # one part, one process
            # [this batch's part of the step loss, attention tokens, seconds waiting for data], summed over ranks
            totals = torch.zeros(3, dtype=torch.float64)
            for part in parts[position.epoch, position.index]:
                waiting = time.perf_counter()
                _, batch = _next_batch(stream, cache)
                batch = batch.to(device, non_blocking=True)
                totals[2] += time.perf_counter() - waiting
                with autocast:
                    loss = _step_part_loss(peft_model, batch, share, settings.loss_weighting, batch_tokens, whole)
                if not part.counted:  # a stand-in: its forward and backward run, its gradients are zero
                    loss = loss * 0.0
                loss.backward()
                if part.counted:
                    totals[0] += float(loss.detach())
                    totals[1] += int(batch.attention_mask.sum())
            reducing = time.perf_counter()
            world.sum(totals)
            part = float(totals[0])
            step_loss += part
            last_loss = _batch_mean(part, share, batch_tokens, settings.loss_weighting)
            first_loss = last_loss if first_loss is None else first_loss
            epoch_end = position.index + 1 == per_epoch
            row = {"epoch": position.epoch, "batch": position.index, "step": state["step"], "loss": last_loss}
            if share.last:
                if not settings.shard:  # sharded, the backward summed them (reduce-scatter)
                    world.sum_gradients(trainable)
                row["allreduce_s"] = time.perf_counter() - reducing  # the ranks' sums, waiting included
                lr = optimizer.param_groups[0]["lr"]
                grad_norm = clip(trainable, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                row.update(step=state["step"], step_loss=step_loss, lr=lr, grad_norm=grad_norm)
                step_loss = 0.0
            state.update(epoch=position.epoch, batch=position.index + 1)
            elapsed = time.perf_counter() - tick
            if metrics:
                _log(metrics, trackers, {**row, "tokens_per_s": float(totals[1]) / elapsed, "step_time_s": elapsed,
                                         "data_wait_s": float(totals[2]) / world.size, **peak_memory_mb(device)})
            if validation and (epoch_end or (share.last and settings.eval_every
                                              and state["step"] % settings.eval_every == 0)):
                tick = time.perf_counter()
                val_loss = validation.loss(peft_model, device, autocast, world, even=settings.shard)
                if metrics:
                    _log(metrics, trackers, validation_row(position.epoch, state["step"], val_loss,
                                                           validation.label_tokens, tick))
                if settings.save_best and (best_val is None or val_loss < best_val):
                    best_val = val_loss
                    keep_best(folder, peft_model, state["step"], val_loss, world, settings.shard)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", epoch=position.epoch,
                            **({"val": f"{val_loss:.4f}"} if val_loss is not None else {}))
            if epoch_end:
                state.update(epoch=position.epoch + 1, batch=0)
            if epoch_end or (share.last and settings.save_every and state["step"] % settings.save_every == 0):
                _save(folder, peft_model, optimizer, scheduler, state, world, settings.shard, metrics)
                if reporter:
                    reporter.checkpoint(folder.checkpoint(state["step"]), world, {"step": state["step"], "loss": last_loss})
                if cache.changed_on_disk():
                    raise _cache_changed(cache)
        save_adapter(peft_model, folder.adapter, world, settings.shard)
        if world.main:
            metrics.close()  # complete before the picture reads it
            from qprep.train.plot import plot_loss

            plot_loss(folder.metrics, folder.loss_plot)
        world.barrier()  # the adapter is on disk before any rank returns
    finally:
        bar.close()
        if metrics:
            metrics.close()
        trackers.close()
        leave_world(world)
    summary = TrainSummary(samples=len(dataset.samples), skipped=dataset.skipped, steps=state["step"],
                           first_loss=first_loss, last_loss=last_loss, seconds=time.perf_counter() - started,
                           last_val_loss=val_loss, best_val_loss=best_val) if world.main else None  # rank 0 reports
    if reporter:
        reporter.finish(summary, world, folder.adapter)
    return summary


def check_packing(settings: TrainSettings, checkpoint) -> None:
    if not settings.packing:
        return
    if not settings.max_length:
        raise SettingsError("--packing needs --max-length: the tokens a packed row holds")
    if settings.batch_size != 1:
        raise SettingsError("--packing fills one row per batch up to --max-length; leave --batch-size at 1")
    if not checkpoint.family.isolates_packed_samples:
        raise SettingsError(f"--packing: {checkpoint.family.name}'s transformers implementation cannot keep packed "
                            f"samples apart (its linear-attention layers scan the whole row); train it unpacked")


def _saved_global_batch(folder: RunFolder) -> int | None:
    path = folder.run_file
    return json.loads(path.read_text()).get("global_batch") if path.is_file() else None


def _validation(eval_data, cache, tokenizer, layout, settings: TrainSettings, echo):
    """The held-out samples (reported as the training ones are), or None without --eval-data."""
    from qprep.train.data import build_dataset, load_records

    if eval_data is None:
        if settings.eval_every or settings.save_best:
            raise SettingsError("--eval-every and --save-best need --eval-data (the held-out records)")
        return None
    held_out = build_dataset(load_records(eval_data), cache, tokenizer, layout, max_length=settings.max_length,
                             cut=settings.cut_to_max_length)
    echo(f"validation: {held_out.report()}")
    if not held_out.samples:
        raise SettingsError(f"--eval-data {eval_data}: no sample left to validate on (the reasons are listed above)")
    return Validation.build(held_out.samples, cache, layout, settings.batch_size)


def _step_part_loss(model, batch, share, weighting: str, batch_tokens: int, whole: bool) -> torch.Tensor:
    """This part's share of its optimizer step's loss (over all parts and ranks, they sum to the
    step's loss). `whole`: the part is its whole batch, on one process."""
    if weighting == "tokens":
        return model(batch, num_items_in_batch=share.label_tokens)[0]
    if whole:  # the batch's own mean, as the Trainer takes it
        return model(batch)[0] / share.batches
    return model(batch, num_items_in_batch=batch_tokens)[0] / share.batches


def _batch_mean(part: float, share, batch_tokens: int, weighting: str) -> float:
    """The batch's own mean loss, for the curve (the step's loss is what the optimizer follows)."""
    if weighting == "batches":
        return part * share.batches
    return part * share.label_tokens / max(batch_tokens, 1)


def _next_batch(stream, cache):
    """The next (PlannedBatch, Batch), or None at the end; a store re-extracted under the run is named as such."""
    try:
        return next(stream)
    except StopIteration:
        return None
    except Exception as exc:
        if cache.changed_on_disk():
            raise _cache_changed(cache) from exc
        raise


def _cache_changed(cache) -> SettingsError:
    return SettingsError(f"the cache {cache.store.root} changed while training (re-extracted?); the checkpoints "
                         f"written so far are kept; start a new run (new --out) on the new cache")


def _run_identity(settings: TrainSettings, cache, dataset, checkpoint, data_path) -> dict:
    """What decides a run's result: its settings, the cache's content, the samples and the model."""
    import hashlib

    values = settings.to_dict()
    values.pop("workers")  # the order and the batches do not depend on it
    # a sample's media are named only where they are not its one video `id` (runs of one video per
    # sample keep the identity they had, so they resume)
    samples = hashlib.sha256(json.dumps([[s.id, s.input_ids, s.labels] + ([list(s.media)] if s.media != (s.id,) else [])
                                         for s in dataset.samples]).encode())
    return {"settings": values, "cache": str(cache.store.root), "cache_content": cache.content_key,
            "data": str(data_path), "samples": samples.hexdigest()[:16], "model": checkpoint.source}


def _check_resumable(folder: RunFolder, identity: dict) -> None:
    out, saved_path = folder.root, folder.run_file
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    identity = json.loads(json.dumps(identity, default=str))  # tuples as the file holds them
    same = ("cache_content", "samples", "model")
    changed = [k for k in same if saved.get(k) != identity[k]]
    changed += [f"settings.{k}" for k, value in identity["settings"].items()
                if k not in CHANGEABLE_ON_RESUME and saved["settings"].get(k) != value]
    if changed:
        what = ", ".join(changed)
        hint = " (the cache was re-extracted since)" if "cache_content" in changed else ""
        raise SettingsError(f"--resume: {out} was trained with a different {what}{hint}; use a new --out")


def _write_json(path: Path, value) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=2, default=str))
    os.replace(temporary, path)


def check_cache_fits(cache, checkpoint) -> None:
    family = cache.config["model"]["family"]
    if family != checkpoint.family.name or cache.hidden_size != checkpoint.hidden_size:
        raise SettingsError(f"the cache holds {family} tokens of width {cache.hidden_size}; --model "
                            f"{checkpoint.source} is {checkpoint.family.name} of width {checkpoint.hidden_size}; "
                            f"pass the model the cache was extracted with ({cache.model})")


def _log(metrics, trackers: Trackers, row: dict) -> None:
    """One metrics row, to metrics.jsonl and to the trackers."""
    metrics.write(json.dumps(row) + "\n")
    trackers.log(row)


def memory_metric(device: str | torch.device) -> str:
    """The name of the peak memory a metrics row records, for what it measures: on a GPU (`cuda`, a
    rank's `cuda:N`) the tensors torch allocated on that device, elsewhere the process's resident memory."""
    return "cuda_peak_memory_mb" if torch.device(device).type == "cuda" else "host_peak_rss_mb"


def peak_memory_mb(device: str | torch.device) -> dict[str, float]:
    """{memory_metric(device): the peak so far, in MiB}."""
    name = memory_metric(device)
    if name == "cuda_peak_memory_mb":
        return {name: torch.cuda.max_memory_allocated(torch.device(device)) / 2**20}
    import resource

    return {name: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _save(folder: RunFolder, peft_model, optimizer, scheduler, state: dict, world, sharded: bool, metrics) -> None:
    """Checkpoint (every rank calls it: sharded, the adapter and the optimizer state are gathered; rank 0
    writes). The metrics rows so far reach the disk with it: a rank 0 killed later loses none of them."""
    directory = folder.checkpoint(state["step"])
    save_adapter(peft_model, directory, world, sharded)
    gathered = full_optimizer_state(peft_model, optimizer) if sharded else None  # a collective
    if not world.main:
        return
    optimizer_state = gathered if sharded else optimizer.state_dict()
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
               trainer_file(directory))
    metrics.flush()
    os.fsync(metrics.fileno())
    # Last and in one step: --resume takes only checkpoints with a state.json, so one killed while
    # being written is skipped, never half-read.
    _write_json(state_file(directory), {**state, "metrics_bytes": metrics.tell()})


def load_trainer_state(path: Path) -> dict:
    """A checkpoint's optimizer and RNG state: tensors and plain values only, never unpickled objects."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only raises on anything else
        raise SettingsError(f"--resume: {path} holds objects other than tensors, so it was not written by "
                            f"qprep train and is not loaded; remove its checkpoint folder to resume from an "
                            f"earlier one") from exc


def _restore_adapter(checkpoint: Path, peft_model) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(checkpoint / "adapter_model.safetensors")))


def _restore_trainer(checkpoint: Path, peft_model, optimizer, scheduler, sharded: bool) -> dict:
    """The optimizer, schedule and RNG state of `checkpoint`; its position in the plan."""
    saved = load_trainer_state(trainer_file(checkpoint))
    if sharded:
        load_full_optimizer_state(peft_model, optimizer, saved["optimizer"])
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    return json.loads(state_file(checkpoint).read_text())
