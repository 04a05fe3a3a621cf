"""`qprep train`: LoRA on the language model from a cache. No tower is built, no video decoded.

Training is one recipe (`Recipe`) that reads as the procedure: `setup` (the ranks, the run folder,
the cache, the objective's data, the model with LoRA, the optimizer and schedule, the plan of
batches, all restored from the last checkpoint with `--resume`), `train` (for each optimizer step:
each batch's forward, loss and backward, the optimizer step, a metrics row per batch; validation and
checkpoints when due; the final adapter), `cleanup`. The LoRA starts fresh, or from a trained
adapter's weights with `--adapter` (`qprep.train.checkpoints.StartingAdapter`). What differs between
objectives (the data, each step's loss normaliser, the loss, validation) is the objective's
(`qprep.train.objectives`):
supervised fine-tuning (`qprep.train.objectives.sft`), or with `--method grpo` reinforcement from
sampled answers (`qprep.train.objectives.grpo`).

The optimizer step is the Trainer's (`qprep.train.optim`: its optimizer, parameter groups, schedule,
clipping and token-weighted accumulation); on GPU the forward runs under bf16 autocast with the
adapter and the optimizer state in float32, as the Trainer's `bf16=True`. Each epoch visits the
samples in an order fixed by (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted run would. Checkpoints (`qprep.train.checkpoints`: the adapter in peft's format, the
optimizer and the position in the data) are written every `save_every` optimizer steps and at the
end of each epoch; the final adapter is `adapter/`. With held-out records, the validation loss
(`qprep.train.validation`) goes beside the training loss. Metrics go to `metrics.jsonl` and to the
experiment trackers asked for (`qprep.train.trackers`), the loss curves to `loss.png`
(`qprep.train.plot`), the effective settings and the cache's content key to `run.json`: `--resume`
refuses a run whose settings, data or cache changed since (`qprep.train.run_folder`). Data-parallel
runs (`--gpus`, `--cpu-ranks`, torchrun, Ray Train) run this same recipe in every rank
(`qprep.train.distributed`): rank 0 alone writes, and the plan is dealt over the ranks by global batch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qprep.errors import LossNotFinite, SettingsError
from qprep.schemas.dtypes import compute_dtype
from qprep.schemas.metrics import metrics_json
from qprep.schemas.training import TrainSettings
from qprep.train.checkpoints import (StartingAdapter, latest_checkpoint, lora_weights, restore_adapter,
                                     restore_trainer, save_checkpoint)
from qprep.train.checkpoints import load_trainer_state  # noqa: F401 (its callers import it from here)
from qprep.train.objectives import Objective
from qprep.train.objectives.sft import SupervisedObjective
from qprep.train.optim import build_optimizer, build_scheduler, clip, optimizer_steps, steps_in_run
from qprep.train.run_folder import RunFolder, check_resumable, run_identity, saved_global_batch, write_json
from qprep.train.sharding import save_adapter, shard
from qprep.train.trackers import Trackers, check as check_trackers, chosen
from qprep.train.validation import best_so_far, keep_best

# The name the recipe writes a checkpoint through, looked up at each checkpoint (a test wraps it to act
# between two checkpoints).
_save = save_checkpoint


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
    """This rank's run of the recipe with the objective `settings.method` names."""
    recipe = Recipe(objective_for(settings), settings, device=device, progress=progress, echo=echo,
                    reporter=reporter)
    return recipe.run(cache_path, data_path, model, out, resume=resume, eval_data=eval_data)


