"""Ray: which cluster to use, and the Ray Data graph of an extraction.

By default a local Ray starts in-process and stops with the run; `--ray-address` (or RAY_ADDRESS)
joins an existing cluster instead, and a Ray already initialized in this process (a notebook, the
test session) is used as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator

from qprep.extraction.discover import VideoFile
from qprep.extraction.rows import video_item
from qprep.extraction.stages import CPU_STAGE_TRIES, TOWER_BATCH_TRIES, TowerStage, cpu_stage


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[dict]:
    """Yields the cluster's resources (CPU, GPU counts)."""
    import ray

    owned = not ray.is_initialized()
    if owned:
        quiet_ray_notices()
        address = address or os.environ.get("RAY_ADDRESS") or None
        # No address: a Ray of this run's own ("local"); Ray's default would join a cluster that
        # `ray start` left on this machine.
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=address is None, configure_logging=True)
    _configure_ray_data()
    try:
        yield dict(ray.cluster_resources())
    finally:
        if owned:
            ray.shutdown()


class TowerArrivals:
    """The videos that reached a tower actor since the last `take`. Ray leaves out a video whose
    CPU-stage task or tower batch failed on every try; this tells the two apart: a video lost with
    a tower batch of several is worth a try in a batch of its own, one whose CPU stage died is not."""

    def __init__(self):
        self.ids: set[str] = set()

    def add(self, ids: list[str]) -> None:
        self.ids.update(ids)

    def take(self) -> set[str]:
        taken, self.ids = self.ids, set()
        return taken


def start_arrivals():
    """A `TowerArrivals` actor on the driver's node (it lives and dies with the run)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(TowerArrivals).remote()


def tower_dataset(tasks: list[VideoFile], job, device: str, options, resources: dict, arrivals=None):
    """tasks → CPU stage (one task per video) → tower actors → rows for the writer (streamed). The
    actors report each batch's videos to `arrivals` (a `TowerArrivals` actor) as it comes in."""
    import ray.data

    items = [video_item(task) for task in tasks]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    # Ray Data retries a task whose worker died forever by default: one video that crashes FFmpeg
    # or exhausts memory would stall the run. After CPU_STAGE_TRIES it is that video's fault.
    # (max_retries has no named parameter yet; Ray warns that the generic ones go in 2.64.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        dataset = dataset.map(cpu_stage, fn_kwargs={"videos_dir": job.videos_dir, "settings": job.settings,
                                                    "spec": job.spec}, num_cpus=1, max_retries=CPU_STAGE_TRIES - 1)
    if device == "cpu":
        # Without GPUs the tower actor shares the CPUs with the decoding tasks instead of
        # reserving one: both cores stay busy whichever stage is the bottleneck.
        # Its torch threads follow the cores of its own node, as the local executor's follow this
        # machine's: the same counts on the same machine, so the same bits (`TowerThreads`).
        actors, actor_resources = 1, {"num_cpus": 0}
    else:
        actors, actor_resources = max(1, int(resources.get("GPU", 1))), {"num_gpus": 1, "num_cpus": 1}
    constructor = dict(model=job.model, revision=job.revision, spec=job.spec, dtype=job.dtype, device=device,
                       attn_implementation=job.attn_implementation, budget=options.budget,
                       threads=options.tower_threads, arrivals=arrivals, level=job.level)
    # The actor is restarted as often as it dies; each batch is tried TOWER_BATCH_TRIES times. One
    # batch at a time on an actor: a batch queued behind one that kills it would die with it on each
    # try and be recorded failed for a video that is not its own.
    strategy = ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return dataset.map_batches(TowerStage, fn_constructor_kwargs=constructor, batch_size=options.batch_size,
                                   batch_format="numpy", compute=strategy,
                                   max_restarts=-1, max_task_retries=TOWER_BATCH_TRIES - 1, **actor_resources)


def quiet_ray_notices() -> None:
    """Ray's notice that a local cluster enables token authentication (a WARNING on every start)
    is about Ray's own defaults, not this run; Ray's warnings and errors otherwise still show."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def _configure_ray_data() -> None:
    """qprep draws its own progress bar and summary; Ray Data's would interleave with them. A task
    that still fails after its retries (a video whose worker process dies on every try) loses only
    its own video, which the run records as failed; Ray Data would otherwise abort the whole run."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.max_errored_blocks = -1
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
