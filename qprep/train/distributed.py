"""Data-parallel training: one process per GPU (or per CPU rank), the same recipe in each.

Three ways in, one recipe (`qprep.train.loop.train`):

* `qprep train --gpus N` (or `--cpu-ranks N`, gloo on CPU) starts N processes on this machine
  through torch's own elastic launcher (`torch.distributed.launcher.elastic_launch`, what
  `torchrun --standalone` runs);
* `torchrun --nproc-per-node N -m qprep train ...`: the launcher's environment (`WORLD_SIZE`,
  `RANK`, `LOCAL_RANK`, `MASTER_ADDR`) is read and the process group joined;
* `qprep train --ray-address auto --gpus N`: N workers of Ray Train's `TorchTrainer` on the Ray
  cluster `qprep extract` uses, one GPU each; Ray Train sets up the same process group, and
  restarts the workers from the last checkpoint if one dies (`--ray-restarts`).

How the work is dealt. The batch plan stays a function of (seed, epoch): each global batch of
`global_batch` samples (the per-rank batch × the rank count the run started with, kept in
`run.json`) is cut into parts of at most `batch_size` samples, and the parts go to the ranks in
turn. An optimizer step sums every part's loss over all ranks (token-weighted by the label tokens of
the whole step) and all-reduces the adapter's gradients as one flat buffer, so every rank takes the
same optimizer step. A rank left without a part (an epoch's short last batch) contributes zero
gradients. Resuming with another rank count deals the same global batches over the new ranks:
the global order is what was saved.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import torch

from qprep.errors import RankFailed

@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process set the process group up (not Ray Train): it tears it down

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics, the adapter and the picture."""
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks (in place; a no-op alone)."""
        return self._all_reduce(values, torch.distributed.ReduceOp.SUM)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """`values`' largest over the ranks (in place; a no-op alone)."""
        return self._all_reduce(values, torch.distributed.ReduceOp.MAX)

    def _all_reduce(self, values: torch.Tensor, op) -> torch.Tensor:
        if self.size == 1:
            return values
        if values.device.type == "cpu" and "gloo" not in str(torch.distributed.get_backend()):
            # NCCL reduces CUDA tensors only, and a group set up elsewhere (Ray Train's) may have no
            # CPU backend beside it: the sum goes through this rank's GPU
            moved = values.to(torch.device("cuda", torch.cuda.current_device()))
            torch.distributed.all_reduce(moved, op=op)
            return values.copy_(moved)
        torch.distributed.all_reduce(values, op=op)
        return values

    def all(self, true: bool) -> bool:
        """Whether `true` holds on every rank (a collective: every rank asks)."""
        return not bool(self.max(torch.tensor([0.0 if true else 1.0], dtype=torch.float64))[0])

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Every rank's gradients summed into each rank's, through one flat buffer."""
        if self.size == 1:
            return
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in parameters])
        self.sum(flat)
        offset = 0
        for p in parameters:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


def join_world(device: str) -> World:
    """The process group the launcher set up the environment for (alone when there is none)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not torch.distributed.is_initialized()
    if owns:
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_rank)
        # on GPUs, NCCL for CUDA tensors (gradients, FSDP2's gathers) and gloo beside it for the CPU
        # tensors of the step's sums (losses, counts): NCCL alone refuses a CPU tensor
        torch.distributed.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank, owns_group=owns)


def leave_world(world: World) -> None:
    if world.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank_device(device: str, world: World) -> str:
    return f"cuda:{world.local_rank}" if device == "cuda" and world.size > 1 else device


@dataclass(frozen=True)
class Part:
    """A rank's part of one global batch: its samples (a packed row, or at most the per-rank batch)."""

    samples: tuple[int, ...]
    # False: a stand-in (another part of the same batch, its loss weighted 0), so that with sharded
    # weights every rank runs as many forwards as the others (`qprep.train.sharding`)
    counted: bool = True


