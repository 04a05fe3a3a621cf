"""The bad-input corpus (tests/corpus.py) through the real `extract` on Ray, kind by kind.

Every kind is extracted, recorded failed with its cause, or passed over and reported, as it
expects; nothing crashes; every video discovery finds has a row; the run writes nothing into the
videos folder or next to the store. The figure (kinds tried / extracted / failed with their cause /
skipped and reported / crashes) is printed at the end of the module's main test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from corpus import FAILED, NUM_FRAMES, OK, SKIPPED, SMALL_FRAMES, UNAVAILABLE, Kind, make_corpus
from qprep import open_cache
from qprep.cli import main
from qprep.extraction.discover import discover, find_videos
from qprep.extraction.run import ExtractOptions, Summary, extract, format_summary
from qprep.errors import INTERNAL_ERROR, TOWER_ERROR
from qprep.schemas.settings import VideoSettings
from qprep.synth import VideoSpec, make_video

pytestmark = pytest.mark.slow

QUIET = ExtractOptions(progress=False)
CRASH_CODES = {INTERNAL_ERROR, TOWER_ERROR}
NOBODY = 65534


@dataclass
class Run:
    kinds: list[Kind]
    folder: Path
    summary: Summary
    rows: dict[str, dict]  # by id
    discovered: list[str]  # ids
    before: dict  # the folders around the store, as they were before the run
    after: dict


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root / "videos")


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model("qwen2_5_omni"))


@pytest.fixture(scope="module")
def run(corpus, ray_cluster, model_dir) -> Run:
    root, kinds = corpus
    folder = root / "videos"
    before = tree(root)
    summary = extract(folder, root / "store.zarr", model_dir, VideoSettings(num_frames=NUM_FRAMES, **SMALL_FRAMES),
                      shards=4, options=QUIET)
    cache = open_cache(root / "store.zarr")
    rows = {row["id"]: row for row in cache.manifest.to_pylist()}
    after = tree(root, skip="store.zarr")
    return Run(kinds, folder, summary, rows, [video.id for video in discover(folder, 4)], before, after)


@pytest.fixture(scope="module")
def unprivileged(corpus, model_dir) -> dict:
    """Discovery and the CPU stage (the function Ray maps over each video) run on the corpus by a
    user without root's power to read any file: what a run by such a user records."""
    root, kinds = corpus
    paths = [path for kind in kinds if kind.unprivileged for path in kind.paths] + ["codecs/h264.mp4"]
    result = subprocess.run([sys.executable, "-c", AS_NOBODY, str(root / "videos"), model_dir, json.dumps(paths),
                             str(NUM_FRAMES)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["uid"] != 0
    return report


AS_NOBODY = f"""
import json, os, sys
from qprep.extraction.discover import find_videos
from qprep.extraction.stages import prepare_video
from qprep.schemas.settings import VideoSettings, load_model_spec
import qprep.pipeline.prepare  # everything the CPU stage imports, while the model files are readable

folder, model, paths, frames = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
spec, settings = load_model_spec(model), VideoSettings(num_frames=frames)
os.chdir(folder)  # relative paths from here need no permission on the folders above
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid({NOBODY})
    os.setuid({NOBODY})
found = find_videos(".", 4)
metas = {{}}
for video in found.videos:
    if video.path in paths:
        prepared = prepare_video(video, videos_dir=".", settings=settings, spec=spec)
        metas[video.path] = prepared.row.to_dict()
print(json.dumps({{"uid": os.geteuid(), "skipped": found.skipped, "ids": [v.id for v in found.videos],
                  "metas": metas}}))
"""


def tree(root: Path, skip: str | None = None) -> dict:
    """Every entry under `root` (links not followed) with its type, size and mtime."""
    out = {}
    for directory, folders, files in os.walk(root):
        folders[:] = [name for name in folders if name != skip]
        for name in folders + files:
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            out[os.path.relpath(path, root)] = (stat.st_mode, stat.st_size, stat.st_mtime_ns)
    return out


# --- verdicts -----------------------------------------------------------------------------------

def verdict(kind: Kind, run: Run, unprivileged: dict) -> tuple[str, str]:
    """(what happened, why it is not what the kind expects, or "")."""
    if kind.expect == UNAVAILABLE:
        return UNAVAILABLE, ""
    if kind.unprivileged:
        return unprivileged_verdict(kind, unprivileged)
    if kind.expect == SKIPPED:
        return SKIPPED, skipped_problem(kind, [row_id for row_id in kind.ids if row_id in run.rows],
                                        run.summary.skipped)
    problems = []
    for row_id in kind.ids:
        row = run.rows.get(row_id)
        if row is None:
            problems.append(f"{row_id}: no row")
        elif row["error_code"] in CRASH_CODES:
            return "crashed", f"{row_id}: {row['error']}"
        elif kind.expect == OK:
            problems += ok_problems(kind, row)
        else:
            problems += failed_problems(kind, row)
    return kind.expect, "; ".join(problems)


def ok_problems(kind: Kind, row: dict) -> list[str]:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if row["status"] != OK:
        return [f"{row['id']}: {row['status']} ({row['error_code']}: {row['error']})"]
    problems = []
    for column, expected in kind.facts.items():
        choices = expected if isinstance(expected, tuple) else (expected,)
        if row[column] not in choices:
            problems.append(f"{column} {row[column]!r}, expected {expected!r}")
    height, width = smart_resize(row["height"], row["width"], factor=28, **SMALL_FRAMES)
    expected_grid = [NUM_FRAMES // 2, height // 14, width // 14]
    if list(row["grid_thw"]) != expected_grid:
        problems.append(f"grid {row['grid_thw']}, expected {expected_grid}")
    if row["video_length"] != expected_grid[0] * expected_grid[1] * expected_grid[2] // 4:
        problems.append(f"{row['video_length']} video tokens for the grid {expected_grid}")
    if len(row["frame_indices"]) != NUM_FRAMES or sorted(row["frame_times"]) != list(row["frame_times"]):
        problems.append(f"frames {row['frame_indices']} at {row['frame_times']}")
    if kind.audio is not None and (row["audio_length"] > 0) != kind.audio:
        problems.append(f"{row['audio_length']} audio tokens, expected audio={kind.audio} ({row['audio_note']!r})")
    return [f"{row['id']}: {problem}" for problem in problems]


def failed_problems(kind: Kind, row: dict) -> list[str]:
    if row["status"] != FAILED or row["error_code"] != kind.code or kind.cause not in (row["error"] or "").lower():
        return [f"{row['id']}: {row['status']} {row['error_code']} {row['error']!r}, expected {kind.code} "
                f"with {kind.cause!r}"]
    return []


def skipped_problem(kind: Kind, rows_found: list[str], skipped: list) -> str:
    if rows_found:
        return f"rows {rows_found} should not exist"
    reported = [why for path, why in skipped if path == kind.paths[0] or kind.paths[0].startswith(path + "/")]
    if kind.cause and not any(kind.cause in why.lower() for why in reported):
        return f"not reported with {kind.cause!r} (reported: {reported})"
    if not kind.cause and reported:
        return f"reported, though it should be passed over silently: {reported}"
    return ""


def unprivileged_verdict(kind: Kind, report: dict) -> tuple[str, str]:
    if kind.expect == SKIPPED:
        return SKIPPED, skipped_problem(kind, [i for i in kind.ids if i in report["ids"]], report["skipped"])
    meta = report["metas"].get(kind.paths[0])
    if meta is None:
        return kind.expect, "not discovered"
    if meta.get("error_code") in CRASH_CODES:
        return "crashed", meta["error"]
    row = dict(meta, id=kind.ids[0])
    return kind.expect, "; ".join(failed_problems(kind, row))


# --- tests --------------------------------------------------------------------------------------

def test_every_kind_is_extracted_failed_or_skipped_as_it_expects(run, unprivileged, capsys):
    counts = {OK: 0, FAILED: 0, SKIPPED: 0, UNAVAILABLE: 0, "crashed": 0, "wrong": 0}
    wrong = []
    for kind in run.kinds:
        outcome, problem = verdict(kind, run, unprivileged)
        counts["wrong" if problem and outcome != "crashed" else outcome] += 1
        if problem:
            wrong.append(f"{kind.name}: {problem}")
    tried = len(run.kinds) - counts[UNAVAILABLE]
    unavailable = [f"{kind.name} ({kind.note})" for kind in run.kinds if kind.expect == UNAVAILABLE]
    figure = (f"bad-input corpus: {tried} kinds tried, {counts[OK]} extracted correctly, {counts[FAILED]} recorded "
              f"failed with the expected cause, {counts[SKIPPED]} passed over as expected, {counts['crashed']} "
              f"crashed, {counts['wrong']} not as expected"
              + (f"; not available here: {', '.join(unavailable)}" if unavailable else ""))
    with capsys.disabled():
        print(f"\n{figure}")
    assert tried >= 30
    assert counts["crashed"] == 0
    assert not wrong, "\n".join(wrong)


def test_the_run_ends_normally_with_a_row_for_every_video(run):
    assert run.summary.videos == len(run.discovered)
    assert run.summary.extracted + run.summary.failed == run.summary.videos
    assert set(run.discovered) == set(run.rows)
    assert not [row["id"] for row in run.rows.values() if row["error_code"] in CRASH_CODES]
    for path, cause in run.summary.failures:  # every failure names its file and says why
        assert path in {row["path"] for row in run.rows.values()} and cause


def test_the_run_writes_nothing_into_the_videos_folder_or_beside_the_store(run):
    assert run.after == run.before


def test_a_name_that_is_not_utf8_is_recorded_failed_never_opened(run):
    row = run.rows["names/latin1-caf\\xe9"]
    assert row["status"] == FAILED and row["error_code"] == "bad_file_name"
    assert row["path"] == "names/latin1-caf\\xe9.mp4" and "rename" in row["error"]
    assert row["content_hash"] is None  # never read


def test_a_file_without_read_permission_fails_for_a_user_who_may_not_read_it(unprivileged):
    metas = unprivileged["metas"]
    assert metas["codecs/h264.mp4"]["status"] == OK  # the user reads what is readable: the setup is sound
    locked = metas["special/unreadable.mp4"]
    assert (locked["status"], locked["error_code"]) == (FAILED, "unreadable")
    assert "Permission denied" in locked["error"]
    assert ("special/locked", "cannot list this folder: Permission denied") in map(tuple, unprivileged["skipped"])


# --- discovery: links ---------------------------------------------------------------------------

@pytest.fixture
def linked(tmp_path):
    """videos/{a.mp4, sub/b.mp4, sub/up -> .., sub/loop -> ../sub, alias.mp4 -> a.mp4, out.mp4 -> ../elsewhere/c.mp4,
    out-dir -> ../elsewhere}, elsewhere/c.mp4."""
    folder, elsewhere = tmp_path / "videos", tmp_path / "elsewhere"
    for path in (folder / "a.mp4", folder / "sub/b.mp4", elsewhere / "c.mp4"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not decoded by discovery")
    os.symlink("..", folder / "sub/up")
    os.symlink("../sub", folder / "sub/loop")
    os.symlink("a.mp4", folder / "alias.mp4")
    os.symlink(elsewhere / "c.mp4", folder / "out.mp4")
    os.symlink("../elsewhere", folder / "out-dir")
    return folder


def test_discovery_follows_links_inside_the_folder_and_never_loops(linked):
    found = find_videos(linked, 4)
    assert [video.id for video in found.videos] == ["a", "alias", "sub/b"]
    reasons = dict(found.skipped)
    assert "loop" in reasons["sub/up"] and "loop" in reasons["sub/loop"]
    assert "outside" in reasons["out.mp4"] and "outside" in reasons["out-dir"]
    assert "--follow-links" in reasons["out.mp4"]


def test_discovery_follows_links_outside_the_folder_only_when_asked(linked):
    found = find_videos(linked, 4, follow_links=True)
    assert [video.id for video in found.videos] == ["a", "alias", "out", "out-dir/c", "sub/b"]
    assert sorted(path for path, _ in found.skipped) == ["sub/loop", "sub/up"]
    assert [video.id for video in discover(linked, 4)] == ["a", "alias", "sub/b"]


def test_a_loop_of_links_through_folders_ends(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x/v.mp4").write_bytes(b"v")
    os.symlink("../y", tmp_path / "x/to-y")
    os.symlink("../x", tmp_path / "y/to-x")
    found = find_videos(tmp_path, 4)
    # A folder is walked under every path that does not pass through it twice.
    assert [video.id for video in found.videos] == ["x/v", "y/to-x/v"]
    assert [path for path, _ in found.skipped] == ["x/to-y/to-x", "y/to-x/to-y"]


def test_the_summary_lists_what_was_not_read():
    summary = Summary(skipped=[("out.mp4", "a link to /x/c.mp4, outside the videos folder; not followed "
                                            "(--follow-links follows it)")])
    assert "not read: out.mp4: a link to /x/c.mp4, outside" in format_summary(summary, "s.zarr")
    summary.ray_started = True
    assert "not read: out.mp4" in format_summary(summary, "s.zarr")


def test_cli_follow_links_extracts_a_linked_video_and_status_agrees(ray_cluster, model_dir, tmp_path):
    folder, elsewhere = tmp_path / "videos", tmp_path / "elsewhere"
    make_video(folder / "inside.mp4", VideoSpec(width=64, height=48, fps=8, seconds=1))
    make_video(elsewhere / "linked.mp4", VideoSpec(width=64, height=48, fps=8, seconds=1, audio=False))
    os.symlink(elsewhere / "linked.mp4", folder / "linked.mp4")
    store = tmp_path / "store.zarr"
    result = CliRunner().invoke(main, ["extract", "--videos", str(folder), "--out", str(store), "--model", model_dir,
                                       "--num-frames", "4", "--shards", "2", "--quiet", "--follow-links", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["extracted"], summary["failed"], summary["skipped"]) == (2, 0, [])
    assert open_cache(store).ids() == ["inside", "linked"]
    result = CliRunner().invoke(main, ["status", str(store), "--json"])
    assert json.loads(result.output)["videos"] == {"ok": 2, "failed": 0, "pending": 0, "gone": 0}
