"""GRPO from the cache: G answers sampled per prompt, scored by rewards, the policy moved towards the
better ones of each group, as TRL's `GRPOTrainer` does it, with no tower run.

Data: any file `qprep train` reads; a record's turns before its first answer are the prompt, and the
record itself (its answer, the video's duration) is what the rewards (`qprep.train.rewards`) compare
against. Each optimizer step, before its first forward (`start_step`), as TRL generates for all the
step's accumulated batches at once:

1. rollouts: for each of this rank's prompts, G completions sampled from the cache by the current
   policy in eval mode without gradients (`qprep.train.rollout`), seeded by (seed, epoch, batch,
   prompt), so a resumed run or another rank count samples the same ones;
2. rewards: each named reward, their sum per completion; advantages within each group
   (`grpo_loss.group_advantages`);
3. the step's normaliser: its completions and completion tokens, summed over the ranks.

Then each batch's loss (`loss`): the completions' log-probabilities from a training forward with
gradients, the old policy's their detached values (one pass per batch, TRL's default; see below), the
reference's (with β > 0, first, without gradients) the same forward with the adapter disabled, or, in a
run started from an adapter (`--adapter`), with that adapter's weights in place of the LoRA's (TRL's
reference for a model that starts as a trained PEFT adapter: that adapter, frozen), and
`grpo_loss.policy_loss` with the whole step's counts, so that the parts on all ranks and batches sum to
the step's loss. Metrics per batch: each reward's mean and std under its name, `reward` (their sum)
and `reward_std` (the mean spread within a group), the completions' lengths, `kl` (β > 0) and the
clipped fractions. Rank 0 writes a few completions of each batch to `completions.jsonl`. Validation:
the mean summed reward of greedy answers to the held-out prompts (higher is better).

Sharded (`--shard`, FSDP2), each forward gathers weights from every rank, so the ranks roll out,
score and validate in step (`_rollouts`): as many prompts each, every decoding loop until all ranks'
are done; what fills a rank up is a stand-in, weighted 0 and in no sum. A sharded run draws, scores
and trains on the same completions as an unsharded one.

More passes (`num_iterations` μ > 1, TRL's): each step's rollouts train μ optimizer steps; their
log-probabilities under the policy that sampled them are computed once, before the first pass, and
each pass's ratio is taken against them (`start_step` with `iteration` > 0 hands the same groups out
again). The recipe moves its plan, and checkpoints, only after a step's last pass.

Not here: packing and a trained merger.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch

from qprep.errors import SettingsError
from qprep.schemas.training import TrainSettings
from qprep.train.data import IGNORE, Sample
from qprep.train.optim import StepShare

COMPLETIONS_LOGGED = 2  # completions of each batch written to completions.jsonl


@dataclass
class Prompt:
    text: str  # the rendered prompt, as the rewards receive it
    record: dict  # the record it came from, with the video's duration where the record gives none


@dataclass
class Group:
    """One prompt's rollouts: its G completions, their rewards and advantages."""

    prompt: int  # index into the samples
    completions: list[list[int]]
    texts: list[str]
    rewards: dict[str, list[float]]  # by reward name
    advantages: torch.Tensor  # [G]
    # False: a stand-in, rolled out so that sharded ranks run in step (`GRPOObjective._rollouts`); its
    # loss is weighted 0 and it is in no sum
    counted: bool = True
    # [G, C] the completions' log-probabilities under the policy that sampled them, before its first
    # update (with more than one pass over the rollouts; else each pass's own, detached)
    old_logps: torch.Tensor | None = None

    @property
    def total(self) -> list[float]:
        return [sum(values) for values in zip(*self.rewards.values())]