def deal(planned, part_size: int, world: World, even: bool = False) -> list[Part]:
    """This rank's parts of one global batch (a `PlannedBatch`): its packed rows, or the batch cut
    into parts of at most `part_size` samples, dealt to the ranks in turn. `even`: as many parts on
    every rank, the short ones topped up with stand-ins."""
    samples = planned.samples
    parts = list(planned.rows) if planned.rows else [samples[i:i + part_size] for i in range(0, len(samples), part_size)]
    mine = [Part(part) for part in parts[world.rank::world.size]]
    if even:
        mine += [Part(parts[0], counted=False)] * (-(-len(parts) // world.size) - len(mine))
    return mine


def launch(processes: int, device: str, entrypoint, *args):
    """Run `entrypoint(*args)` in `processes` local ranks through torch's elastic launcher; the
    return value of rank 0. A rank that fails ends the run with a `RankFailed` naming it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                          start_method="spawn")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    try:
        results = elastic_launch(config, entrypoint)(device, *args)
    except ChildFailedError as exc:
        raise RankFailed(_failure_message(exc)) from None
    return results[0]


def _failure_message(exc) -> str:
    lines = []
    for rank, failure in sorted(exc.failures.items()):
        cause = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        if failure.signal_name() not in ("", "<N/A>"):
            cause = f"killed by {failure.signal_name()}"
        elif not cause:
            cause = f"exit code {failure.exitcode}"
        lines.append(f"rank {rank} failed: {cause.strip().splitlines()[-1] if cause.strip() else cause}")
    return "training stopped: " + "; ".join(lines) + " (the checkpoints written so far are kept; --resume continues)"


class RayReporter:
    """What a Ray Train worker tells Ray Train: each checkpoint rank 0 wrote (so that a restarted
    run resumes from it) and, at the end, rank 0's summary."""

    def checkpoint(self, directory, world: World, metrics: dict) -> None:
        import ray.train

        saved = ray.train.Checkpoint.from_directory(str(directory)) if world.main else None
        ray.train.report(metrics, checkpoint=saved)  # every rank calls it: a collective

    def finish(self, summary, world: World, adapter) -> None:
        import dataclasses

        import ray.train

        saved = ray.train.Checkpoint.from_directory(str(adapter)) if world.main else None
        ray.train.report(dataclasses.asdict(summary) if summary else {}, checkpoint=saved)


def launch_on_ray(address: str, processes: int, device: str, storage: str, restarts: int, entrypoint, *args) -> dict:
    """Run `entrypoint(device, *args, restarted=..., reporter=...)` on `processes` Ray Train workers
    (`restarted`: an earlier attempt of the run saved a checkpoint); rank 0's summary (as a dict)."""
    import logging

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from qprep.extraction.cluster import quiet_ray_notices

    if not ray.is_initialized():
        quiet_ray_notices()
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    trainer = TorchTrainer(_RayWorker(entrypoint, device, args),
                           scaling_config=ScalingConfig(num_workers=processes, use_gpu=device == "cuda"),
                           run_config=RunConfig(name=f"qprep-train-{uuid.uuid4().hex[:8]}", storage_path=storage,
                                                failure_config=FailureConfig(max_failures=restarts)))
    result = trainer.fit()
    if result.error is not None:
        raise RankFailed(f"training stopped on Ray: {str(result.error).strip().splitlines()[-1]} (the checkpoints "
                         f"written so far are kept; --resume continues)")
    return result.metrics or {}


class _RayWorker:
    """The function each Ray Train worker runs (a picklable object: Ray ships it to the workers)."""

    def __init__(self, entrypoint, device, args):
        self.entrypoint, self.device, self.args = entrypoint, device, args

    def __call__(self):
        import ray.train

        restarted = ray.train.get_checkpoint() is not None  # a previous attempt of this run saved one
        return self.entrypoint(self.device, *self.args, restarted=restarted, reporter=RayReporter())
