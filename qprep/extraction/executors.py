"""Who runs the two stages of an extraction: Ray Data, or this process.

Both take the same videos through the same functions (`stages.prepare_video`, then
`stages.TowerStage`) and hand the writer the same `Encoded` rows, so a store is byte-for-byte the same
whichever ran it; the writer, the commit protocol and the failure rows are shared.

* `ray`: a Ray Data graph (`cluster.tower_dataset`): CPU tasks over the cluster's CPUs, one tower
  actor per GPU. For clusters, several GPUs, and plans large enough that starting Ray and a
  worker per core (each importing torch) is small beside the work.
* `local`: no Ray. A pool of CPU-stage processes on this machine (one per core, each started
  once) and the towers in this process, fed as the prepared videos come back. A worker process
  that dies (a decoder crash, an out-of-memory kill) is replaced; the videos it may have held are
  tried again one at a time, so that a video that kills its worker on each of its
  `CPU_STAGE_TRIES` is recorded failed (`worker_died`) and no other video pays for it.
* `auto` (the default): `ray` when a cluster is named (`--ray-address`, RAY_ADDRESS) or this
  process already runs Ray, or the plan is larger than `LOCAL_MAX_VIDEOS`; `local` otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from qprep.errors import WORKER_DIED, ExtractError
from qprep.extraction.discover import VideoFile
from qprep.extraction.rows import Encoded, Prepared
from qprep.extraction.stages import CPU_STAGE_TRIES, TOWER_BATCH_TRIES, TowerStage, prepare_video

# Plans up to this many videos run in-process under `auto` (bench/extract.py measures the crossover)
LOCAL_MAX_VIDEOS = 256


def choose(executor: str, ray_address: str | None, videos: int) -> str:
    """The executor `executor` ("auto", "local" or "ray") means for a plan of `videos` videos."""
    if executor != "auto":
        return executor
    if ray_address or os.environ.get("RAY_ADDRESS") or _ray_running() or videos > LOCAL_MAX_VIDEOS:
        return "ray"
    return "local"


def _ray_running() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def run_on_ray(tasks: list[VideoFile], job, options) -> Iterator[Encoded]:
    """The Ray Data graph's rows, as they come, then a failed row for each video whose CPU-stage
    task or tower batch failed on every try (Ray leaves those out and goes on).

    A tower batch whose actor died on each of its tries loses all its videos, though one of them
    alone may crash the towers: with batches of several videos, the videos lost after reaching the
    towers go through the graph once more one video a batch, so that only the video at fault is
    lost. A video whose CPU stage died on every try is not tried again."""
    from qprep.extraction.cluster import ray_session, start_arrivals, tower_dataset

    with ray_session(options.ray_address) as resources:
        import ray

        device = options.device or ("cuda" if resources.get("GPU", 0) >= 1 else "cpu")
        arrivals, todo = start_arrivals(), tasks
        for batch_size in dict.fromkeys((options.batch_size, 1)):  # the run's batches, then one a batch
            arrived: set[str] = set()
            graph = tower_dataset(todo, job, device, dataclasses.replace(options, batch_size=batch_size), resources,
                                  arrivals)
            for row in graph.iter_rows():
                encoded = Encoded.from_ray(row)
                arrived.add(encoded.row.id)
                yield encoded
            reached = ray.get(arrivals.take.remote())
            lost = [video for video in todo if video.id not in arrived]
            yield from (Encoded(_died(video).row) for video in lost if video.id not in reached)
            todo = [video for video in lost if video.id in reached]
            if not todo:
                return
        yield from (Encoded(_crashed_the_towers(video).row) for video in todo)


def run_locally(tasks: list[VideoFile], job, options) -> Iterator[Encoded]:
    """The CPU stage in a pool of processes, the towers here, one video at a time as it is prepared.

    The workers start, and take their first videos, while the towers load here: the two are
    independent, and loading a released checkpoint's towers (reading their weights, starting CUDA,
    moving them to the GPU) takes seconds that the other cores would otherwise spend idle."""
    start_worker_server()
    pool = _CpuPool(tasks, workers=min(usable_cores(), len(tasks)), job=job)
    starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qprep-start-workers")
    starting = starter.submit(pool.start)
    starter.shutdown(wait=False)  # the start runs on in its thread; `starting` says when it is done
    try:
        towers = _load_towers(job, options)
        starting.result()
        for batch in tower_batches(pool.results(), options.budget.image_rows):
            yield from towers.encode(batch)
    finally:
        starting.exception()  # wait for the start to end (its error, if any, surfaced above or is moot)
        pool.close()


def tower_batches(results, image_rows: int) -> Iterator[list]:
    """The prepared media in tower batches: one each, or with fixed-shape image calls (`image_rows`),
    consecutive images up to that many patch rows (their tokens do not depend on which share a call,
    so any grouping writes the same bytes)."""
    pending, rows = [], 0
    for prepared in results:
        size = prepared.patches.shape[0]
        packable = image_rows and prepared.ok and prepared.row.kind == "image" and size <= image_rows
        if pending and (not packable or rows + size > image_rows):
            yield pending
            pending, rows = [], 0
        if not packable:
            yield [prepared]
            continue
        pending.append(prepared)
        rows += size
    if pending:
        yield pending


def _load_towers(job, options) -> TowerStage:
    import torch

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return TowerStage(model=job.model, revision=job.revision, spec=job.spec, dtype=job.dtype, device=device,
                      attn_implementation=job.attn_implementation, budget=options.budget, threads=options.tower_threads,
                      level=job.level)


class _CpuPool:
    """CPU-stage worker processes, replaced when one dies, and the tries each video has had."""

    def __init__(self, tasks: list[VideoFile], workers: int, job):
        self.workers, self.job = max(1, workers), job
        self.waiting = collections.deque(tasks)
        self.suspects: collections.deque[VideoFile] = collections.deque()  # in flight when a worker died
        self.tries: collections.Counter[str] = collections.Counter()
        self.running: dict = {}  # future → video
        self.pool = None

    def start(self) -> None:
        """Start the workers and hand them their first videos (this waits for the worker server's
        imports, so `run_locally` calls it in a thread of its own)."""
        from concurrent.futures.process import BrokenProcessPool

        self.pool = self._start()
        try:
            self.pool.submit(os.getpid).result()  # a bare call: do the workers start at all?
        except BrokenProcessPool:
            raise ExtractError("the CPU-stage worker processes could not start; a script that calls qprep's "
                               "extract needs an `if __name__ == \"__main__\":` guard, as any script that starts "
                               "processes does (or --executor ray)") from None
        self._fill()

    def results(self) -> Iterator[Prepared]:
        """Each video's CPU-stage row (a failed row for one that killed its worker on every try), in
        the order they finish."""
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        while self.running:
            done, _ = wait(list(self.running), return_when=FIRST_COMPLETED)
            broken = []
            for future in done:
                video = self.running.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    broken.append(video)
            if broken:  # the pool went down with every task in it: each may be the cause
                broken += list(self.running.values())
                self.running.clear()
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None
                for video in broken:
                    self.tries[video.id] += 1
                    if self.tries[video.id] >= CPU_STAGE_TRIES:
                        yield _died(video)
                    else:
                        self.suspects.append(video)
            self._fill()

    def _fill(self) -> None:
        """Keep the workers busy (two tasks each, so none waits for the driver); a suspect runs alone:
        if its worker dies again, it is the cause."""
        if self.pool is None:
            self.pool = self._start()
        if self.suspects:
            if not self.running:
                self._submit(self.suspects.popleft())
            return
        while self.waiting and len(self.running) < 2 * self.workers:
            self._submit(self.waiting.popleft())

    def _start(self):
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=self.workers, mp_context=_worker_context(), initializer=_follow_driver,
                                   initargs=(os.getpid(),))

    def _submit(self, video: VideoFile) -> None:
        future = self.pool.submit(prepare_video, video, videos_dir=self.job.videos_dir, settings=self.job.settings,
                                  spec=self.job.spec)
        self.running[future] = video

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _worker_context():
    """Workers fork from a fresh server process that imported the CPU stage (torch, PyAV) once, so
    each starts in milliseconds; not from this process, whose torch threads and CUDA state a fork
    would copy."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["qprep.pipeline.prepare", "qprep.extraction.executors"])
    return context


