"""Qwen3-VL / Qwen3.5 put time into the prompt as text: `<t seconds>` before each temporal patch.

qprep's block for a cached video equals the token ids `Qwen3VLProcessor` writes for the same frames
when it is given the true metadata (the stream's frame count and average rate, and the indices
sampled), for fps sampling, for the recipe's fixed 100 frames over a long clip, and for a
`video_start`/`video_end` window. On a variable-rate stream qprep's times are the frames' real
presentation times; the processor writes those only when handed them as the frame "indices" of a
1-fps stream, and with the true indices and the average rate it writes other (wrong) times.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoProcessor
from transformers.video_utils import VideoMetadata

import qprep
from qprep.models.checkpoint import open_checkpoint
from qprep.models.families.qwen3_vl import patch_times, time_stamp
from qprep.schemas.manifest import ManifestRow

CONVERSATION = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens"}]}]


@pytest.fixture(scope="module")
def qwen3(tiny_model):
    from transformers import AutoTokenizer

    model_dir = tiny_model("qwen3_vl")
    checkpoint = open_checkpoint(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model_dir, checkpoint.family.prompt_layout(checkpoint, tokenizer), AutoProcessor.from_pretrained(model_dir)


def stream_facts(path) -> tuple[int, float]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), float(stream.average_rate)


def ours(layout, processor, prepared) -> list[int]:
    """The chat template's ids with qprep's block for the prepared video in place."""
    from qprep.train.data import IGNORE, with_media_blocks

    text_ids = processor.tokenizer(processor.apply_chat_template(CONVERSATION, tokenize=False))["input_ids"]
    row = ManifestRow(id="v", path="v.mp4", grid_thw=prepared.video_grid_thw[0].tolist(),
                      frame_times=list(prepared.metadata.frame_times))
    return with_media_blocks(text_ids, [IGNORE] * len(text_ids), [row], layout)[0]


def theirs(processor, prepared, metadata: VideoMetadata) -> list[int]:
    """The processor's ids for frames of the prepared size and count (their pixels do not change the text)."""
    meta = prepared.metadata
    frames = np.zeros((len(meta.frame_indices), meta.resized_height, meta.resized_width, 3), np.uint8)
    inputs = processor(text=[processor.apply_chat_template(CONVERSATION, tokenize=False)], videos=[frames],
                       video_metadata=[metadata], do_sample_frames=False, do_resize=False, return_tensors="pt")
    assert inputs["video_grid_thw"].tolist() == prepared.video_grid_thw.tolist()
    return inputs["input_ids"][0].tolist()


def true_metadata(path, prepared) -> VideoMetadata:
    total, fps = stream_facts(path)
    return VideoMetadata(total_num_frames=total, fps=fps, frames_indices=list(prepared.metadata.frame_indices))


CASES = {
    "fps sampling": (dict(width=96, height=64, fps=30, seconds=5), dict(fps=2)),
    "100 frames over a long clip": (dict(width=64, height=64, fps=24, seconds=95), dict(num_frames=100)),
    "a window": (dict(width=96, height=64, fps=25, seconds=8), dict(fps=2, video_start=1.3, video_end=6.1)),
    "a 29.97 fps stream": (dict(width=96, height=64, fps=30000 / 1001, seconds=4), dict(fps=2)),
}


@pytest.mark.parametrize("case", CASES)
def test_the_time_text_is_the_processors_given_the_true_metadata(qwen3, videos, case):
    model_dir, layout, processor = qwen3
    clip, settings = CASES[case]
    path = videos(f"time-{case.replace(' ', '-')}.mp4", audio=False, **clip)
    prepared = qprep.preprocess_video(path, model_dir, audio=False, **settings)
    assert ours(layout, processor, prepared) == theirs(processor, prepared, true_metadata(path, prepared))


def test_a_hundred_frames_carry_their_real_times(qwen3, videos):
    """The recipe's fixed 100 frames over 95 s: each stamp is the real time of its frames (about
    0.95 s apart), not the frame's index over the sampling rate or over 24 fps."""
    model_dir, layout, processor = qwen3
    clip, settings = CASES["100 frames over a long clip"]
    path = videos("time-100-frames-over-a-long-clip.mp4", audio=False, **clip)
    prepared = qprep.preprocess_video(path, model_dir, audio=False, **settings)
    times = patch_times(prepared.metadata.frame_times, 2)
    indices = prepared.metadata.frame_indices
    assert len(times) == 50
    assert times == [(indices[i] / 24 + indices[i + 1] / 24) / 2 for i in range(0, 100, 2)]
    assert 93.0 < times[-1] < 95.0
    text = processor.tokenizer.decode(ours(layout, processor, prepared))
    assert text.count(" seconds>") == 50 and time_stamp(times[-1]) in text


def test_a_variable_rate_stream_gets_its_frames_real_times(qwen3, videos):
    model_dir, layout, processor = qwen3
    path = videos("time-vfr.mp4", width=96, height=64, fps=30, seconds=4, vfr=True, audio=False)
    prepared = qprep.preprocess_video(path, model_dir, audio=False, fps=2)
    real = VideoMetadata(total_num_frames=len(prepared.metadata.frame_times), fps=1.0,
                         frames_indices=list(prepared.metadata.frame_times))
    assert ours(layout, processor, prepared) == theirs(processor, prepared, real)
    # the stream's average rate misplaces them: the upstream text differs
    assert ours(layout, processor, prepared) != theirs(processor, prepared, true_metadata(path, prepared))


def test_stamps_round_as_the_processor_prints_them():
    """`.1f` of the float mean: 0.25 (exact in binary) prints as 0.2, as Python rounds half to even."""
    assert patch_times([0.0, 0.5], 2) == [0.25] and time_stamp(0.25) == "<0.2 seconds>"
    assert patch_times([0.0, 0.5, 1.0], 2) == [0.25, 1.0]  # an odd count: the last frame repeated
    assert time_stamp(1.05) == "<1.1 seconds>"  # 1.05 is just above 1.05 in binary
