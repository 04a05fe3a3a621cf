"""The merger-input level: a store one step earlier in the vision tower, and the merger run (frozen or
trained) by the trainer.

References are transformers' own: the full model loaded with `from_pretrained` (tests/reference.py),
its vision tower called on the checkpoint's own processor's pixels, and its `get_video_features`.
"""

from __future__ import annotations

import json
from pathlib import Path

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
MERGER_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe",
                "qwen3_omni_moe")
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


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])  # Qwen2-VL names its vision width embed_dim
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


TRAINED = [("qwen2_5_vl", "released"), ("qwen3_vl", "released")]  # window order; deepstack levels


def _merger_input_paths(tiny_model, videos, kind, layout):
    """test_train_parity's two paths (the full model on the processor's output, qprep's language model
    on cached tokens), with the cache side holding the merger's input and the model its mergers."""
    import dataclasses

    import qprep
    from qprep.pipeline.towers import Towers, VideoInput
    from qprep.schemas.settings import load_model_spec
    from qprep.train.model import LanguageModel
    from test_train_parity import CLIP as TRAIN_CLIP, OMNI, _both_paths

    full, inputs, model_kwargs, labels, _, batch = _both_paths(tiny_model, videos, kind, layout)
    model_dir = tiny_model(kind, layout)
    checkpoint = open_checkpoint(model_dir)
    prepared = qprep.preprocess_video(videos("train-clip.mp4", **TRAIN_CLIP), model_dir, fps=2, audio=kind in OMNI)
    towers = Towers(checkpoint, load_model_spec(model_dir), dtype="float32", device="cpu", level="merger-input")
    grid = tuple(prepared.video_grid_thw[0].tolist())
    features = towers.video_features([VideoInput(prepared.patches, grid)])[0]
    assert features.tokens.dim() == 3
    # (clones: the towers' inference-mode tensors cannot enter autograd; the store's tensors are plain)
    batch = dataclasses.replace(batch, video_tokens=features.tokens.clone(),
                                deepstack=None if features.deepstack is None else features.deepstack.clone(),
                                merger_order=checkpoint.family.merger_order(grid,
                                                                            checkpoint.model_config().vision_config))
    language_model = LanguageModel(checkpoint, dtype="float32", merger=True)
    return full, dict(inputs, labels=labels, **model_kwargs), language_model, batch


def merger_gradients(ours, theirs) -> tuple[dict, dict]:
    """The mergers' gradients on both sides, by the tower's own parameter names."""
    from qprep.train.merger import Merger

    mergers = next(module for module in ours.modules() if isinstance(module, Merger))
    visual = vision_tower(theirs)
    mine = {f"{part}.{name}": p.grad for part, module in mergers.parts.items() for name, p in module.named_parameters()}
    reference = {f"{part}.{name}": p.grad for part in mergers.parts
                 for name, p in getattr(visual, part).named_parameters()}
    return mine, reference


