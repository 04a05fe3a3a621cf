"""The two stages of an extraction: the CPU stage (one call per video, in a Ray task or a worker
process) and the tower stage (a Ray Data actor, one per GPU or one CPU actor, or the driver itself).

A video that cannot be prepared becomes a failed row with its cause, and the run goes on. What
moves between the stages is `qprep.extraction.rows`: `Prepared`, then `Encoded`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import traceback
from pathlib import Path

import numpy as np

from qprep.errors import INTERNAL_ERROR, TOWER_ERROR, FileNameError, UnreadableFileError, VideoError
from qprep.extraction.discover import VideoFile
from qprep.extraction.rows import Encoded, Prepared, batch_columns, batch_rows, video_of
from qprep.schemas.settings import ModelSpec, VideoSettings
from qprep.schemas.towers import MERGED, TowerThreads

CPU_STAGE_TRIES = 3  # a video whose worker process dies this many times is recorded as failed
# A tower batch whose actor dies this many times (the actor is restarted each time) is given up and
# its videos recorded as failed: without a bound Ray Data retries it forever, and one video that
# crashes the towers would loop the run.
TOWER_BATCH_TRIES = 3


def cpu_stage(item: dict, **job) -> dict:
    """`prepare_video` as a Ray Data map: an input row in, a `Prepared` row out."""
    return prepare_video(video_of(item), **job).to_ray()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache  # once per process
def keep_freed_memory() -> None:
    """Have this worker process keep the memory one video's buffers free for the next video, rather
    than hand it back to the kernel.

    One video's CPU stage allocates and frees some 200 MB (its audio window padded to the model's
    300 s: waveform, spectrum, mel; its frames). glibc gives blocks that large back to the kernel as
    soon as they are freed (mmap, heap trimming), so the next video faults every page in again:
    measured on bench/extract.py's clips, 51,000 page faults a video and a third of the CPU stage's
    time spent in the kernel. Served from a heap that is never trimmed, the same buffers are reused;
    the worker's resident memory stays at one video's high-water mark. Not glibc: left as it is.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: blocks up to 32 MB from the heap
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    mallopt(_M_TOP_PAD, 64 << 20)  # grow the heap in large steps


def prepare_video(video: VideoFile, *, videos_dir: str, settings: VideoSettings, spec: ModelSpec) -> Prepared:
    """Hash, probe, sample, decode, resize and patchify one video; featurize its audio. An image:
    hash, read, resize and patchify it (`qprep.pipeline.image`). An audio file: hash, decode and
    featurize it (`qprep.pipeline.audio.read_audio_file`)."""
    import torch

    from qprep.extraction.discover import content_hash
    from qprep.pipeline.prepare import prepare

    torch.set_num_threads(1)  # one CPU per task: parallelism comes from many tasks
    keep_freed_memory()
    out = Prepared.empty(video, spec.patch_dim, spec.audio.feature_size)
    path = video.location(videos_dir)
    try:
        if video.bad_name:  # recorded, never opened: its id could not name it faithfully
            raise FileNameError(video.path, video.bad_name)
        out.row.content_hash = content_hash(path)
        if video.kind == "image":
            _prepare_image(out, path, spec)
            return out
        if video.kind == "audio":
            _prepare_audio_file(out, path, entry_settings(video, settings), spec)
            return out
        prepared = prepare(path, entry_settings(video, settings), spec, threads=1)
    except VideoError as exc:
        out.row.fail(exc.cause, exc.code)
    except OSError as exc:
        out.row.fail(f"cannot read the file: {exc.strerror or exc}", UnreadableFileError.code)
    except Exception as exc:  # a qprep bug must not stop 7,000 videos: record it loudly instead
        out.row.fail(f"internal error: {exc!r}\n{traceback.format_exc(limit=4)}", INTERNAL_ERROR)
    else:
        grid = prepared.video_grid_thw[0].tolist()
        out.row.describe(prepared.metadata, grid, prepared.mel_length)
        out.patches, out.grid = prepared.patches.numpy(), tuple(grid)
        if prepared.input_features is not None:
            out.mel = prepared.mel_frames().numpy()
            out.mel_chunks = tuple(prepared.feature_attention_mask.sum(-1).tolist())
    return out


def entry_settings(video: VideoFile, settings: VideoSettings) -> VideoSettings:
    """The settings of one entry: a window's are the run's with its `video_start`/`video_end`,
    sampled and time-stamped exactly as those global settings are."""
    if video.window_start is None:
        return settings
    return dataclasses.replace(settings, video_start=video.window_start, video_end=video.window_end)


def _prepare_image(out: Prepared, path: Path, spec: ModelSpec) -> None:
    from qprep.pipeline.image import prepare_image

    image = prepare_image(path, spec)
    out.row.describe_image(image)
    out.patches, out.grid = image.patches.numpy(), image.grid_thw


