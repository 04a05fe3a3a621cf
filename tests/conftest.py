"""Shared fixtures: synthetic videos encoded once per test session."""

from __future__ import annotations

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