@pytest.mark.parametrize(("kind", "layout"), TRAINED)
def test_trained_merger_gets_the_full_models_loss_logits_and_gradients(tiny_model, videos, kind, layout):
    """The merger trained beside the LoRA: from the cached merger input and on transformers' full model
    (raw video through its processor, the vision blocks frozen, the merger and the same adapter
    trainable), the loss, the logits, every LoRA gradient and every merger gradient are the same, exactly."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from qprep.train.lora import LoraSettings, apply_lora
    from qprep.train.merger import train_merger

    full, full_inputs, language_model, batch = _merger_input_paths(tiny_model, videos, kind, layout)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    ours = apply_lora(language_model, settings)
    generator = torch.Generator().manual_seed(0)
    for name, parameter in ours.named_parameters():
        if "lora_B" in name:  # non-zero B, so that A gets gradients too
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.02
    assert train_merger(ours, "full")
    theirs = get_peft_model(full, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=settings.target_regex(language_model.family.lora_targets),
                                             exclude_modules=settings.tower_regex()))
    set_peft_model_state_dict(theirs, get_peft_model_state_dict(ours))
    visual = vision_tower(theirs)
    visual.merger.requires_grad_(True)
    for deepstack in getattr(visual, "deepstack_merger_list", None) or []:
        deepstack.requires_grad_(True)
    loss, logits = ours(batch)
    expected = theirs(**full_inputs, use_cache=False)
    assert torch.equal(logits, expected.logits) and torch.equal(loss, expected.loss)
    loss.backward()
    expected.loss.backward()
    lora_mine = {n: p.grad for n, p in ours.named_parameters() if "lora_" in n}
    lora_reference = {n: p.grad for n, p in theirs.named_parameters() if "lora_" in n}
    assert lora_mine.keys() == lora_reference.keys() and lora_mine
    for name, gradient in lora_mine.items():
        assert torch.equal(gradient, lora_reference[name]), name
    mine, reference = merger_gradients(ours, theirs)
    assert mine.keys() == reference.keys()
    assert len(mine) == sum(1 for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n)
    for name, gradient in mine.items():
        assert gradient is not None and torch.equal(gradient, reference[name]), name
    # the main merger and the first deepstack merger move the loss (the tiny model's last deepstack
    # level gets a zero gradient from transformers' full model too)
    assert all(gradient.abs().sum() > 0 for name, gradient in mine.items()
               if name.startswith(("merger.", "deepstack_merger_list.0.")))


@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory):
    """A Qwen2.5-VL store of the merger's input (videos a and b), and a run that trained the merger
    beside the LoRA on it: (model dir, cache, run folder)."""
    from qprep.schemas.training import LoraSettings, TrainSettings
    from qprep.train.loop import train
    from test_train_loop import write_data

    root = tmp_path_factory.mktemp("merger-run")
    for name, seconds in (("a", 2), ("b", 3)):
        make_video(root / "videos" / f"{name}.mp4", VideoSpec(width=112, height=84, fps=25, seconds=seconds,
                                                              audio=False))
    model_dir = str(tiny_model("qwen2_5_vl"))  # the layout with the chat template the processor reads
    extract(root / "videos", root / "store.zarr", model_dir, VideoSettings(fps=2), dtype="float32", shards=1,
            level="merger-input", options=LOCAL)
    settings = TrainSettings(epochs=2, lr=5e-2, grad_accum=1, workers=0, gradient_checkpointing=False,
                             train_merger="full", merger_lr=2e-2, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    cache = open_cache(root / "store.zarr")
    train(cache.store.root, write_data(root / "train.json"), model_dir, root / "run", settings, progress=False,
          echo=lambda _: None)
    return model_dir, cache, root / "run"


def test_the_trained_merger_is_saved_under_the_checkpoints_key_names_and_resumes(trained_run):
    """merger.safetensors beside the adapter and in each checkpoint: the checkpoint's own key names,
    other values than the checkpoint's (it trained); a resumed run's model takes it back."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from qprep.train.checkpoints import restore_adapter
    from qprep.train.lora import LoraSettings, apply_lora
    from qprep.train.merger import MERGER_FILE, train_merger
    from qprep.train.model import LanguageModel

    model_dir, _, run = trained_run
    saved = load_file(str(run / "adapter" / MERGER_FILE))
    original = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            original.update({key: handle.get_tensor(key) for key in handle.keys() if "visual.merger." in key})
    assert saved.keys() == original.keys() and saved
    assert any(not torch.equal(saved[key], original[key]) for key in saved)
    checkpoint_dir = sorted(run.glob("checkpoint-*"))[-1]
    assert (checkpoint_dir / MERGER_FILE).is_file()
    model = apply_lora(LanguageModel(open_checkpoint(model_dir), merger=True), LoraSettings(r=4, alpha=8, dropout=0.0))
    train_merger(model, "full")
    restore_adapter(checkpoint_dir, model)
    restored = model.base_model.model.mergers.checkpoint_state()
    written = load_file(str(checkpoint_dir / MERGER_FILE))
    assert all(torch.equal(restored[key], written[key]) for key in written)


def test_a_run_from_an_adapter_with_a_trained_merger_starts_from_both(trained_run, tmp_path):
    """`--adapter` of a run that trained the merger: a run that trains it too starts from the saved merger
    as well as the LoRA; one that leaves the merger frozen is refused (its adapter would lose it)."""
    import dataclasses

    from safetensors.torch import load_file

    from qprep.errors import SettingsError
    from qprep.schemas.training import LoraSettings, TrainSettings
    from qprep.train.checkpoints import StartingAdapter
    from qprep.train.lora import apply_lora
    from qprep.train.loop import train
    from qprep.train.merger import MERGER_FILE, train_merger, trained_merger
    from qprep.train.model import LanguageModel
    from test_train_loop import write_data

    model_dir, cache, run = trained_run
    settings = TrainSettings(epochs=1, grad_accum=1, workers=0, gradient_checkpointing=False, train_merger="full",
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0), adapter=str(run / "adapter"))
    checkpoint = open_checkpoint(model_dir)
    model = apply_lora(LanguageModel(checkpoint, merger=True), settings.lora)
    train_merger(model, "full")
    StartingAdapter.check(run / "adapter", settings, checkpoint.family.lora_targets).load(model)
    saved, loaded = load_file(str(run / "adapter" / MERGER_FILE)), trained_merger(model).checkpoint_state()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)

    with pytest.raises(SettingsError, match="holds a trained merger"):
        train(cache.store.root, write_data(tmp_path / "train.json"), model_dir, tmp_path / "frozen",
              dataclasses.replace(settings, train_merger="none"), progress=False, echo=lambda _: None)