def _prepare_audio_file(out: Prepared, path: Path, settings: VideoSettings, spec: ModelSpec) -> None:
    """An audio file's mel frames, as a video's track's: the tower stage encodes both alike."""
    from qprep.pipeline.audio import read_audio_file

    audio = read_audio_file(str(path), spec.audio, settings)
    out.row.describe_audio(len(audio.waveform) / spec.audio.sampling_rate, audio.windows, audio.mel_length)
    out.mel = audio.mel_frames().numpy()
    out.mel_chunks = tuple(audio.feature_attention_mask.sum(-1).tolist())


class TowerStage:
    """The towers, loaded once; each call encodes a batch of prepared videos."""

    def __init__(self, model: str, revision: str | None, spec: ModelSpec, dtype: str, device: str,
                 attn_implementation: str, budget, threads: int | None = None, arrivals=None, level: str = MERGED):
        """`threads`: the torch threads of every CPU call; None: by kind, from the cores of the machine
        the towers run on (`TowerThreads.for_cores`). Each call sets them and gives them back, so the
        process's own count is left as it was."""
        from qprep.extraction.executors import usable_cores
        from qprep.models.checkpoint import open_checkpoint
        from qprep.pipeline.towers import Towers

        self.device = device
        self.threads = TowerThreads.for_cores(usable_cores(), threads) if device == "cpu" else None
        self.towers = Towers(open_checkpoint(model, revision), spec, dtype=dtype, device=device,
                             attn_implementation=attn_implementation, budget=budget, level=level)
        self.calls = 0
        self.arrivals = arrivals  # Ray: the `cluster.TowerArrivals` actor of the run

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        """Ray Data's form: a batch of `Prepared` rows in, `Encoded` rows out. The batch's videos
        are reported as arrived before the towers run, so that a batch that kills the actor counts."""
        prepared = [Prepared.from_ray(row) for row in batch_rows(batch)]
        if self.arrivals is not None:
            import ray

            ray.get(self.arrivals.add.remote([item.video.id for item in prepared]))
        return batch_columns([result.to_ray() for result in self.encode(prepared)])

    def encode(self, prepared: list[Prepared]) -> list[Encoded]:
        """The tower outputs of each video (empty ones for a failed video); a video the towers
        cannot take is recorded failed and the others go on."""
        out = [Encoded(item.row, self._empty_tokens()) for item in prepared]
        ok = [i for i, item in enumerate(prepared) if item.ok]
        for group in ([ok] if ok else []):
            try:
                self._encode(prepared, group, out)
            except Exception:
                for i in group:  # find which video the towers cannot take; the others go on
                    try:
                        self._encode(prepared, [i], out)
                    except Exception as exc:
                        out[i].row.fail(f"tower stage: {exc!r}", TOWER_ERROR)
        for result in out:
            result.row.device = self.device
            if result.row.ok:
                result.row.tower_threads = self._threads(result.row.kind)
        return out

    def _threads(self, kind: str) -> int | None:
        """The torch threads of a call on `kind` media (None on a GPU: as they are)."""
        return self.threads.of(kind) if self.threads else None

    def _empty_tokens(self) -> dict[str, np.ndarray]:
        from qprep.schemas.dtypes import storage_dtype
        from qprep.schemas.towers import MERGER_INPUT

        hidden, levels = self.towers.hidden_size, self.towers.deepstack_levels
        visual = self.towers.merger_input_shape if self.towers.level == MERGER_INPUT else (hidden,)
        dtype = storage_dtype(self.towers.dtype_name)
        tokens = {"video": np.zeros((0, *visual), dtype), "audio": np.zeros((0, hidden), dtype)}
        if levels:
            tokens["deepstack"] = np.zeros((0, levels, *visual), dtype)
        return tokens

    def _encode(self, prepared: list[Prepared], rows: list[int], out: list[Encoded]) -> None:
        import torch

        from qprep.pipeline.towers import AudioInput, VideoInput, torch_threads
        from qprep.schemas.dtypes import to_storage

        self.calls += 1
        for kind, encode in (("video", self.towers.video_features), ("image", self.towers.image_features)):
            of_kind = [i for i in rows if prepared[i].row.kind == kind]
            if not of_kind:
                continue
            inputs = [VideoInput(torch.from_numpy(prepared[i].patches), prepared[i].grid) for i in of_kind]
            with torch_threads(self._threads(kind)):
                encoded = encode(inputs)
            for i, features in zip(of_kind, encoded):
                out[i].tokens["video"] = to_storage(features.tokens)  # an image's tokens share the video arrays
                if features.deepstack is not None:  # [levels, n, ...] → the store's row order [n, levels, ...]
                    out[i].tokens["deepstack"] = to_storage(features.deepstack.transpose(0, 1))
        with_audio = [i for i in rows if prepared[i].mel_chunks]
        if with_audio and self.towers.audio_tower is not None:
            inputs = [AudioInput(torch.from_numpy(prepared[i].mel), prepared[i].mel_chunks) for i in with_audio]
            with torch_threads(self._threads("audio")):
                encoded_audio = self.towers.encode_audio(inputs)
            for i, tokens in zip(with_audio, encoded_audio):
                out[i].tokens["audio"] = to_storage(tokens)
