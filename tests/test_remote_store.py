"""A store behind an S3 API (moto's server on loopback): `extract`, `status` and `train` work against
`s3://bucket/prefix/store.zarr` and give what a local store gives, re-runs touch only what changed,
and a second writer is refused while the lock object is there."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from click.testing import CliRunner

from qprep import open_cache
from qprep.cli import main
from qprep.errors import StoreError
from qprep.extraction.run import ExtractOptions, extract
from qprep.schemas.settings import VideoSettings
from qprep.schemas.training import LoraSettings, TrainSettings
from qprep.store.layout import Store
from qprep.synth import VideoSpec, make_video
from qprep.train.loop import train
from test_train_loop import adapter, write_data

pytestmark = pytest.mark.slow

QUIET = ExtractOptions(progress=False, executor="local")  # the subject is the store, not Ray
BUCKET = "qprep-tests"


@pytest.fixture(scope="module")
def s3():
    """(endpoint, an s3fs filesystem): moto's S3 server on loopback with one bucket, reached through
    the standard AWS environment variables."""
    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint, fsspec.filesystem("s3", use_listings_cache=False)
    server.stop()


@pytest.fixture(scope="module")
def remote_store(s3, omni_store, tmp_path_factory):
    """(model dir, videos, URL): the session's Omni store extracted again, from a copy of its videos
    (same sizes and mtimes, so the same manifest rows), into the bucket."""
    model_dir, cache = omni_store
    videos = tmp_path_factory.mktemp("remote") / "videos"
    shutil.copytree(cache.store.root.parent / "videos", videos)
    url = f"s3://{BUCKET}/omni/store.zarr"
    summary = extract(videos, url, model_dir, VideoSettings(fps=2), shards=2, options=QUIET)
    assert (summary.extracted, summary.failed) == (2, 1)
    return model_dir, videos, url


def objects(fs, url: str) -> dict[str, tuple]:
    """(ETag, last modified) of every data and manifest object, by key relative to the store: a
    rewritten object changes its time even when its bytes are the same."""
    root = url.removeprefix("s3://")
    return {path.removeprefix(root + "/"): (info["ETag"], info["LastModified"])
            for path, info in fs.find(root, detail=True).items()
            if path.removeprefix(root + "/").startswith(("shards/", "manifest/"))}


def test_an_s3_store_holds_what_a_local_extract_holds(s3, remote_store, omni_store):
    import pyarrow.parquet as pq
    import zarr
    from pyarrow.fs import S3FileSystem

    endpoint, fs = s3
    model_dir, videos, url = remote_store
    local = omni_store[1]
    remote = open_cache(url)
    assert remote.store.attrs == local.store.attrs
    assert remote.manifest.equals(local.manifest)  # nothing in a row depends on where the store is
    assert remote.ids() == local.ids() == ["a", "b"] and remote.row("broken").status == "failed"
    for video_id in remote.ids():
        ours, theirs = remote[video_id], local[video_id]
        assert torch.equal(ours.video_tokens, theirs.video_tokens), video_id
        assert torch.equal(ours.audio_tokens, theirs.audio_tokens), video_id
    assert remote.content_key == local.content_key
    assert not fs.exists(f"{url}/.qprep/lock")  # released at the end of the run

    # plain Parquet and plain Zarr: pyarrow's own S3 client and zarr read them without qprep
    table = pq.read_table(f"{BUCKET}/omni/store.zarr/manifest", filesystem=S3FileSystem(endpoint_override=endpoint))
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "broken"]
    row = remote.row("a")
    array = zarr.open_array(f"{url}/shards/{row.shard:05d}/{row.shard_key[:16]}/video", mode="r")
    start = row.video_offset
    assert torch.equal(torch.from_numpy(array[start:start + row.video_length]), remote.video_tokens("a"))

    result = CliRunner().invoke(main, ["status", url, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["store"] == url and report["videos_dir"] == str(videos.resolve())
    assert report["videos"] == {"ok": 2, "failed": 1, "pending": 1, "gone": 0}  # the failed one is retried
    assert report["bytes"] == sum(info["size"] for info in fs.find(url, detail=True).values())


def test_training_from_an_s3_store_equals_training_from_the_local_store(remote_store, omni_store, tmp_path):
    model_dir, _, url = remote_store
    data = write_data(tmp_path / "train.json")
    settings = TrainSettings(epochs=2, lr=3e-2, batch_size=1, grad_accum=2, seed=5, lora=LoraSettings(r=4, alpha=8))
    runs = {}
    for name, cache, workers in (("local", omni_store[1].store.location, 0), ("s3", url, 2)):
        runs[name] = tmp_path / name
        train(cache, data, model_dir, runs[name], TrainSettings(**{**settings.__dict__, "workers": workers}),
              progress=False, echo=lambda _: None)
    ours, theirs = adapter(runs["s3"] / "adapter"), adapter(runs["local"] / "adapter")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((runs["s3"] / "run.json").read_text())["cache"] == url

    # the adapter answers from the S3 store, and the S3 store passes the audit against transformers
    answers = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(main, ["infer", "--cache", url, "--adapter", str(runs["s3"] / "adapter"),
                                       "--max-new-tokens", "4", "--quiet", "--out", str(answers)])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(line)["id"] for line in answers.read_text().splitlines()) == sorted(
        open_cache(url).ids())
    result = CliRunner().invoke(main, ["verify", url, "--all", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"], result.output


def test_reruns_on_s3_touch_only_what_changed(s3, remote_store, tmp_path):
    _, fs = s3
    model_dir, videos, url = remote_store
    mine = f"s3://{BUCKET}/reruns/store.zarr"
    fs.copy(url.removeprefix("s3://"), mine.removeprefix("s3://"), recursive=True)  # a private copy
    shutil.copytree(videos, tmp_path / "videos")
    videos = tmp_path / "videos"
    (videos / "broken.mp4").unlink()
    args = ["extract", "--videos", str(videos), "--out", mine, "--model", model_dir, "--fps", "2", "--quiet", "--json"]

    def run() -> dict:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    removed = run()
    assert (removed["removed"], removed["extracted"], removed["ray_started"]) == (1, 0, False)
    before = objects(fs, mine)
    noop = run()
    assert (noop["extracted"], noop["up_to_date"], noop["ray_started"], noop["shards_written"]) == (0, 2, False, 0)
    assert objects(fs, mine) == before  # not an object rewritten

    make_video(videos / "a.mp4", VideoSpec(width=112, height=84, fps=25, seconds=3))
    changed = run()
    assert (changed["extracted"], changed["shards_written"]) == (1, 1)
    shard = f"{open_cache(mine).row('a').shard:05d}"
    after = objects(fs, mine)
    mine_changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert mine_changed and all(k.startswith((f"shards/{shard}/", f"manifest/{shard}.")) for k in mine_changed)
    assert open_cache(mine).row("a").duration == pytest.approx(3, abs=0.1)

    Store.remove(mine)  # what --rebuild does first: every object goes, the lock last
    assert fs.find(mine) == [] and not Store.exists(mine)


def test_a_second_writer_is_refused_while_the_lock_object_is_there(s3, remote_store):
    _, fs = s3
    model_dir, videos, url = remote_store
    lock = f"{url}/.qprep/lock"
    with Store.open(url).lock():
        with pytest.raises(StoreError, match="another qprep extract is writing") as refused:
            extract(videos, url, model_dir, VideoSettings(fps=2), options=QUIET)
        message = str(refused.value)
        assert f"aws s3 rm {lock}" in message and "pid" in message
        with pytest.raises(StoreError, match="another qprep extract is writing"):
            Store.remove(url)  # --rebuild deletes nothing under another writer's lock
    assert not fs.exists(lock) and Store.exists(url)

    # a holder killed before it could remove the lock: refused, with the object to delete
    fs.pipe_file(lock, json.dumps({"host": "gone", "pid": 4242}).encode())
    result = CliRunner().invoke(main, ["extract", "--videos", str(videos), "--out", url, "--model", model_dir,
                                       "--fps", "2", "--quiet"])
    assert result.exit_code == 3 and lock in result.output and "host gone, pid 4242" in result.output
    fs.rm_file(lock)
    with Store.open(url).lock():
        pass

    # writers racing for the lock: exactly one wins (a conditional PUT)
    won, barrier = [], threading.Barrier(6)

    def contend():
        holder = Store.open(url).lock()
        barrier.wait()
        try:
            holder.__enter__()
            won.append(holder)
        except StoreError:
            pass

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    won[0].__exit__(None, None, None)
    assert not fs.exists(lock)


def test_sigterm_releases_the_lock_object(s3, remote_store, tmp_path):
    """A scheduler's SIGTERM unwinds the run: the lock object goes, so the next run is not refused."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _, fs = s3
    model_dir, videos, _ = remote_store
    url = f"s3://{BUCKET}/sigterm/store.zarr"
    lock = f"{url}/.qprep/lock".removeprefix("s3://")
    run = subprocess.Popen([sys.executable, "-m", "qprep.cli", "extract", "--videos", str(videos), "--out", url,
                            "--model", str(model_dir), "--fps", "2", "--quiet"],
                           env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not fs.exists(lock):
        assert run.poll() is None, run.stdout.read().decode()
        assert time.monotonic() < deadline, "the run never took the lock"
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=120)[0].decode()
    assert run.returncode != 0, output
    assert not fs.exists(lock), output
    extract(videos, url, model_dir, VideoSettings(fps=2), options=QUIET)  # not refused
