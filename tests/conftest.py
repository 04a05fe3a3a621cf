"""Shared fixtures: synthetic videos and tiny checkpoints made once per session, and one Ray."""

from __future__ import annotations

import logging

import pytest

from qprep.synth import VideoSpec, make_video


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """`videos(name, **spec)` → path of a synthetic video, encoded once per session."""
    root = tmp_path_factory.mktemp("videos")
    made: dict[str, object] = {}

    def get(name: str, **spec):
        if name not in made:
            made[name] = make_video(root / name, VideoSpec(**spec))
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(kind)` → directory of a tiny random checkpoint saved by transformers, weights split
    over several safetensors files with an index, as the real releases are."""
    from qprep.models.tiny import make_tiny_model

    made: dict[str, object] = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = make_tiny_model(kind, tmp_path_factory.mktemp(kind), max_shard_size="4MB")
        return made[kind]

    return get


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (qprep uses an already initialized Ray as it is)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()