class GRPOObjective:
    """The `Objective` of `qprep train --method grpo`."""

    validation_metric = "val_reward"
    validation_higher_is_better = True
    reads_batches = False  # each part's rows are its prompts' rollouts, collated here

    def __init__(self, settings: TrainSettings):
        from qprep.train.rewards import resolve_rewards

        if settings.packing:
            raise SettingsError("--packing packs answers given in the data; GRPO samples its own: train it unpacked")
        if settings.train_merger != "none":
            raise SettingsError("--train-merger: GRPO trains the LoRA alone (its reference is the LoRA disabled, or "
                                "frozen at --adapter's weights); "
                                "train it from merged tokens, or from the merger's input with the merger frozen")
        self.settings, self.grpo = settings, settings.grpo
        self.iterations, self.iteration = settings.grpo.num_iterations, 0
        self.rewards = resolve_rewards(list(settings.grpo.rewards))
        self.samples: list[Sample] = []
        self.prompts: list[Prompt] = []
        self.skipped: dict[str, list[str]] = {}
        self.held_out: tuple[list[Sample], list[Prompt]] | None = None
        # by (epoch, batch): this rank's parts still to train on, all its groups (for the metrics), the
        # policy loss's metrics of its parts (summed, weighted by their tokens), the batch's completions
        # and completion tokens over all ranks
        self.parts: dict[tuple[int, int], list[list[Group]]] = {}
        self.rolled: dict[tuple[int, int], list[Group]] = {}
        self.rollouts: dict[tuple[int, int], list[list[Group]]] = {}  # every part's groups, for each later pass
        self.shares: list[StepShare] = []  # the step's, for each later pass
        self.loss_metrics: dict[tuple[int, int], dict[str, float]] = {}
        self.counts: dict[tuple[int, int], tuple[float, float]] = {}
        self.step_counts = (0.0, 0.0)  # the current step's completions and completion tokens, all ranks
        self.reference: dict[str, torch.Tensor] | None = None  # the starting adapter's LoRA weights, with β > 0
        self.completions_log = None
        self.attended = 0  # the tokens of the last part's policy forwards

    # -- data ----------------------------------------------------------------------------------

    def build(self, data_path, eval_data, checkpoint, cache, tokenizer, layout, echo) -> None:
        from qprep.train.data import load_records
        from qprep.train.infer import stop_ids

        self.cache, self.tokenizer, self.layout = cache, tokenizer, layout
        self.stop = stop_ids(checkpoint, tokenizer)
        self.samples, self.prompts, self.skipped = self._prompts(load_records(data_path))
        echo(_report(len(self.samples), self.skipped))
        if not self.samples:
            raise SettingsError(f"--data {data_path}: no prompt left to train on (the reasons are listed above); its "
                                f"ids must be the cache's ids (`qprep status {cache.store.location}` lists them)")
        if eval_data is None:
            if self.settings.eval_every or self.settings.save_best:
                raise SettingsError("--eval-every and --save-best need --eval-data (the held-out records)")
            return
        samples, prompts, skipped = self._prompts(load_records(eval_data))
        echo(f"validation: {_report(len(samples), skipped)}")
        if not samples:
            raise SettingsError(f"--eval-data {eval_data}: no prompt left to validate on (the reasons are listed "
                                f"above)")
        self.held_out = samples, prompts

    def _prompts(self, records) -> tuple[list[Sample], list[Prompt], dict[str, list[str]]]:
        """Each usable record's prompt sample and what its rewards read; the others by reason."""
        from qprep.train.data import messages, prompt_ids, record_id, record_media, unusable_media

        samples, prompts = [], []
        skipped = {reason: list(names) for reason, names in getattr(records, "skipped", {}).items()}
        ok, limit = set(self.cache.ids()), self.settings.max_length
        for index, record in enumerate(records):
            name, media = record_id(record, index), record_media(record)
            reason = unusable_media(media, self.cache, ok, self.layout.audio)
            rows = [] if reason else [self.cache.row(medium) for medium in media]
            record = _with_duration(record, rows)
            reason = reason or next(filter(None, (reward.problem(record) for reward in self.rewards)), None)
            try:
                conversation = [] if reason else messages(record["conversations"], [row.kind for row in rows])
            except SettingsError as exc:
                reason = f"bad conversation: {exc}"
            answers = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
            if not reason and not answers:
                reason = "no answer to score against"
            ids = [] if reason else prompt_ids(conversation[: answers[0]], rows, self.tokenizer, self.layout)
            if not reason and limit is not None and len(ids) > limit:
                reason = f"prompt longer than --max-length {limit}"
            if reason:
                skipped.setdefault(reason, []).append(name)
                continue
            text = self.tokenizer.apply_chat_template(conversation[: answers[0]], tokenize=False,
                                                      add_generation_prompt=True)
            samples.append(Sample(id=name, input_ids=ids, labels=[IGNORE] * len(ids), media=media,
                                  has_audio=self.layout.audio and any(row.has_audio for row in rows)))
            prompts.append(Prompt(text, record))
        return samples, prompts, skipped

    def start_from(self, weights: dict[str, torch.Tensor]) -> None:
        """With β > 0, the starting adapter's weights are the reference's (a run resumed keeps them too)."""
        if self.grpo.beta > 0:
            self.reference = weights

    # -- each step -----------------------------------------------------------------------------

    def start_step(self, batches: list, model, world, iteration: int) -> list[StepShare]:
        """This rank's rollouts of the whole step, their rewards and advantages; the step's completions and
        completion tokens over all ranks (the loss's normaliser). Each later pass (`iteration` > 0) trains
        on the first pass's rollouts again, as TRL's `num_iterations` does."""
        self.iteration = iteration
        if iteration > 0:
            for position in batches:
                key = (position.epoch, position.index)
                self.parts[key] = list(self.rollouts[key])
            return self.shares
        counts = torch.zeros(len(batches), 2, dtype=torch.float64)
        for row, position in enumerate(batches):
            parts = self._rollouts(model, position, world)
            if self.iterations > 1:
                self._old_logps(model, parts)
            groups = [group for part in parts for group in part if group.counted]
            key = (position.epoch, position.index)
            self.parts[key], self.rolled[key], self.rollouts[key] = list(parts), groups, parts
            counts[row, 0] = sum(len(group.completions) for group in groups)
            counts[row, 1] = sum(len(c) for group in groups for c in group.completions)
        world.sum(counts)
        for position, (sequences, tokens) in zip(batches, counts.tolist()):
            self.counts[position.epoch, position.index] = sequences, tokens
        self.step_counts = tuple(counts.sum(0).tolist())
        self.shares = [StepShare(len(batches), int(self.step_counts[1]), position is batches[-1])
                       for position in batches]
        return self.shares

    @torch.no_grad()
    def _old_logps(self, model, parts: list[list[Group]]) -> None:
        """Each group's completions' log-probabilities under the policy as it is before the passes, in
        the mode training runs in (TRL computes them so, without gradients, at generation)."""
        from qprep.train.rollout import completion_batch, completion_logps

        device = _device(model)
        for group in (group for part in parts for group in part):
            rows = completion_batch(self.samples[group.prompt], group.completions, self.cache, self.layout)
            group.old_logps = completion_logps(model, rows.to(device), max(map(len, group.completions)),
                                               self.grpo.temperature).cpu()

    def _rollouts(self, model, position, world) -> list[list[Group]]:
        """This rank's parts of batch `position`, each as its prompts' groups. Sharded (`--shard`), each
        forward is a collective, so the ranks roll out in step: as many parts on every rank (`deal`'s
        stand-in parts), each part as many prompts as that part's largest on any rank (a short one is
        topped up with its first prompt again), every sampling loop until all ranks' are done. What
        tops a rank up is a stand-in (`Group.counted` False); the counted rollouts are those an
        unsharded run draws, from the same seeded generators."""
        from qprep.train.distributed import deal

        lockstep = self.settings.shard
        parts = deal(position, self.settings.batch_size, world, even=lockstep)
        if not lockstep:
            return [[self._rollout(model, position, index) for index in part.samples] for part in parts]
        sizes = world.max(torch.tensor([len(part.samples) for part in parts], dtype=torch.float64)).tolist()
        return [[self._rollout(model, position, part.samples[j] if j < len(part.samples) else part.samples[0],
                               counted=part.counted and j < len(part.samples), all_done=world.all)
                 for j in range(int(size))]
                for part, size in zip(parts, sizes)]

    def _rollout(self, model, position, index: int, counted: bool = True, all_done=None) -> Group:
        """Prompt `index`'s G completions, sampled without gradients in eval mode, and their rewards
        (`all_done`: for ranks sampling in step)."""
        from qprep.train.data import collate
        from qprep.train.objectives.grpo_loss import group_advantages
        from qprep.train.rollout import media_tokens, rollout_generator, sample

        grpo, device = self.grpo, _device(model)
        batch = collate([self.samples[index]], self.cache, self.layout).to(device)
        generator = rollout_generator(self.settings.seed, position.epoch, position.index, index, device=device)
        was_training = model.training
        model.eval()
        try:
            completions = sample(model, batch, copies=grpo.num_generations, max_new_tokens=grpo.max_new_tokens,
                                 stop=self.stop, temperature=grpo.temperature, top_p=grpo.top_p, generator=generator,
                                 suppress=media_tokens(self.layout), all_done=all_done)
        finally:
            model.train(was_training)
        texts = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in completions]
        rewards = self._scores(self.prompts[index], texts)
        total = torch.tensor([sum(values) for values in zip(*rewards.values())], dtype=torch.float32)
        return Group(index, completions, texts, rewards, group_advantages(total, len(texts), grpo.scale_rewards),
                     counted)

    def _scores(self, prompt: Prompt, texts: list[str]) -> dict[str, list[float]]:
        """Each reward's scores of the completions of one prompt, by name."""
        count = len(texts)
        return {reward.name: reward([prompt.text] * count, texts, [prompt.record] * count) for reward in self.rewards}

    def attended_tokens(self, batch) -> int:
        return self.attended

    def loss(self, model, batch, position, share: StepShare, whole: bool) -> torch.Tensor:
        """This rank's next part of batch `position`: its groups' share of the step's policy loss (each
        group's prompt collated with its completions; `batch` is None: the recipe reads nothing for it)."""
        from qprep.train.objectives.grpo_loss import policy_loss
        from qprep.train.rollout import completion_batch, completion_logps, completion_mask, reference_logps

        grpo, device = self.grpo, _device(model)
        sequences, tokens = self.step_counts
        total, logged = None, self.loss_metrics.setdefault((position.epoch, position.index), {})
        groups = self.parts[position.epoch, position.index].pop(0)
        # each group's rows, kept on the host between the two forwards
        batches = [completion_batch(self.samples[group.prompt], group.completions, self.cache, self.layout)
                   for group in groups]
        widths = [max(map(len, group.completions)) for group in groups]
        self.attended = sum(int(rows.attention_mask.sum()) for group, rows in zip(groups, batches) if group.counted)
        # every reference before any policy forward: with --adapter, the reference's weights are put in the
        # LoRA's place, which no graph may hold then
        references = [reference_logps(model, rows.to(device), width, grpo.temperature, weights=self.reference)
                      if grpo.beta > 0 else None for rows, width in zip(batches, widths)]
        for group, rows, width, reference in zip(groups, batches, widths, references):
            rows = rows.to(device)
            logps = completion_logps(model, rows, width, grpo.temperature)
            old = group.old_logps.to(device) if group.old_logps is not None else logps.detach()
            part, metrics = policy_loss(logps, old, group.advantages.to(device),
                                        completion_mask(group.completions, device), loss_type=grpo.loss_type,
                                        epsilon_low=grpo.epsilon, epsilon_high=grpo.epsilon_high, beta=grpo.beta,
                                        ref_logps=reference, max_completion_length=grpo.max_new_tokens,
                                        num_items=tokens, num_sequences=int(sequences))
            if not group.counted:  # a stand-in: its forward and backward run, its gradients are zero
                part = part * 0.0
            total = part if total is None else total + part
            weight = metrics.pop("completion_tokens") if group.counted else 0.0
            for name, value in metrics.items():
                logged[name] = logged.get(name, 0.0) + value * weight
        return total

    def batch_loss(self, summed: float, position, share: StepShare) -> float:
        """The batch's own loss (as if it were the whole step) from its parts' shares."""
        sequences, tokens = self.counts[position.epoch, position.index]
        if self.grpo.loss_type == "dapo":
            return summed * self.step_counts[1] / max(tokens, 1.0)
        return summed * self.step_counts[0] / max(sequences, 1.0)

    def batch_metrics(self, position, step: int, world) -> dict:
        """The batch's rewards, completion lengths, KL and clipped fractions over all ranks (every rank
        calls it); rank 0 logs a few of its completions."""
        key = (position.epoch, position.index)
        last_pass = self.iteration + 1 == self.iterations
        groups = self.rolled.pop(key, []) if last_pass else self.rolled.get(key, [])
        loss_metrics = self.loss_metrics.pop(key, {})
        self.parts.pop(key, None)
        if last_pass:
            self.rollouts.pop(key, None)
        names = [reward.name for reward in self.rewards]
        sums = _Sums([f"{name}/{part}" for name in names + ["reward"] for part in ("sum", "squares")]
                     + ["group_std", "groups", "completions", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
                        "clip_ratio/region_mean"])  # every rank the same names, an idle one's at 0
        for group in groups:
            for name, values in [*group.rewards.items(), ("reward", group.total)]:
                values = torch.tensor(values, dtype=torch.float64)
                sums.add(f"{name}/sum", values.sum())
                sums.add(f"{name}/squares", (values ** 2).sum())
            sums.add("group_std", torch.tensor(group.total, dtype=torch.float64).std())
            sums.add("groups", 1)
            sums.add("completions", len(group.completions))
        for name in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            sums.add(name, loss_metrics.get(name, 0.0))
        lengths = [len(tokens) for group in groups for tokens in group.completions]
        longest = world.max(torch.tensor([max(lengths, default=0), -min(lengths, default=1 << 30)],
                                         dtype=torch.float64)).tolist()
        totals = sums.over(world)
        if world.main and self.iteration == 0:  # the rollouts, once
            self._log_completions(groups, position, step)
        tokens = (self.counts.pop(key) if last_pass else self.counts[key])[1]
        return self._batch_row(names, totals, tokens, longest)

    def _batch_row(self, names: list[str], totals: dict[str, float], tokens: float, longest: list[float]) -> dict:
        count = totals["completions"]
        row = {}
        for name in names + ["reward"]:
            mean = totals[f"{name}/sum"] / count
            spread = math.sqrt(max(totals[f"{name}/squares"] - count * mean ** 2, 0.0) / (count - 1)) if count > 1 else 0.0
            prefix = "reward" if name == "reward" else f"rewards/{name}"
            row[f"{prefix}/mean" if name != "reward" else "reward"] = mean
            if name != "reward":
                row[f"{prefix}/std"] = spread
        row["reward_std"] = totals["group_std"] / totals["groups"]  # TRL's: the mean spread within a group
        row.update({"completions/mean_length": tokens / count, "completions/max_length": longest[0],
                    "completions/min_length": -longest[1]})
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            row[name] = totals[name] / tokens
        if self.grpo.beta > 0:
            row["kl"] = totals["kl"] / tokens
        return row

    # -- validation ----------------------------------------------------------------------------

    @property
    def validates(self) -> bool:
        return self.held_out is not None

    def validate(self, model, device: str, autocast, world, even: bool) -> float:
        """The mean summed reward of greedy answers to the held-out prompts (each rank answers every
        size-th prompt; no random number is drawn, so training goes on as without it). `even` (sharded):
        the ranks decode in step, as many prompts each, a rank past the end answering its first one
        again uncounted."""
        from qprep.train.data import collate
        from qprep.train.infer import greedy
        from qprep.train.model import run_as_forward

        samples, prompts = self.held_out
        totals = torch.zeros(2, dtype=torch.float64)
        mine = list(range(world.rank, len(samples), world.size))
        rounds = -(-len(samples) // world.size) if even else len(mine)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast:
                for turn in range(rounds):
                    index = mine[turn] if turn < len(mine) else world.rank % len(samples)
                    batch = collate([samples[index]], self.cache, self.layout).to(device)
                    tokens = run_as_forward(model, lambda language_model: greedy(
                        language_model, batch, self.grpo.max_new_tokens, self.stop,
                        all_done=world.all if even else None))
                    if turn >= len(mine):
                        continue
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    totals[0] += sum(values[0] for values in self._scores(prompts[index], [text]).values())
                    totals[1] += 1
        finally:
            model.train(was_training)
        world.sum(totals)
        return float(totals[0] / totals[1])

    def validation_row(self, epoch: int, step: int, value: float, started: float) -> dict:
        return {"epoch": epoch, "step": step, "val_reward": value, "val_prompts": len(self.held_out[0]),
                "val_time_s": time.perf_counter() - started}

    # -- logs ----------------------------------------------------------------------------------

    def open_logs(self, folder, world, resumed_at: tuple[int, int] | None) -> None:
        """completions.jsonl (rank 0's): on resume, the lines of the batches past the checkpoint go (they
        run again)."""
        if not world.main:
            return
        path = folder.completions
        if path.is_file():
            lines = path.read_text().splitlines() if resumed_at is not None else []
            kept = [line for line in lines if tuple(json.loads(line)[k] for k in ("epoch", "batch")) < resumed_at]
            path.write_text("".join(line + "\n" for line in kept))
        self.completions_log = open(path, "a")

    def close_logs(self) -> None:
        if self.completions_log:
            self.completions_log.close()
            self.completions_log = None

    def _log_completions(self, groups: list[Group], position, step: int) -> None:
        if not self.completions_log or not groups:
            return
        group = groups[0]
        for i in range(min(COMPLETIONS_LOGGED, len(group.texts))):
            line = {"step": step, "epoch": position.epoch, "batch": position.index, "id": self.samples[group.prompt].id,
                    "completion": group.texts[i], "rewards": {name: values[i] for name, values in group.rewards.items()},
                    "advantage": float(group.advantages[i])}
            self.completions_log.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.completions_log.flush()


class _Sums:
    """Named sums, added up over the ranks in one all-reduce."""

    def __init__(self, names: list[str]):
        self.values = dict.fromkeys(names, 0.0)

    def add(self, name: str, value) -> None:
        self.values[name] += float(value)

    def over(self, world) -> dict[str, float]:
        names = sorted(self.values)
        summed = world.sum(torch.tensor([self.values[n] for n in names], dtype=torch.float64)).tolist()
        return dict(zip(names, summed))


def _with_duration(record: dict, rows: list) -> dict:
    """The record, with its one video's duration from the cache where the record gives none (rewards
    clip answers to it)."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    if "duration" in record or "duration" in meta or len(rows) != 1 or rows[0].duration is None:
        return record
    return {**record, "duration": rows[0].duration}


def _report(count: int, skipped: dict[str, list[str]]) -> str:
    from qprep.train.data import left_out_lines

    return "\n".join([f"{count} prompts"] + left_out_lines(skipped))


def _device(model) -> torch.device:
    return next(model.parameters()).device
