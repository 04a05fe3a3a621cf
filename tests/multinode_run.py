"""Run one extraction on a several-node Ray cluster on this machine, and report where the work ran.

Used by tests/test_cluster.py in a subprocess of its own (a process holds one Ray driver). The
head node has no CPUs, so every CPU-stage task has to run on the worker nodes. Where work ran is
observed from outside, as an operator would see it: Ray names a worker process `ray::<task>` while
it runs a task, and each worker is a child of its node's raylet.
Usage: python multinode_run.py VIDEOS STORE MODEL FPS NODES → JSON on stdout.
"""

from __future__ import annotations

import json
import logging
import sys
import threading

import psutil
import ray
from ray.cluster_utils import Cluster


class Observer(threading.Thread):
    """Polls the machine's processes: which node's workers ran which qprep stage."""

    def __init__(self, raylets: dict[int, str]):
        super().__init__(daemon=True)
        self.raylets, self.seen, self.stop = raylets, {}, threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            for process in psutil.process_iter(["cmdline", "ppid"]):
                title = " ".join(process.info["cmdline"] or ())
                node = self.raylets.get(process.info["ppid"])
                if node is None or not title.startswith("ray::"):
                    continue
                for stage in ("cpu_stage", "TowerStage"):
                    if stage in title:
                        self.seen.setdefault(stage, set()).add(node)


def main(videos: str, store: str, model: str, fps: str, nodes: str) -> None:
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.schemas.settings import VideoSettings

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(int(nodes))]
    cluster.wait_for_nodes()
    raylets = {node.all_processes["raylet"][0].process.pid: node.unique_id for node in workers}
    raylets[cluster.head_node.all_processes["raylet"][0].process.pid] = cluster.head_node.unique_id
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    observer = Observer(raylets)
    observer.start()
    summary = extract(videos, store, model, VideoSettings(fps=float(fps)), shards=4,
                      options=ExtractOptions(progress=False))
    observer.stop.set()
    observer.join()
    cpu_nodes, tower_nodes = observer.seen.get("cpu_stage", set()), observer.seen.get("TowerStage", set())
    print(json.dumps({"extracted": summary.extracted, "failed": summary.failed, "nodes": len(ray.nodes()),
                      "cpu_stage_nodes": len(cpu_nodes), "tower_nodes": len(tower_nodes),
                      "cpu_stage_on_head": cluster.head_node.unique_id in cpu_nodes}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
