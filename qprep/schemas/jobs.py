"""Job presets: named, versioned TOML files of settings (`jobs/` in the repository).

A preset has `name`, `version`, an optional `model`, an optional `preset` (a named preset this
file builds on: its tables first, then this file's), and tables of settings: `[video]` holds
`VideoSettings` fields (what `qprep extract` and `qprep prepare` do), `[train]` holds
`TrainSettings` fields (what `qprep train` does; see `qprep.schemas.training`). Flags given on the
command line override the preset.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qprep.errors import SettingsError
from qprep.schemas.settings import VideoSettings
from qprep.schemas.training import TrainSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Job:
    name: str
    version: int
    model: str | None = None
    video: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def video_settings(self, **overrides) -> VideoSettings:
        """The preset's video settings with `overrides` (None values ignored) on top."""
        values = {**self.video, **{k: v for k, v in overrides.items() if v is not None}}
        if overrides.get("num_frames") is not None:
            values.pop("fps", None)
        elif overrides.get("fps") is not None:
            values.pop("num_frames", None)
        try:
            return VideoSettings(**values)
        except TypeError as exc:
            raise SettingsError(f"job {self.name} ({self.source}): {exc}") from None

    def train_settings(self, **overrides) -> TrainSettings:
        """The preset's training settings with `overrides` (flat names, None values ignored) on top."""
        return TrainSettings().updated(self.train, f"job {self.name} ({self.source}) [train]").updated(overrides)


def available_jobs() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in resources.files("qprep.jobs").iterdir() if p.name.endswith(".toml"))


def load_job(name_or_path: str | Path) -> Job:
    """A preset by name (from `jobs/`) or by path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise SettingsError(f"job file {path} does not exist; `qprep jobs` lists the named presets")
        text, source = path.read_text(), str(path)
    else:
        resource = resources.files("qprep.jobs") / f"{name_or_path}.toml"
        if not resource.is_file():
            raise SettingsError(f"unknown job {name_or_path!r}; known jobs: {', '.join(available_jobs())}")
        text, source = resource.read_text(), f"jobs/{name_or_path}.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"job file {source} is not valid TOML: {exc}") from None
    unknown = set(data) - {"name", "version", "model", "preset", "video", "train"}
    if unknown:
        raise SettingsError(f"job file {source}: unknown keys {sorted(unknown)}; the known ones are name, version, "
                            "model, preset, [video] and [train]")
    video = dict(data.get("video", {}))
    if "size" in video:
        video["size"] = tuple(video["size"])
    job = Job(name=str(data.get("name", path.stem)), version=int(data.get("version", 1)), model=data.get("model"),
              video=video, train=dict(data.get("train", {})), source=source)
    if "preset" in data:  # a user's file on top of a named preset: the file's keys win
        job = _on_top_of(load_job(str(data["preset"])), job)
    job.video_settings()  # validate now, not when the first video is prepared
    job.train_settings()
    return job


def _on_top_of(base: Job, job: Job) -> Job:
    video = dict(base.video)
    if "fps" in job.video or "num_frames" in job.video:  # one sampling rule: the file's replaces the preset's
        video.pop("fps", None)
        video.pop("num_frames", None)
    return Job(name=job.name, version=job.version, model=job.model or base.model, video={**video, **job.video},
               train={**base.train, **job.train}, source=f"{job.source} (on preset {base.name})")
