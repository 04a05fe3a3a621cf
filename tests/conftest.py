"""Shared fixtures: synthetic videos and tiny checkpoints made once per session, and one Ray."""

from __future__ import annotations

import logging
import os

import pytest

from qprep.synth import VideoSpec, make_video


# Markers follow from what a test needs: Ray, or root (a tmpfs to fill, a file another user may not read).
MARKED_BY_FIXTURE = {"ray_cluster": "ray", "small_disk": "root", "unprivileged": "root"}


def pytest_configure(config):
    """Under pytest-xdist (`-n N`), each worker's torch gets its share of the cores: N processes each
    running every core's worth of threads would mostly wait on each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        from qprep.extraction.executors import usable_cores

        threads = max(1, usable_cores() // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # and the processes the tests start
        torch.set_num_threads(threads)


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    spread = config.pluginmanager.hasplugin("xdist")
    for item in items:
        for fixture, marker in MARKED_BY_FIXTURE.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)
        if spread and "ray_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("ray"))  # one worker runs them, on one Ray (--dist loadgroup)


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
    """`tiny_model(kind, layout)` → directory of a tiny random checkpoint, weights split over several
    safetensors files with an index, as the real releases are; `layout` "save_pretrained" (what
    transformers writes) or "released" (the hub repositories' file set and config keys)."""
    from qprep.models.tiny import make_tiny_model

    made: dict[tuple[str, str], object] = {}

    def get(kind: str, layout: str = "save_pretrained"):
        if (kind, layout) not in made:
            made[kind, layout] = make_tiny_model(kind, tmp_path_factory.mktemp(f"{kind}-{layout}"),
                                                 max_shard_size="4MB", layout=layout)
        return made[kind, layout]

    return get


EXIF_ORIENTATION = 0x0112


def make_image(path, width, height, seed=0, orientation=None, **save):
    """A picture of noise and a bright corner (so a wrong turn shows), saved by PIL."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 200, (height, width, 3), dtype=np.uint8)
    pixels[: height // 4, : width // 4] = 255
    image = Image.fromarray(pixels)
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        save["exif"] = exif
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path


# The stores the tests of training, verify, infer and the reader start from are extracted in
# process (no Ray: the same bytes, tests/test_executors.py); the tests of Ray itself request ray_cluster.
LOCAL_EXTRACT = {"progress": False, "executor": "local"}


def built_samples(records: list[dict], cache, model_dir, folder):
    """(checkpoint, prompt layout, {id: sample}) of `records` (written to `folder`/data.json) as
    `qprep train` builds them over `cache`; every record must become a sample."""
    import json

    from qprep.models.checkpoint import open_checkpoint
    from qprep.train.data import build_dataset, load_records

    (folder / "data.json").write_text(json.dumps(records))
    checkpoint = open_checkpoint(model_dir)
    tokenizer = checkpoint.tokenizer()
    layout = checkpoint.family.prompt_layout(checkpoint, tokenizer)
    dataset = build_dataset(load_records(folder / "data.json"), cache, tokenizer, layout)
    assert [s.id for s in dataset.samples] == [r["id"] for r in records], dataset.report()
    return checkpoint, layout, {s.id: s for s in dataset.samples}


@pytest.fixture(scope="session")
def ray_cluster(request):
    """One local Ray for the whole session (qprep uses an already initialized Ray as it is)."""
    import ray

    # Under pytest-xdist each worker would start a Ray of its own unless the group keeps the Ray tests on
    # one: without --dist loadgroup there are no groups, and on pytest 9.2 they are lost (pytest-xdist#1386)
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) > 1 and any(
            "ray_cluster" in item.fixturenames and not item.nodeid.endswith("@ray") for item in request.session.items):
        pytest.fail("the Ray tests share one Ray on one pytest-xdist worker: run with `--dist loadgroup`, "
                    "on a pytest whose test ids pytest-xdist can tag with their group (pyproject.toml pins one)")

    # "local": a Ray of its own even while another process's `ray start` cluster runs on this machine
    # (Ray would join that one, and refuse num_cpus)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def omni_store(tiny_model, tmp_path_factory):
    """(model dir, open cache) of a tiny Omni store: videos a (2 s), b (3 s) and a broken one."""
    from qprep import open_cache
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.schemas.settings import VideoSettings

    root = tmp_path_factory.mktemp("train-data")
    for name, seconds in (("a", 2), ("b", 3)):
        make_video(root / "videos" / f"{name}.mp4", VideoSpec(width=112, height=84, fps=25, seconds=seconds))
    (root / "videos" / "broken.mp4").write_bytes(b"\0" * 100)
    model_dir = str(tiny_model("qwen2_5_omni"))
    extract(root / "videos", root / "store.zarr", model_dir, VideoSettings(fps=2), shards=2,
            options=ExtractOptions(**LOCAL_EXTRACT))
    return model_dir, open_cache(root / "store.zarr")


@pytest.fixture(scope="session")
def vl_train_store(tiny_model, tmp_path_factory):
    """(model dir, open cache) of a tiny Qwen2.5-VL store: videos a (2 s) and b (3 s)."""
    from qprep import open_cache
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.schemas.settings import VideoSettings

    root = tmp_path_factory.mktemp("vl-train-data")
    for name, seconds in (("a", 2), ("b", 3)):
        make_video(root / "videos" / f"{name}.mp4", VideoSpec(width=112, height=84, fps=25, seconds=seconds,
                                                              audio=False))
    model_dir = str(tiny_model("qwen2_5_vl"))
    extract(root / "videos", root / "store.zarr", model_dir, VideoSettings(fps=2), dtype="float32", shards=1,
            options=ExtractOptions(**LOCAL_EXTRACT))
    return model_dir, open_cache(root / "store.zarr")


@pytest.fixture(scope="session")
def qwen3_store(tiny_model, tmp_path_factory):
    """`qwen3_store(kind)` → (model dir, open cache) of a float32 store of a Qwen3-VL / Qwen3.5 tiny
    checkpoint (merged tokens, and deepstack levels where the tower has them): videos a (3 s,
    landscape, B-frames) and b (2 s, portrait), no audio. Built once per kind."""
    from qprep import open_cache
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.schemas.settings import VideoSettings

    made: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"{kind}-store")
            make_video(root / "videos" / "a.mp4", VideoSpec(width=128, height=96, fps=25, seconds=3, bframes=2,
                                                            audio=False))
            make_video(root / "videos" / "b.mp4", VideoSpec(width=96, height=128, fps=30, seconds=2, audio=False))
            model_dir = str(tiny_model(kind))
            extract(root / "videos", root / "store.zarr", model_dir, VideoSettings(fps=2), dtype="float32",
                    shards=1, options=ExtractOptions(**LOCAL_EXTRACT))
            made[kind] = model_dir, open_cache(root / "store.zarr")
        return made[kind]

    return get


@pytest.fixture(scope="session")
def qwen2_vl_store(tiny_model, tmp_path_factory):
    """(model dir, open cache) of a float32 store of the released tiny Qwen2-VL checkpoint: videos a
    (3 s, B-frames) and b (2 s, portrait), no audio."""
    from qprep import open_cache
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.schemas.settings import VideoSettings

    root = tmp_path_factory.mktemp("qwen2_vl-store")
    make_video(root / "videos" / "a.mp4", VideoSpec(width=128, height=96, fps=25, seconds=3, bframes=2, audio=False))
    make_video(root / "videos" / "b.mp4", VideoSpec(width=96, height=128, fps=30, seconds=2, audio=False))
    model_dir = str(tiny_model("qwen2_vl", "released"))
    extract(root / "videos", root / "store.zarr", model_dir, VideoSettings(fps=2), dtype="float32", shards=1,
            options=ExtractOptions(**LOCAL_EXTRACT))
    return model_dir, open_cache(root / "store.zarr")


@pytest.fixture(scope="session")
def qwen3_omni_store(tiny_model, tmp_path_factory):
    """(model dir, open cache) of a float32 store of the released tiny Qwen3-Omni checkpoint: videos
    a (3 s, B-frames) and b (2 s, portrait) with audio, and c (2 s) without."""
    from qprep import open_cache
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.schemas.settings import VideoSettings

    root = tmp_path_factory.mktemp("qwen3-omni-store")
    make_video(root / "videos" / "a.mp4", VideoSpec(width=128, height=96, fps=25, seconds=3, bframes=2))
    make_video(root / "videos" / "b.mp4", VideoSpec(width=96, height=128, fps=30, seconds=2))
    make_video(root / "videos" / "c.mp4", VideoSpec(width=128, height=96, fps=24, seconds=2, audio=False))
    model_dir = str(tiny_model("qwen3_omni_moe", "released"))
    extract(root / "videos", root / "store.zarr", model_dir, VideoSettings(fps=2), dtype="float32", shards=1,
            options=ExtractOptions(**LOCAL_EXTRACT))
    return model_dir, open_cache(root / "store.zarr")


@pytest.fixture(scope="session")
def qwen3_vl_store(qwen3_store):
    """(model dir, open cache) of the Qwen3-VL store of `qwen3_store`."""
    return qwen3_store("qwen3_vl")


@pytest.fixture(scope="session")
def media_store(tiny_model, tmp_path_factory):
    """`media_store(kind)` → (model dir, open cache) of a float32 store of a released tiny checkpoint
    extracted with `--media`: video a (2 s, with audio where the model takes it), images photos/cat
    (200x150 JPEG) and photos/turned (a 160x96 JPEG turned by EXIF orientation 6). Built once per kind."""
    from qprep import open_cache
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.schemas.settings import VideoSettings

    made: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"{kind}-media")
            make_video(root / "videos" / "a.mp4", VideoSpec(width=112, height=84, fps=25, seconds=2))
            make_image(root / "videos" / "photos" / "cat.jpg", 200, 150, seed=1, quality=90)
            make_image(root / "videos" / "photos" / "turned.jpg", 160, 96, seed=2, orientation=6, quality=90)
            model_dir = str(tiny_model(kind, "released"))
            extract(root / "videos", root / "store.zarr", model_dir, VideoSettings(fps=2, kinds=("video", "image")),
                    dtype="float32", shards=1, options=ExtractOptions(**LOCAL_EXTRACT))
            made[kind] = model_dir, open_cache(root / "store.zarr")
        return made[kind]

    return get
