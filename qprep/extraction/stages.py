"""The two Ray stages: the CPU stage (a Ray Data task per video) and the tower stage (an actor
pool, one actor per GPU, or one CPU actor).

Rows between them carry uint8 patches and compact float32 mel frames (never normalized floats:
4× smaller); a video that cannot be prepared becomes a failed row with its cause, and the run goes
on. Row columns: `task` (JSON of the VideoFile), `meta` (JSON: status, error, metadata), `patches`,
`grid`, `mel`, `windows`; after the towers: `task`, `meta`, `video`, `audio` and, for a tower with
deepstack levels, `deepstack` (storage dtype).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np

from qprep.errors import INTERNAL_ERROR, TOWER_ERROR, FileNameError, UnreadableFileError, VideoError
from qprep.schemas.manifest import FAILED, OK
from qprep.schemas.settings import ModelSpec, VideoSettings

CPU_STAGE_TRIES = 3  # a video whose worker process dies this many times is recorded as failed
# A tower batch whose actor dies this many times (the actor is restarted each time) is given up and
# its videos recorded as failed: without a bound Ray Data retries it forever, and one video that
# crashes the towers would loop the run.
TOWER_BATCH_TRIES = 3


def cpu_stage(row: dict, *, videos_dir: str, settings: VideoSettings, spec: ModelSpec) -> dict:
    """Hash, probe, sample, decode, resize and patchify one video; featurize its audio."""
    import torch

    from qprep.extraction.discover import content_hash
    from qprep.pipeline.prepare import prepare

    torch.set_num_threads(1)  # one Ray CPU per task: parallelism comes from many tasks
    task = json.loads(row["task"])
    path = Path(videos_dir) / task["path"]
    meta: dict = {"status": OK}
    out = {"task": row["task"], "patches": np.zeros((0, spec.patch_dim), np.uint8), "grid": np.zeros(3, np.int64),
           "mel": np.zeros((spec.audio.feature_size, 0), np.float32), "windows": np.zeros(0, np.int64)}
    try:
        if task.get("bad_name"):  # recorded, never opened: its id could not name it faithfully
            raise FileNameError(task["path"], task["bad_name"])
        meta["content_hash"] = content_hash(path)
        prepared = prepare(path, settings, spec, threads=1)
    except VideoError as exc:
        meta.update(status=FAILED, error=exc.cause, error_code=exc.code)
    except OSError as exc:
        meta.update(status=FAILED, error=f"cannot read the file: {exc.strerror or exc}",
                    error_code=UnreadableFileError.code)
    except Exception as exc:  # a qprep bug must not stop 7,000 videos: record it loudly instead
        meta.update(status=FAILED, error=f"internal error: {exc!r}\n{traceback.format_exc(limit=4)}",
                    error_code=INTERNAL_ERROR)
    else:
        metadata = prepared.metadata.to_dict()
        metadata.pop("path")
        meta.update(metadata, grid_thw=prepared.video_grid_thw[0].tolist(), mel_length=prepared.mel_length)
        out["patches"] = prepared.patches.numpy()
        out["grid"] = prepared.video_grid_thw[0].numpy()
        if prepared.input_features is not None:
            out["mel"] = prepared.mel_frames().numpy()
            out["windows"] = prepared.feature_attention_mask.sum(-1).numpy().astype(np.int64)
    out["meta"] = json.dumps(meta)
    return out


class TowerStage:
    """A Ray Data actor holding the towers; each call encodes a batch of prepared videos."""

    def __init__(self, model: str, revision: str | None, spec: ModelSpec, dtype: str, device: str,
                 attn_implementation: str, budget, threads: int):
        import torch

        from qprep.models.checkpoint import open_checkpoint
        from qprep.pipeline.towers import Towers

        if device == "cpu":
            torch.set_num_threads(threads)
        self.device = device
        self.towers = Towers(open_checkpoint(model, revision), spec, dtype=dtype, device=device,
                             attn_implementation=attn_implementation, budget=budget)
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        metas = [json.loads(m) for m in batch["meta"]]
        hidden, levels = self.towers.hidden_size, self.towers.deepstack_levels
        empty = _storage(np.zeros((0, hidden), np.float32), self.towers.dtype_name)
        out = {"video": [empty] * len(metas), "audio": [empty] * len(metas)}
        if levels:
            out["deepstack"] = [_storage(np.zeros((0, levels, hidden), np.float32), self.towers.dtype_name)] * len(metas)
        ok = [i for i, meta in enumerate(metas) if meta["status"] == OK]
        for group in ([ok] if ok else []):
            try:
                self._encode(batch, group, out)
            except Exception:
                for i in group:  # find which video the towers cannot take; the others go on
                    try:
                        self._encode(batch, [i], out)
                    except Exception as exc:
                        metas[i].update(status=FAILED, error=f"tower stage: {exc!r}", error_code=TOWER_ERROR)
        for meta in metas:
            meta["device"] = self.device
        return {"task": list(batch["task"]), "meta": [json.dumps(m) for m in metas], **out}

    def _encode(self, batch, rows: list[int], out: dict[str, list]) -> None:
        import torch

        from qprep.pipeline.towers import AudioInput, VideoInput
        from qprep.store.reader import to_storage

        self.calls += 1
        video, audio = out["video"], out["audio"]
        inputs = [VideoInput(torch.from_numpy(np.asarray(batch["patches"][i])), tuple(int(v) for v in batch["grid"][i]))
                  for i in rows]
        for i, features in zip(rows, self.towers.video_features(inputs)):
            video[i] = to_storage(features.tokens)
            if features.deepstack is not None:  # [levels, n, d] → the store's row order [n, levels, d]
                out["deepstack"][i] = to_storage(features.deepstack.transpose(0, 1))
        with_audio = [i for i in rows if len(batch["windows"][i])]
        if with_audio and self.towers.audio_tower is not None:
            inputs = [AudioInput(torch.from_numpy(np.asarray(batch["mel"][i])),
                                 tuple(int(n) for n in batch["windows"][i])) for i in with_audio]
            for i, tokens in zip(with_audio, self.towers.encode_audio(inputs)):
                audio[i] = to_storage(tokens)


def _storage(values: np.ndarray, dtype: str) -> np.ndarray:
    from qprep.store.layout import STORAGE_DTYPES

    return values.astype(STORAGE_DTYPES[dtype])