class Recipe:
    """One rank's training run: `setup`, `train`, `cleanup` (`run` does the three in turn). The
    objective decides the data and the loss; the rest is the same for every objective. `reporter`:
    Ray Train's, told of each checkpoint and of the summary."""

    def __init__(self, objective: Objective, settings: TrainSettings, *, device: str, progress: bool = True,
                 echo=print, reporter=None):
        self.objective, self.settings = objective, settings
        self.device, self.progress, self.echo, self.reporter = device, progress, echo, reporter

    def run(self, cache_path, data_path, model, out, *, resume: bool = False, eval_data=None) -> TrainSummary | None:
        """The whole run; rank 0's summary (None on the other ranks)."""
        self.setup(cache_path, data_path, model, out, resume=resume, eval_data=eval_data)
        try:
            self.train()
        finally:
            self.cleanup()
        summary = self.summary()
        if self.reporter:
            self.reporter.finish(summary, self.world, self.folder.adapter)
        return summary

    # -- setup ---------------------------------------------------------------------------------

    def setup(self, cache_path, data_path, model, out, *, resume: bool = False, eval_data=None) -> None:
        """Everything before the first step; with `resume`, from the last complete checkpoint on."""
        self.started = time.perf_counter()
        self._join_world()
        self._open_inputs(cache_path, model, out)
        self.objective.build(data_path, eval_data, self.checkpoint, self.cache, self.tokenizer, self.layout, self.echo)
        self._record_run(data_path, resume)
        self._build_model(resume)
        self.optimizer = build_optimizer(self.peft_model, self.settings)
        self.trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.packs, self.per_epoch = self._epoch_shape()
        self.scheduler = build_scheduler(self.optimizer, self.settings,
                                         steps_in_run(self.settings, self.per_epoch) * self.objective.iterations)
        self.state = self._restore_trainer() if self.resumed_from else {"epoch": 0, "batch": 0, "step": 0}
        self._plan()
        self._open_outputs(resume)

    def _join_world(self) -> None:
        from qprep.train.distributed import join_world, rank_device

        self.world = join_world(self.device)
        self.device = rank_device(self.device, self.world)
        if not self.world.main:
            self.echo = lambda _: None  # rank 0 alone speaks

    def _open_inputs(self, cache_path, model, out) -> None:
        """The checkpoint (its tokenizer and prompt layout), the run folder and the cache."""
        from qprep.models.checkpoint import open_checkpoint
        from qprep.store.reader import open_cache
        from qprep.train.merger import check_merger_trainable

        self.checkpoint = open_checkpoint(model)
        self.checkpoint.require_tokenizer()  # before the run folder is made
        self.start = (StartingAdapter.check(self.settings.adapter, self.settings, self.checkpoint.family.lora_targets)
                      if self.settings.adapter else None)
        Path(out).mkdir(parents=True, exist_ok=True)
        self.folder = RunFolder(Path(out))
        self.dtype = self.settings.dtype or compute_dtype(self.device)
        self.cache = open_cache(cache_path)
        check_cache_fits(self.cache, self.checkpoint)
        check_merger_trainable(self.settings.train_merger, self.cache)  # before the run folder holds anything
        self.tokenizer = self.checkpoint.tokenizer()
        self.layout = self.checkpoint.family.prompt_layout(self.checkpoint, self.tokenizer)

    def _record_run(self, data_path, resume: bool) -> None:
        """run.json: what decides the run's result (a resumed run is checked against it) and its global batch."""
        settings, world = self.settings, self.world
        identity = run_identity(settings, self.cache, self.objective.samples, self.checkpoint, data_path)
        if self.start:
            identity["adapter"] = self.start.identity()
        check_packing(settings, self.checkpoint)
        if settings.shard and world.size == 1:
            raise SettingsError("--shard shards the model over the ranks: start two or more (--gpus N, --cpu-ranks N, "
                                "torchrun --nproc-per-node N)")
        # the global batch (samples, or packed rows with packing) is the run's: a run resumed on another
        # number of ranks deals the same batches
        saved = saved_global_batch(self.folder) if resume else None
        identity["global_batch"] = saved or (1 if settings.packing else settings.batch_size) * world.size
        if resume and world.main:
            check_resumable(self.folder, identity)
        if world.main:
            write_json(self.folder.run_file, identity)
        self.identity, self.global_batch = identity, identity["global_batch"]

    def _build_model(self, resume: bool) -> None:
        """The language model with LoRA (from --adapter's weights where given, the last checkpoint's with
        `resume`), sharded with --shard. The objective sees the starting adapter before any checkpoint's
        weights replace it (GRPO's reference)."""
        from qprep.schemas.towers import MERGER_INPUT
        from qprep.train.lora import apply_lora
        from qprep.train.merger import train_merger
        from qprep.train.model import LanguageModel

        settings = self.settings
        torch.manual_seed(settings.seed)  # the LoRA weights' initial values, then the dropout's draws
        language_model = LanguageModel(self.checkpoint, dtype=self.dtype, device=self.device,
                                       attn_implementation=settings.attn_implementation, packing=settings.packing,
                                       merger=self.cache.level == MERGER_INPUT)
        if settings.gradient_checkpointing:
            language_model.language_model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})  # reentrant breaks with injected embeddings
        self.peft_model = apply_lora(language_model, settings.lora)
        train_merger(self.peft_model, settings.train_merger)
        if self.start:
            self.start.load(self.peft_model)
            self.objective.start_from(lora_weights(self.peft_model))
        self.resumed_from = latest_checkpoint(self.folder) if resume else None
        if self.resumed_from:
            restore_adapter(self.resumed_from, self.peft_model)  # before sharding cuts the weights up
        if settings.shard:
            shard(self.peft_model, self.device, self.world)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                       enabled=self.device.startswith("cuda") and self.dtype == "bfloat16")

    def _epoch_shape(self) -> tuple[list | None, int]:
        """The packed rows (with --packing, else None) and the global batches in an epoch."""
        from qprep.train.loader import batches_per_epoch, first_fit_packs

        settings, samples = self.settings, self.objective.samples
        packs = first_fit_packs(samples, settings.seed, settings.max_length) if settings.packing else None
        per_epoch = -(-len(packs) // self.global_batch) if packs else batches_per_epoch(samples, self.global_batch)
        return packs, per_epoch

    def _restore_trainer(self) -> dict:
        """The optimizer, schedule and RNG of the checkpoint resumed from; its position in the plan."""
        state = restore_trainer(self.resumed_from, self.peft_model, self.optimizer, self.scheduler, self.settings.shard)
        logged = state.pop("metrics_bytes", None)
        if self.world.main and logged is not None:
            self.folder.keep_metrics_up_to(logged)  # the rows past the checkpoint are logged again as they re-run
        return state

    def _plan(self) -> None:
        """The optimizer steps left, each global batch's parts for this rank, and the stream reading them ahead."""
        from qprep.train.distributed import deal
        from qprep.train.loader import PlannedBatch, batch_stream, plan, plan_packed

        settings, samples = self.settings, self.objective.samples
        start = (self.state["epoch"], self.state["batch"])
        planned = (plan_packed(self.packs, seed=settings.seed, packs_per_batch=self.global_batch,
                               epochs=settings.epochs, start=start)
                   if self.packs else plan(samples, seed=settings.seed, batch_size=self.global_batch,
                                           epochs=settings.epochs, start=start))
        self.steps = optimizer_steps(planned, settings.grad_accum, self.per_epoch)
        self.parts = {(p.epoch, p.index): deal(p, settings.batch_size, self.world, even=settings.shard)
                      for p in planned}
        mine = [PlannedBatch(p.epoch, p.index, part.samples, packed=self.packs is not None)
                for p in planned for part in self.parts[p.epoch, p.index]]
        cuda = self.device.startswith("cuda")
        workers = settings.workers if settings.workers is not None else (2 if cuda else 0)
        self.stream = (batch_stream(mine, samples, self.cache, self.layout, workers=workers, pin_memory=cuda)
                       if self.objective.reads_batches else None)

    def _open_outputs(self, resume: bool) -> None:
        """metrics.jsonl (rank 0's), the progress bar, and the numbers the summary reports."""
        from tqdm.auto import tqdm

        main, state = self.world.main, self.state
        self.metrics = open(self.folder.metrics, "a") if main else None
        passes = self.objective.iterations
        self.bar = tqdm(total=self.settings.epochs * self.per_epoch * passes,
                        initial=(state["epoch"] * self.per_epoch + state["batch"]) * passes, desc="train", unit="batch",
                        disable=not self.progress or not main)
        self.first_loss = self.last_loss = self.val_loss = None
        self.best_val = best_so_far(self.folder) if resume else None
        self.step_loss = 0.0
        self.objective.open_logs(self.folder, self.world,
                                 (state["epoch"], state["batch"]) if self.resumed_from else None)
        self.peft_model.train()
        self.trackers = Trackers([])  # rank 0's, opened as training starts

    # -- train ---------------------------------------------------------------------------------

    def train(self) -> None:
        """Every optimizer step of the plan, then the final adapter."""
        self._start_reporting()
        for batches in self.steps:
            for iteration in range(self.objective.iterations):  # an optimizer step each
                shares = self.objective.start_step(batches, self.peft_model, self.world, iteration)
                for position, share in zip(batches, shares):
                    self._train_batch(position, share, iteration)
        self._save_final()

    def _start_reporting(self) -> None:
        if not self.world.main:
            return
        self.trackers = Trackers.open(chosen(self.settings.report_to), self.folder, self.identity["settings"],
                                      resumed=self.resumed_from is not None)
        for where in self.trackers.where():
            self.echo(f"reporting to {where}")

    def _train_batch(self, position, share, iteration: int = 0) -> None:
        """One global batch (`position`: a `PlannedBatch`) in pass `iteration` over its step: forward and
        backward, the optimizer step after its step's last batch, its metrics row; then validation and a
        checkpoint when they are due. The plan moves past a batch, and a checkpoint is written, only in its
        last pass: a resumed run starts at a step's first pass."""
        settings, state = self.settings, self.state
        passed = iteration + 1 == self.objective.iterations
        tick = time.perf_counter()
        totals, reducing = self._forward_backward(position, share)
        self._check_finite(float(totals[0]), position)
        self.step_loss += float(totals[0])
        self.last_loss = self.objective.batch_loss(float(totals[0]), position, share)
        self.first_loss = self.last_loss if self.first_loss is None else self.first_loss
        row = {"epoch": position.epoch, "batch": position.index, "step": state["step"], "loss": self.last_loss}
        if self.objective.iterations > 1:
            row["iteration"] = iteration
        if share.last:
            row.update(self._optimizer_step(reducing))
        row.update(self.objective.batch_metrics(position, row["step"], self.world))  # every rank: they sum
        if passed:
            state.update(epoch=position.epoch, batch=position.index + 1)
        elapsed = time.perf_counter() - tick
        if self.metrics:
            self._log({**row, "tokens_per_s": float(totals[1]) / elapsed, "step_time_s": elapsed,
                       "data_wait_s": float(totals[2]) / self.world.size, **peak_memory_mb(self.device)})
        epoch_end = passed and position.index + 1 == self.per_epoch  # always a step's last batch
        if self.objective.validates and (epoch_end or (share.last and self._every(settings.eval_every))):
            self.validate(position.epoch)
        self._show_progress(position)
        if epoch_end:
            state.update(epoch=position.epoch + 1, batch=0)
        if epoch_end or (passed and share.last and self._every(settings.save_every)):
            self.save_checkpoint()

    def _forward_backward(self, position, share) -> tuple[torch.Tensor, float]:
        """This rank's parts of the batch: forward, loss, backward. [the parts' losses, their attention
        tokens, seconds waiting for data] summed over the ranks, and when that sum began."""
        parts = self.parts[position.epoch, position.index]
        whole = len(parts) == 1 and self.world.size == 1  # one part, one process
        totals = torch.zeros(3, dtype=torch.float64)
        for part in parts:
            waiting = time.perf_counter()
            batch = self._next_batch().to(self.device, non_blocking=True) if self.stream is not None else None
            totals[2] += time.perf_counter() - waiting
            with self.autocast:
                loss = self.objective.loss(self.peft_model, batch, position, share, whole)
            if not part.counted:  # a stand-in: its forward and backward run, its gradients are zero
                loss = loss * 0.0
            loss.backward()
            if part.counted:
                totals[0] += float(loss.detach())
                totals[1] += self.objective.attended_tokens(batch)
        reducing = time.perf_counter()
        self.world.sum(totals)
        return totals, reducing

    def _check_finite(self, loss: float, position) -> None:
        """Stop at a loss that is not a number, before the optimizer step. Writing it as null and going
        on would not help: its gradients are NaN too, and one optimizer step with them makes every
        LoRA weight NaN, so each later step would be wasted. Every rank holds the same summed loss
        and stops at the same batch. The checkpoints written so far are untouched."""
        if math.isfinite(loss):
            return
        names = [self.objective.samples[i].id for i in position.samples]
        raise LossNotFinite(
            f"the loss is {loss} at optimizer step {self.state['step'] + 1} (epoch {position.epoch}, batch "
            f"{position.index}; samples {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}): training "
            f"stopped before applying it; lower --lr, or look at these samples, then --resume from the last "
            f"checkpoint in {self.folder.root}")

    def _next_batch(self):
        """This rank's next batch from the stream; a store re-extracted under the run is named as such."""
        try:
            _, batch = next(self.stream)
        except Exception as exc:
            if self.cache.changed_on_disk():
                raise _cache_changed(self.cache) from exc
            raise
        return batch

    def _optimizer_step(self, reducing: float) -> dict:
        """The gradients summed over the ranks, clipped, and the optimizer and schedule stepped; the
        step's metrics (`reducing`: when the ranks' sums began)."""
        if not self.settings.shard:  # sharded, the backward summed them (reduce-scatter)
            self.world.sum_gradients(self.trainable)
        allreduce_s = time.perf_counter() - reducing  # the ranks' sums, waiting included
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = clip(self.trainable, self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        metrics = {"allreduce_s": allreduce_s, "step": self.state["step"], "step_loss": self.step_loss, "lr": lr,
                   "grad_norm": grad_norm}
        self.step_loss = 0.0
        return metrics

    def _every(self, steps: int) -> bool:
        """Whether the optimizer step just taken is a multiple of `steps` (0: never)."""
        return bool(steps) and self.state["step"] % steps == 0

    def validate(self, epoch: int) -> None:
        """The objective's validation, logged; with --save-best, the adapter kept when it is the best so far."""
        settings, step = self.settings, self.state["step"]
        started = time.perf_counter()
        self.val_loss = self.objective.validate(self.peft_model, self.device, self.autocast, self.world,
                                                even=settings.shard)
        if self.metrics:
            self._log(self.objective.validation_row(epoch, step, self.val_loss, started))
        better = self.best_val is None or self._better(self.val_loss, self.best_val)
        if settings.save_best and math.isfinite(self.val_loss) and better:  # a NaN is never the best
            self.best_val = self.val_loss
            keep_best(self.folder, self.peft_model, step, self.val_loss, self.world, settings.shard,
                      self.objective.validation_metric)

    def _better(self, value: float, best: float) -> bool:
        return value > best if self.objective.validation_higher_is_better else value < best

    def _show_progress(self, position) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}", epoch=position.epoch,
                             **({"val": f"{self.val_loss:.4f}"} if self.val_loss is not None else {}))

    def _log(self, row: dict) -> None:
        """One metrics row, to metrics.jsonl and to the trackers (rank 0)."""
        self.metrics.write(metrics_json(row, warn=lambda text: self.echo(f"step {row['step']}: {text}")) + "\n")
        self.trackers.log(row)

    def save_checkpoint(self) -> None:
        """`checkpoint-<step>/` (every rank takes part), told to Ray Train; a cache re-extracted under the
        run stops it here, its checkpoints kept."""
        step = self.state["step"]
        _save(self.folder, self.peft_model, self.optimizer, self.scheduler, self.state, self.world, self.settings.shard,
              self.metrics)
        if self.reporter:
            self.reporter.checkpoint(self.folder.checkpoint(step), self.world, {"step": step, "loss": self.last_loss})
        if self.cache.changed_on_disk():
            raise _cache_changed(self.cache)

    def _save_final(self) -> None:
        """adapter/ and, on rank 0, loss.png."""
        save_adapter(self.peft_model, self.folder.adapter, self.world, self.settings.shard)
        if self.world.main:
            self.metrics.close()  # complete before the picture reads it
            from qprep.train.plot import plot_loss

            plot_loss(self.folder.metrics, self.folder.loss_plot)
        self.world.barrier()  # the adapter is on disk before any rank returns

    # -- cleanup -------------------------------------------------------------------------------

    def cleanup(self) -> None:
        from qprep.train.distributed import leave_world

        self.bar.close()
        self.objective.close_logs()
        if self.metrics:
            self.metrics.close()
        self.trackers.close()
        leave_world(self.world)

    def summary(self) -> TrainSummary | None:
        """Rank 0's summary of the run; None on the other ranks."""
        if not self.world.main:
            return None
        return TrainSummary(samples=len(self.objective.samples), skipped=self.objective.skipped,
                            steps=self.state["step"], first_loss=self.first_loss, last_loss=self.last_loss,
                            seconds=time.perf_counter() - self.started, last_val_loss=self.val_loss,
                            best_val_loss=self.best_val)


def objective_for(settings: TrainSettings) -> Objective:
    """The objective `settings.method` names."""
    if settings.method == "grpo":
        from qprep.train.objectives.grpo import GRPOObjective

        return GRPOObjective(settings)
    return SupervisedObjective(settings)


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


def _cache_changed(cache) -> SettingsError:
    return SettingsError(f"the cache {cache.store.root} changed while training (re-extracted?); the checkpoints "
                         f"written so far are kept; start a new run (new --out) on the new cache")


def check_cache_fits(cache, checkpoint) -> None:
    family = cache.config["model"]["family"]
    if family != checkpoint.family.name or cache.hidden_size != checkpoint.hidden_size:
        raise SettingsError(f"the cache holds {family} tokens of width {cache.hidden_size}; --model "
                            f"{checkpoint.source} is {checkpoint.family.name} of width {checkpoint.hidden_size}; "
                            f"pass the model the cache was extracted with ({cache.model})")


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
