"""The batch plan: fixed by (seed, epoch), batches never mix audio with no audio, every sample once
per epoch, a resumed plan continues where it stopped, and worker processes change nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qprep.errors import SettingsError
from qprep.extraction.run import ExtractOptions, extract
from qprep.schemas.settings import VideoSettings
from qprep.synth import VideoSpec, make_video
from qprep.train import loop
from qprep.train.data import Sample
from qprep.train.loader import batches_per_epoch, plan, plan_epoch
from qprep.schemas.training import TrainSettings
from qprep.train.loop import train
from qprep.schemas.training import LoraSettings
from test_train_loop import adapter, write_data


def samples(audio_flags: str) -> list[Sample]:
    return [Sample(id=str(i), input_ids=[i], labels=[i], has_audio=flag == "a") for i, flag in enumerate(audio_flags)]


@pytest.mark.parametrize("flags", ["aaaaaaa", "nnnnn", "aanananannna", "annnnnnnnnna"])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_each_epoch_visits_every_sample_once_in_batches_of_one_kind(flags, batch_size):
    dataset = samples(flags)
    for epoch in range(3):
        batches = plan_epoch(dataset, epoch, seed=7, batch_size=batch_size)
        assert sorted(i for batch in batches for i in batch) == list(range(len(dataset)))
        assert all(len({dataset[i].has_audio for i in batch}) == 1 for batch in batches)
        assert all(1 <= len(batch) <= batch_size for batch in batches)
        assert len(batches) == batches_per_epoch(dataset, batch_size)
        assert batches == plan_epoch(dataset, epoch, seed=7, batch_size=batch_size)  # fixed by (seed, epoch)
    assert plan_epoch(dataset, 0, 7, batch_size) != plan_epoch(dataset, 1, 7, batch_size) or len(dataset) < 3


def test_a_plan_started_later_is_the_tail_of_the_whole_plan():
    dataset = samples("aanananannna")
    whole = plan(dataset, seed=1, batch_size=2, epochs=3)
    for cut in range(len(whole)):
        start = (whole[cut].epoch, whole[cut].index)
        assert plan(dataset, seed=1, batch_size=2, epochs=3, start=start) == whole[cut:]


SETTINGS = TrainSettings(epochs=2, lr=3e-2, batch_size=1, grad_accum=2, seed=5, lora=LoraSettings(r=4, alpha=8))


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_worker_processes_give_the_same_run_as_reading_in_process(omni_store, tmp_path):
    model_dir, cache = omni_store
    data = write_data(tmp_path / "train.json")
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"workers-{workers}"
        settings = TrainSettings(**{**SETTINGS.__dict__, "workers": workers})
        train(cache.store.root, data, model_dir, out, settings, progress=False, echo=lambda _: None)
        runs[workers] = out
    assert _losses(runs[0]) == _losses(runs[2])
    ours, theirs = adapter(runs[0] / "adapter"), adapter(runs[2] / "adapter")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    saved = json.loads((runs[2] / "run.json").read_text())
    assert saved["settings"]["seed"] == 5 and saved["cache_content"] == cache.content_key


def _copy_store(omni_store, tmp_path):
    """A private copy of the session store and its videos folder, free to re-extract."""
    model_dir, cache = omni_store
    root = cache.store.root.parent
    shutil.copytree(root / "videos", tmp_path / "videos")
    shutil.copytree(cache.store.root, tmp_path / "store.zarr")
    return model_dir, tmp_path / "videos", tmp_path / "store.zarr"


def _re_extract_with_a_new_video(model_dir, videos, store):
    make_video(videos / "c.mp4", VideoSpec(width=112, height=84, fps=25, seconds=2))
    extract(videos, store, model_dir, VideoSettings(fps=2), options=ExtractOptions(progress=False, executor="local"))


def test_resume_refuses_other_settings_or_a_re_extracted_cache(omni_store, tmp_path):
    model_dir, videos, store = _copy_store(omni_store, tmp_path)
    data = write_data(tmp_path / "train.json")
    out = tmp_path / "run"
    train(store, data, model_dir, out, TrainSettings(**{**SETTINGS.__dict__, "epochs": 1}), progress=False,
          echo=lambda _: None)
    with pytest.raises(SettingsError, match="settings.seed"):
        train(store, data, model_dir, out, TrainSettings(**{**SETTINGS.__dict__, "seed": 6}), resume=True,
              progress=False, echo=lambda _: None)
    _re_extract_with_a_new_video(model_dir, videos, store)
    with pytest.raises(SettingsError, match="re-extracted since"):
        train(store, data, model_dir, out, SETTINGS, resume=True, progress=False, echo=lambda _: None)


def test_a_cache_re_extracted_during_training_stops_the_run_after_its_checkpoint(omni_store, tmp_path, monkeypatch):
    model_dir, videos, store = _copy_store(omni_store, tmp_path)
    save = loop._save

    def save_then_re_extract(out, *args):
        save(out, *args)
        if not (videos / "c.mp4").exists():
            _re_extract_with_a_new_video(model_dir, videos, store)

    monkeypatch.setattr(loop, "_save", save_then_re_extract)
    with pytest.raises(SettingsError, match="changed while training"):
        train(store, write_data(tmp_path / "train.json"), model_dir, tmp_path / "run", SETTINGS, progress=False,
              echo=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-0000001"]