def test_infer_with_the_trained_merger_equals_generate_on_the_full_model_with_it(trained_run):
    """`infer --adapter` from the cache (the trained merger run on the merger input) and transformers'
    `generate(do_sample=False)` on the raw video, the adapter applied by peft and the merger by
    `load_merger`: the same tokens, every step's logits bit for bit, and another answer than without them."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qprep.train.infer import Generator
    from qprep.train.merger import load_merger
    from test_infer import assert_answers_equal_generate

    model_dir, cache, run = trained_run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = Generator(open_checkpoint(model_dir), tokenizer, cache, adapter=run / "adapter")
    base = Generator(open_checkpoint(model_dir), tokenizer, cache)
    full = full_model(model_dir)
    before = vision_tower(full).merger.mlp[0].weight.clone()
    load_merger(full, run / "adapter")
    assert not torch.equal(before, vision_tower(full).merger.mlp[0].weight)
    model = PeftModel.from_pretrained(full, str(run / "adapter")).eval()
    assert_answers_equal_generate(ours, base, model, cache, model_dir, ["a", "b"], omni=lambda row: False)


def test_train_merger_on_a_store_of_merged_tokens_says_to_re_extract(stores, tmp_path):
    from qprep.errors import SettingsError
    from qprep.schemas.training import TrainSettings
    from qprep.train.loop import train
    from test_train_loop import write_data

    model_dir, _, merged, _ = stores("qwen3_vl")
    with pytest.raises(SettingsError, match="--level merger-input"):
        train(merged.store.root, write_data(tmp_path / "train.json"), model_dir, tmp_path / "run",
              TrainSettings(epochs=1, workers=0, train_merger="full"), progress=False, echo=lambda _: None)


def test_merger_lr_gives_the_mergers_their_own_learning_rate(tiny_model):
    """`merger_lr`: the trained merger's parameter groups at it, the LoRA's at `lr`; without it, all at `lr`."""
    from qprep.schemas.training import LoraSettings, TrainSettings
    from qprep.train.lora import apply_lora
    from qprep.train.merger import train_merger
    from qprep.train.model import LanguageModel
    from qprep.train.optim import build_optimizer

    model = apply_lora(LanguageModel(open_checkpoint(tiny_model("qwen2_5_vl")), merger=True),
                       LoraSettings(r=4, alpha=8, dropout=0.0))
    merger = {id(p) for p in train_merger(model, "full")}
    for merger_lr, expected in ((3e-3, 3e-3), (None, 1e-4)):
        optimizer = build_optimizer(model, TrainSettings(lr=1e-4, train_merger="full", merger_lr=merger_lr))
        lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        assert lrs.keys() == {id(p) for p in model.parameters() if p.requires_grad}
        assert {lrs[i] for i in merger} == {expected}
        assert {lr for i, lr in lrs.items() if i not in merger} == {1e-4}


@pytest.mark.parametrize("kind", ["qwen3_vl"])
def test_verify_checks_a_store_of_the_merger_input_against_transformers(stores, kind, tmp_path):
    """`qprep verify` on a store of the merger's input: through the checkpoint's merger, the tokens (and
    deepstack levels) equal transformers' `get_video_features` bit for bit; a corrupted row is named."""
    from test_verify import copy_store, run_verify, token_array

    _, _, _, merger_input = stores(kind)
    store = copy_store(merger_input, tmp_path)
    result = run_verify(store, "--json")
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in json.loads(result.stdout)["results"][0]["checks"]}
    assert checks["video_tokens"]["detail"] == "bit-exact"
    assert ("deepstack" in checks) == (kind == "qwen3_vl")
    array, rows = token_array(store, "a")
    values = array[rows]
    values[2] += 0.5
    array[rows] = values
    result = run_verify(store)
    assert result.exit_code != 0 and "FAIL  a: video_tokens" in result.output, result.output


def test_cli_level_is_the_stores_and_train_merger_needs_the_merger_input(stores, tmp_path):
    """`extract --level merger-input` over its own store is an up-to-date re-run, `--level merged` over it
    is refused (the level is in the fingerprint); `status` names the level; `train --train-merger full`
    on a store of merged tokens exits before any work, saying to re-extract."""
    from click.testing import CliRunner

    from qprep.cli import main
    from test_train_loop import write_data

    model_dir, video, merged, merger_input = stores("qwen3_vl")
    store = merger_input.store.root

    def extract_at(level: str):
        return CliRunner().invoke(main, ["extract", "--videos", str(video.parent), "--out", str(store), "--model",
                                         model_dir, "--dtype", "float32", "--level", level, "--quiet", "--json"])

    again = extract_at("merger-input")
    assert again.exit_code == 0 and json.loads(again.stdout)["up_to_date"] == 1, again.output
    refused = extract_at("merged")
    assert refused.exit_code != 0 and "level" in refused.output, refused.output
    status = CliRunner().invoke(main, ["status", str(store)])
    assert "level        merger-input" in status.output, status.output
    result = CliRunner().invoke(main, ["train", "--cache", str(merged.store.root), "--data",
                                       write_data(tmp_path / "train.json"), "--model", model_dir, "--out",
                                       str(tmp_path / "run"), "--train-merger", "full", "--quiet"])
    assert result.exit_code != 0 and "--level merger-input" in result.output, result.output
    assert not (tmp_path / "run" / "run.json").exists()
