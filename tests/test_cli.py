"""The command line: results, JSON for scripts, and errors that name the file with a stable code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from click.testing import CliRunner

from qprep.cli import EXIT_SETTINGS, EXIT_VIDEO, main


def test_prepare_prints_json(videos):
    path = videos("cli.mp4", width=160, height=96, fps=25, seconds=3)
    result = CliRunner().invoke(main, ["prepare", str(path), "--job", "seed-omni-100f", "--num-frames", "8", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["video_grid_thw"] == [4, 16, 16]
    assert summary["video_tokens"] == 256
    assert len(summary["frame_times"]) == 8 and summary["has_audio"]


def test_prepare_reports_a_bad_video_with_its_path(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 1000)
    result = CliRunner().invoke(main, ["prepare", str(bad)])
    assert result.exit_code == EXIT_VIDEO
    assert str(bad) in result.output and "not a video" in result.output


def test_contradictory_settings_exit_with_their_own_code(videos):
    path = videos("cli.mp4", width=160, height=96, fps=25, seconds=3)
    result = CliRunner().invoke(main, ["prepare", str(path), "--video-start", "3", "--video-end", "1"])
    assert result.exit_code == EXIT_SETTINGS and "video_end" in result.output


def test_jobs_lists_the_presets():
    result = CliRunner().invoke(main, ["jobs"])
    assert result.exit_code == 0
    assert "seed-omni-100f" in result.output and "qwen-default" in result.output
    listed = json.loads(CliRunner().invoke(main, ["jobs", "--json"]).output)
    seed = next(job for job in listed if job["name"] == "seed-omni-100f")
    assert seed["video"]["num_frames"] == 100 and seed["train"]["lora_r"] == 16
    by_name = {job["name"]: job for job in listed}
    assert by_name["seed-qwen3-vl-100f"]["video"]["num_frames"] == 100
    # Qwen3.5's preset builds on Qwen3-VL's video settings
    assert by_name["qwen3.5-default"]["video"] == by_name["qwen3-vl-default"]["video"]
    assert by_name["qwen3.5-default"]["model"].startswith("Qwen/Qwen3.5")
    # the seed recipe on Qwen3-Omni: its video settings, LoRA on the MoE thinker's attention
    assert by_name["seed-qwen3-omni-100f"]["video"] == seed["video"]
    assert by_name["seed-qwen3-omni-100f"]["train"]["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    from qprep import open_cache
    from qprep.demo import DEMO_VIDEOS

    videos = sorted(p.name for p in (tmp_path / "videos").glob("*.mp4"))
    assert videos == sorted(DEMO_VIDEOS)
    cache = open_cache(tmp_path / "store.zarr")  # every video is in the store
    assert sorted(cache.ids()) == sorted(Path(name).stem for name in DEMO_VIDEOS)
    assert cache["silent-24fps"].audio_tokens is None and cache["landscape-30fps"].audio_tokens is not None
    # the training set as LLaMA-Factory publishes one: a sharegpt file its dataset_info.json names, per video a
    # dense-captioning record and a grounding one
    info = json.loads((tmp_path / "data" / "dataset_info.json").read_text())
    records = json.loads((tmp_path / "data" / info["qprep_demo"]["file_name"]).read_text())
    assert [r["id"] for r in records[:2]] == ["landscape-30fps", "landscape-30fps#0"]
    assert [r["messages"][1]["content"] for r in records[:2]] == ["From 2.0 to 3.5, a red disc appears.",
                                                                  "From 2.0 to 3.5."]
    assert "--data" in result.output and "llamafactory, 10 records, 10 read (5 video, 5 grounding)" in result.output
    from qprep.demo import DEMO_TRAIN

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = len(losses) // DEMO_TRAIN["epochs"]
    assert sum(losses[-per_epoch:]) < sum(losses[:per_epoch])  # the last epoch's below the first's
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert "nothing to do, 5 videos up to date" in result.output  # the re-run extracted nothing
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["id"] for a in answers) == sorted(r["id"] for r in records)
    # the loop ends with the answers scored against the training file, and the picture named
    assert "precision" in result.output and "mean best tIoU per true segment" in result.output
    assert "grounding: 5 queries" in result.output and "R1@0.5" in result.output
    # the tiny model learnt its training answers: the scores are clearly above an untrained model's zero, and
    # said to be its own. (How many of the answers it reproduces varies from run to run, 0.5 to 0.9: the
    # demo's synthetic videos are not byte-stable between encodes, so neither are its cached tokens.)
    from qprep.datasets import DataFile
    from qprep.eval.score import evaluate

    report = evaluate(tmp_path / "answers.jsonl", DataFile(tmp_path / "data" / "dataset_info.json",
                                                           media_dir=tmp_path / "videos"), captions=False)
    assert report.recall[0.5] >= 0.3 and report.precision[0.5] >= 0.3 and report.best_tiou >= 0.3, report.videos
    assert report.grounding.miou >= 0.3, report.grounding.queries
    assert "scored on its own training set" in result.output
    assert f"videos → {tmp_path / 'eval.png'}" in result.output and (tmp_path / "eval.png").stat().st_size > 1000
    assert "what each step took" in result.output and "where everything went" in result.output


def test_the_interpreter_exits_frozen_after_qprep_commands_ran():
    """The shutdown's walk for cycles is skipped (it took seconds with torch and transformers
    loaded): a handler registered before the commands runs after qprep's and sees the freeze."""
    import subprocess
    import sys

    script = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
        "from click.testing import CliRunner\n"
        "from qprep.cli import main\n"
        "for _ in range(3):\n"
        "    assert CliRunner().invoke(main, ['jobs']).exit_code == 0\n"
        "print('unfrozen before exit', gc.get_freeze_count() == 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["unfrozen", "before", "exit", "True", "frozen", "True"]
