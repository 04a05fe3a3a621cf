"""A dataset file as the user names it (`--data`, `--format`, `--media-dir`), and its rows.

`DataFile` travels where a data path used to (to every training rank): `str()` of it is the path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qprep.errors import SettingsError

DATASET_INFO = "dataset_info.json"  # LLaMA-Factory's index of its datasets


@dataclass(frozen=True)
class DataFile:
    path: Path
    format: str | None = None  # None: detected from the file (`qprep.datasets.detect`)
    media_dir: Path | None = None  # the media root (the folder `qprep extract --videos` reads); None: the file's folder
    check_files: bool = False  # report records whose media files are not found (training needs only the cache)
    times: str = "seconds"  # LongVALE's <sN>/<eN>: "seconds" or "relative" (its 2-digit units)
    task: str = "grounding"  # grounding dicts: "grounding" (a sample per sentence) or "captions" (one per video)
    prompt: str | None = None  # grounding dicts and lists: the question, with {sentence} (captions: as is)
    use_audio_in_video: bool = False  # LLaMA-Factory: each <video><audio> pair is the video with its own sound

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if self.media_dir is not None:
            object.__setattr__(self, "media_dir", Path(self.media_dir))

    def __str__(self) -> str:
        return str(self.path)

    @property
    def root(self) -> Path:
        """The media root: cache ids are paths under it, id-named videos are looked for in it."""
        return self.media_dir if self.media_dir is not None else self.path.parent


def read_rows(path: Path):
    """The file's content: a JSON document (list or dict), JSON lines, or a parquet table's rows."""
    try:
        if path.suffix[1:] == "parquet":  # a dataset's table (LLaMA-Factory, the hub), nothing of the store's
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"--data {path}: cannot read it ({exc})") from exc
    except Exception as exc:  # pyarrow's errors
        raise SettingsError(f"--data {path}: cannot read it as parquet ({exc})") from exc
    if path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as whole:
            if text.lstrip()[:1] in ("[", ""):
                raise SettingsError(f"--data {path}: cannot read it as JSON ({whole})") from whole
    rows = []  # JSON lines
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SettingsError(f"--data {path}: line {number} is not JSON ({exc})") from exc
    return rows


def dataset_info_entry(path: Path) -> tuple[Path, dict] | None:
    """LLaMA-Factory's description of `path`: (data file, entry) when `path` is a `dataset_info.json`
    of one entry, or a file that a `dataset_info.json` beside it names; else None."""
    if path.name == DATASET_INFO:
        entries = _entries(path)
        local = {name: entry for name, entry in entries.items() if "file_name" in entry}
        if len(local) != 1:
            raise SettingsError(f"--data {path}: {len(local)} datasets with a file_name ({', '.join(local)}); "
                                f"pass the data file of the one to read (its entry is found by file_name)")
        entry = next(iter(local.values()))
        return path.parent / entry["file_name"], entry
    info = path.parent / DATASET_INFO
    if not info.is_file():
        return None
    return next(((path, entry) for entry in _entries(info).values() if entry.get("file_name") == path.name), None)


def _entries(info: Path) -> dict:
    try:
        entries = json.loads(info.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SettingsError(f"{info}: cannot read it as JSON ({exc})") from exc
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise SettingsError(f"{info}: expected LLaMA-Factory's {{name: {{file_name, ...}}}}")
    return entries
