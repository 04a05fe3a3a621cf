"""The merger-input level: a store one step earlier in the vision tower, and the merger run (frozen or
trained) by the trainer.

References are transformers' own: the full model loaded with `from_pretrained` (tests/reference.py),
its vision tower called on the checkpoint's own processor's pixels, and its `get_video_features`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor

from qprep import open_cache
from qprep.extraction.run import ExtractOptions, extract
from qprep.models.checkpoint import open_checkpoint
from qprep.schemas.settings import VideoSettings
from qprep.synth import VideoSpec, make_video
from qprep.train.merger import Merger
from reference import full_model, reference_pixels

# every family whose vision tower has a merger, in the hub's released layout
MERGER_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_omni_moe")
CLIP = dict(width=160, height=120, fps=25, seconds=2)
LOCAL = ExtractOptions(progress=False, executor="local")


@pytest.fixture(scope="module")
def stores(tiny_model, tmp_path_factory):
    """`stores(kind)` → (model dir, video path, merged cache, merger-input cache), built once per kind."""
    made: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("merger")
    video = make_video(root / "videos" / "a.mp4", VideoSpec(**CLIP))

    def get(kind: str):
        if kind not in made:
            model_dir = str(tiny_model(kind, "released"))
            caches = []
            for level in ("merged", "merger-input"):
                out = root / f"{kind}-{level}.zarr"
                extract(root / "videos", out, model_dir, VideoSettings(fps=2), dtype="float32", shards=1,
                        level=level, options=LOCAL)
                caches.append(open_cache(out))
            made[kind] = (model_dir, video, *caches)
        return made[kind]

    return get


def vision_tower(model):
    return next(module for module in model.modules() if hasattr(module, "merger") and hasattr(module, "blocks"))


@pytest.mark.parametrize("kind", MERGER_KINDS)
def test_stored_merger_input_is_the_full_models_and_merges_to_the_merged_store(stores, kind):
    """What the store holds is the full model's vision transformer state for the processor's pixels
    (and the input of every deepstack merger), bit for bit; the checkpoint's merger, loaded alone, turns
    it into the merged store's tokens (and deepstack levels), bit for bit, and into the full model's
    `get_video_features`."""
    model_dir, video, merged, merger_input = stores(kind)
    row, cached, tokens = merger_input.row("a"), merger_input["a"], merged["a"]
    assert merger_input.level == "merger-input" and merged.level == "merged"
    assert merger_input.store.fingerprint != merged.store.fingerprint
    reference = full_model(model_dir)
    visual = vision_tower(reference)
    pixels = reference_pixels(video, row.frame_indices, AutoProcessor.from_pretrained(model_dir))
    grid = pixels["video_grid_thw"]
    with torch.inference_mode():
        output = visual(pixels["pixel_values_videos"], grid, output_hidden_states=True)
        features = reference.get_video_features(pixels["pixel_values_videos"], grid)
    unit, width = cached.video_tokens.shape[1:]
    assert torch.equal(cached.video_tokens.reshape(-1, width), output.last_hidden_state)
    checkpoint = open_checkpoint(model_dir)
    order = checkpoint.family.merger_order(row.grid_thw, checkpoint.model_config().vision_config)
    if checkpoint.family.window_attention:  # the clip spans several windows: the order is not the identity
        assert not torch.equal(order, torch.arange(len(order)))
    merger = Merger(checkpoint)
    with torch.inference_mode():
        ours = merger.merged(cached.video_tokens, order)
    assert torch.equal(ours, tokens.video_tokens)
    assert torch.equal(ours, features.pooler_output[0])
    indexes = getattr(visual.config, "deepstack_visual_indexes", None) or []
    assert (cached.deepstack is not None) == bool(indexes) == (tokens.deepstack is not None)
    if indexes:
        for level, index in enumerate(indexes):  # hidden_states[i + 1]: the output of block i
            assert torch.equal(cached.deepstack[level].reshape(-1, width), output.hidden_states[index + 1])
        with torch.inference_mode():
            levels = merger.deepstack(cached.deepstack, order)
        assert torch.equal(levels, tokens.deepstack)
        assert torch.equal(levels, torch.stack([level[0] for level in features.deepstack_features]))


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_status_gives_the_bytes_per_merged_token_at_each_level(stores, kind):
    """Both levels' cost per merged token (deepstack levels included), as each store's arrays hold it."""
    from qprep.store.status import format_status, store_status

    _, _, merged, merger_input = stores(kind)
    levels = 1 + merged.deepstack_levels
    expected = {"merged": merged["a"].video_tokens[0].numel() * 4 * levels,
                "merger-input": merger_input["a"].video_tokens[0].numel() * 4 * levels}
    for cache in (merged, merger_input):
        report = store_status(cache.store.root)
        assert report["bytes_per_token"] == expected and report["level"] == cache.level
        assert f"level        {cache.level}" in format_status(report)