def start_worker_server() -> None:
    """Start the server the CPU-stage workers fork from, without waiting for it: its imports (a few
    seconds: torch, PyAV) run beside whatever this process does next, and the first worker waits
    only for what is left of them. Starting it again is a no-op."""
    import multiprocessing.forkserver

    _worker_context()
    multiprocessing.forkserver.ensure_running()


def _follow_driver(driver: int) -> None:
    """In each worker: exit when the driver has gone (killed with SIGKILL, say). A pool's workers
    hold both ends of their task queue, so they would otherwise wait for tasks forever, keeping the
    driver's output pipes open."""
    import threading
    import time

    def watch() -> None:
        while _alive(driver):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="qprep-follow-driver", daemon=True).start()


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): whether the pid exists at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, within a container's CPU quota (cgroup v2
    `cpu.max`), not the host's count, which a pod of 4 CPUs on a 64-core host would otherwise get."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as limit:
            quota, period = limit.read().split()[:2]
    except (OSError, ValueError):
        return max(1, cores)
    if quota != "max":
        cores = min(cores, max(1, int(int(quota) // int(period))))
    return max(1, cores)


def _crashed_the_towers(video: VideoFile) -> Prepared:
    """The row of a video whose tower actor died on every try of a batch of it alone (Ray)."""
    return _lost(video, f"the tower actor died on all {TOWER_BATCH_TRIES} tries of a batch of it alone (a crash in "
                        f"the towers, or killed for memory; Ray's log above has the error)")


def _died(video: VideoFile) -> Prepared:
    """The CPU-stage row of a video whose worker process died on every try."""
    return _lost(video, f"the worker preparing it died on all {CPU_STAGE_TRIES} tries (a crash in the decoder, or "
                        f"killed for memory)")


def _lost(video: VideoFile, cause: str) -> Prepared:
    lost = Prepared.empty(video)
    lost.row.fail(f"{cause}; the next run tries it again", WORKER_DIED)
    return lost
