"""Human and JSON renderings of what qprep did, shared by the commands."""

from __future__ import annotations

import json

from qprep.pipeline.prepare import PreparedVideo


def prepared_summary(prepared: PreparedVideo) -> dict:
    """The facts about one prepared video a person or a script wants, as plain JSON values."""
    meta = prepared.metadata
    t, h, w = prepared.video_grid_thw[0].tolist()
    return {
        **meta.to_dict(),
        "video_grid_thw": [t, h, w],
        "patches": int(prepared.patches.shape[0]),
        "video_tokens": t * h * w // prepared.spec.merge_size**2,
        "mel_length": prepared.mel_length,
    }


def format_prepared(prepared: PreparedVideo) -> str:
    meta, s = prepared.metadata, prepared_summary(prepared)
    times = meta.frame_times
    lines = [
        f"{meta.path}",
        f"  video     {meta.codec} {meta.width}x{meta.height} rotation {meta.rotation}°, {meta.frame_count} frames "
        f"at {meta.native_fps:.3f} fps, {meta.duration:.2f} s",
        f"  sampled   {len(times)} frames at {meta.sample_fps:.4f} fps ({times[0]:.2f}–{times[-1]:.2f} s), "
        f"second_per_grid {meta.second_per_grid:.4f}",
        f"  vision    resized to {meta.resized_width}x{meta.resized_height}, grid_thw {s['video_grid_thw']}, "
        f"{s['patches']} patches → {s['video_tokens']} tokens",
    ]
    if meta.has_audio:
        lines.append(f"  audio     {meta.audio_seconds:.2f} s, {prepared.mel_length} mel frames in "
                     f"{meta.audio_windows} window(s)")
    else:
        lines.append(f"  audio     none ({meta.audio_note})")
    return "\n".join(lines)


def to_json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=False)
