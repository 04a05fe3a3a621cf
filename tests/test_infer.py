"""`qprep infer`: greedy answers from the cache equal transformers' `generate` on the raw video through
its own processor, with the same adapter applied by peft; the CLI writes one answer per id."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoProcessor, AutoTokenizer
from transformers.video_utils import VideoMetadata

from qprep import open_cache
from qprep.cli import main
from qprep.extraction.run import ExtractOptions, extract
from qprep.models.checkpoint import open_checkpoint
from qprep.models.tiny import QWEN3_KINDS
from qprep.schemas.settings import VideoSettings, load_model_spec
from qprep.schemas.training import LoraSettings, TrainSettings
from qprep.synth import VideoSpec, make_video
from qprep.train.infer import DENSE_CAPTION_PROMPT, Generator, choose_requests, prompt_positions
from qprep.train.loop import train
from reference import full_model, plain_audio_decode, plain_decode
from test_train_loop import write_data

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def adapter(omni_store, tmp_path_factory):
    """A LoRA adapter trained a few steps on the tiny Omni store (lr high enough to move the answers)."""
    model_dir, cache = omni_store
    root = tmp_path_factory.mktemp("infer-run")
    settings = TrainSettings(epochs=2, lr=5e-2, grad_accum=1, workers=0, gradient_checkpointing=False,
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    train(cache.store.root, write_data(root / "train.json"), model_dir, root / "run", settings, progress=False,
          echo=lambda _: None)
    return root / "run" / "adapter"


def raw_inputs(model_dir, path, row, question: str, omni: bool, metadata: VideoMetadata | None = None):
    """transformers' processor on the raw video (plainly decoded frames, the whole audio track), with the
    assistant's turn opened, as one calls `generate`. `metadata`: by default the sampled frames at
    their sampling rate (what the Qwen2.5 processors read)."""
    processor = AutoProcessor.from_pretrained(model_dir)
    spec = load_model_spec(model_dir)
    frames, _ = plain_decode(path)
    chosen = np.stack([frames[i] for i in row.frame_indices])
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    metadata = metadata or VideoMetadata(total_num_frames=len(chosen), fps=row.sample_fps,
                                         frames_indices=list(range(len(chosen))))
    kwargs = dict(text=[text], videos=[chosen], video_metadata=[metadata], do_sample_frames=False,
                  size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}, return_tensors="pt")
    if omni:
        kwargs.update(audio=[plain_audio_decode(path)], load_audio_from_video=True, audio_from_video_indices=[0])
    if type(processor).__name__ == "Qwen3OmniMoeProcessor":
        kwargs["fps"] = row.sample_fps  # its only source of the video's time (video_second_per_grid)
    return processor(**kwargs)


def generated(model, inputs, stop: set[int], **kwargs) -> tuple[list[int], tuple, tuple]:
    """transformers' greedy `generate`: the new token ids, each step's logits, and the hidden states
    `lm_head` multiplied at each step."""
    lm_head = model.get_output_embeddings()
    multiplied: list = []
    hook = lm_head.register_forward_hook(lambda module, args, output: multiplied.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=sorted(stop),
                                 output_logits=True, return_dict_in_generate=True, **kwargs)
    finally:
        hook.remove()
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), out.logits, (multiplied, lm_head.weight)


def reordered_sum_bound(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """How far apart two float32 evaluations of `hidden @ weight.T` may lie when their kernels sum the
    K products in different orders: each is within γ_K·(|hidden|·|weight|ᵀ) of the exact value, with
    γ_K = K·u/(1 − K·u), u = 2⁻²⁴ (Higham, Accuracy and Stability of Numerical Algorithms, §3.1)."""
    k, u = hidden.shape[-1], 2.0 ** -24
    return 2 * (k * u / (1 - k * u)) * (hidden.abs().double() @ weight.abs().double().T)


def assert_same_steps(ours: tuple[list[int], list], theirs: tuple[list[int], tuple, tuple], what: str,
                      whole_prompt_head: bool = False) -> None:
    """The same tokens, and every step's logits bit for bit (a position off by a few ids moves the logits
    of a tiny random model by ~1e-3 without always changing its argmax).

    `whole_prompt_head`: the reference multiplied the whole prompt by `lm_head` and kept the last row,
    where qprep multiplies the last row alone: another matmul shape, whose kernel may sum in another
    order, so the first step's logits are held to the rounding bound of that sum instead. Later steps
    multiply one row on both sides and stay bitwise."""
    assert ours[0] == theirs[0], what
    assert len(ours[1]) == len(theirs[1]) == len(ours[0])
    multiplied, weight = theirs[2]
    for step, (mine, reference) in enumerate(zip(*(ours[1], theirs[1]))):
        if step == 0 and whole_prompt_head:
            gap = (mine.double() - reference.double()).abs()
            bound = reordered_sum_bound(multiplied[0][:, -1], weight)
            assert bool((gap <= bound).all()), f"{what}: first logits {float((gap - bound).max()):.3g} past the bound"
        else:
            assert torch.equal(mine, reference), f"{what}: logits of new token {step}"


def assert_answers_equal_generate(ours, base, model, cache, model_dir, ids, *, omni, metadata=None,
                                  whole_prompt_head: bool = False) -> None:
    """For each id: qprep's prompt ids are the processor's, its greedy tokens and logits `generate`'s
    on the raw video (`omni(row)`: with its audio; `metadata(path, row)`: what the processor is
    told of the video), and the adapter changes the answer."""
    videos = cache.store.root.parent / "videos"
    for request in choose_requests(cache, ids=ids)[0]:
        row = cache.row(request.id)
        path = videos / row.path
        with_audio = omni(row)
        inputs = raw_inputs(model_dir, path, row, DENSE_CAPTION_PROMPT, omni=with_audio,
                            metadata=metadata(path, row) if metadata else None)
        assert ours.prompt_ids(request) == inputs["input_ids"][0].tolist()
        answer = ours_with_logits(ours, request)
        kwargs = {"use_audio_in_video": True} if with_audio else {}
        assert_same_steps(answer, generated(model, inputs, ours.stop, **kwargs), request.id,
                          whole_prompt_head=whole_prompt_head)
        assert answer[0] != base.generate(request, NEW_TOKENS), "the adapter must change the answer"


def ours_with_logits(generator, request) -> tuple[list[int], list]:
    scores: list = []
    return generator.generate(request, NEW_TOKENS, scores), scores


def test_greedy_answers_from_the_cache_equal_generate_on_the_raw_video_with_the_same_adapter(omni_store, adapter):
    from peft import PeftModel

    model_dir, cache = omni_store
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = Generator(open_checkpoint(model_dir), tokenizer, cache, adapter=adapter)
    base = Generator(open_checkpoint(model_dir), tokenizer, cache)
    thinker = PeftModel.from_pretrained(full_model(model_dir), str(adapter)).eval()
    # The thinker computes lm_head over the whole prompt and keeps the last row; qprep multiplies the
    # last row alone (a long prompt's full logits would take gigabytes).
    assert_answers_equal_generate(ours, base, thinker, cache, model_dir, ["a", "b"], omni=lambda row: True,
                                  whole_prompt_head=True)


@pytest.fixture(scope="module")
def long_vl_store(tiny_model, tmp_path_factory):
    """A VL store of a 10 s clip sampled at 4 frames: 5 s per temporal patch."""
    root = tmp_path_factory.mktemp("infer-vl")
    make_video(root / "videos" / "long.mp4", VideoSpec(width=64, height=64, fps=10, seconds=10))
    extract(root / "videos", root / "store.zarr", str(tiny_model("qwen2_5_vl")), VideoSettings(num_frames=4),
            dtype="float32", shards=1, options=ExtractOptions(progress=False, executor="local"))
    return str(tiny_model("qwen2_5_vl")), open_cache(root / "store.zarr")


def test_vl_generated_tokens_continue_from_the_last_prompt_position_as_generate_does(long_vl_store):
    """Qwen2.5-VL places text after a video at start + max(h, w)/2: here the prompt's last position is
    below the video's largest temporal one, so `rope_deltas` (largest + 1) and `generate` (last + 1)
    disagree; qprep follows `generate`."""
    model_dir, cache = long_vl_store
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = Generator(open_checkpoint(model_dir), tokenizer, cache)
    request = choose_requests(cache, ids=["long"], prompt="Hi")[0][0]
    positions = prompt_positions(ours.model, ours.batch(request))
    assert int(positions[1:, 0, -1].max()) < int(positions[1:].max())  # the case where the rules differ
    row = cache.row("long")
    inputs = raw_inputs(model_dir, cache.store.root.parent / "videos" / row.path, row, "Hi", omni=False)
    assert ours.prompt_ids(request) == inputs["input_ids"][0].tolist()
    assert_same_steps(ours_with_logits(ours, request), generated(full_model(model_dir), inputs, ours.stop),
                      "long")


def test_cli_infer_writes_one_answer_per_id(omni_store, adapter, tmp_path):
    model_dir, cache = omni_store
    out = tmp_path / "answers.jsonl"
    base = ["infer", "--cache", str(cache.store.root), "--max-new-tokens", "4", "--quiet"]
    result = CliRunner().invoke(main, base + ["--adapter", str(adapter), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == cache.ids() == ["a", "b"]
    assert all(isinstance(line["answer"], str) for line in lines)

    data = write_data(tmp_path / "test.json")  # a, b and the broken video
    result = CliRunner().invoke(main, base + ["--model", model_dir, "--data", data, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "left out 1: video failed extraction (broken)" in result.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]

    result = CliRunner().invoke(main, base + ["--ids", "broken", "--out", str(out)])
    assert result.exit_code == 3 and "broken not extracted ok" in result.output
    result = CliRunner().invoke(main, base + ["--adapter", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 3 and "no adapter_config.json" in result.output


@pytest.mark.parametrize("kind", QWEN3_KINDS)
def test_qwen3_answers_from_the_cache_equal_generate_with_the_true_metadata_and_the_same_adapter(qwen3_store, kind,
                                                                                                   tmp_path):
    """Trained from the cache (time stamps in the prompt; Qwen3-VL: deepstack levels at the visual
    positions; Qwen3.5: its linear-attention states carried in the cache), then answered from it: the
    same tokens and logits as the full model's `generate` on the raw video, its processor given the
    true video metadata, with the same adapter applied by peft."""
    from test_train_parity import true_metadata

    model_dir, cache = qwen3_store(kind)
    train_then_answer_as_generate(model_dir, cache, tmp_path,
                                  metadata=lambda path, row: true_metadata(path, row.frame_indices))


def test_qwen2_vl_answers_from_the_cache_equal_generate_with_the_same_adapter(qwen2_vl_store, tmp_path):
    """The released checkpoint (its image bounds, 3136–12845056 pixels a frame, sizing video and
    recorded in the store's config), trained from the cache, then answered from it: the same tokens
    and logits as the full model's `generate` on the raw video, with the same adapter applied by peft.
    Positions carry no time: `generate` continues from the prompt's with its `rope_deltas`."""
    model_dir, cache = qwen2_vl_store
    assert (cache.config["preprocessor"]["min_pixels"], cache.config["preprocessor"]["max_pixels"]) == (3136, 12845056)
    train_then_answer_as_generate(model_dir, cache, tmp_path)


def train_then_answer_as_generate(model_dir, cache, tmp_path, metadata=None) -> None:
    """Train a few steps from the cache of a store without audio (videos a and b), then check the
    answers from it against the full model's `generate` with the same adapter (`metadata`: what the
    processor is told of each video, see `assert_answers_equal_generate`)."""
    from peft import PeftModel

    settings = TrainSettings(epochs=2, lr=5e-2, grad_accum=1, workers=0, gradient_checkpointing=False,
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    train(cache.store.root, write_data(tmp_path / "train.json"), model_dir, tmp_path / "run", settings,
          progress=False, echo=lambda _: None)
    adapter = tmp_path / "run" / "adapter"
    checkpoint = open_checkpoint(model_dir)
    tokenizer = checkpoint.tokenizer()  # as `qprep infer` reads it: a release's template may sit beside it
    ours = Generator(checkpoint, tokenizer, cache, adapter=adapter)
    base = Generator(checkpoint, tokenizer, cache)
    model = PeftModel.from_pretrained(full_model(model_dir), str(adapter)).eval()
    assert_answers_equal_generate(ours, base, model, cache, model_dir, ["a", "b"], omni=lambda row: False,
                                  metadata=metadata)


def test_qwen3_omni_answers_from_the_cache_equal_the_thinkers_generate_with_the_same_adapter(qwen3_omni_store,
                                                                                              tmp_path):
    """Trained from the cache of the released checkpoint (audio and video merged by time; deepstack
    levels; a video without sound in the same run), then answered from it: the same tokens and
    logits as the full thinker's `generate` on the raw video with its audio, the same adapter applied by peft."""
    from peft import PeftModel

    model_dir, cache = qwen3_omni_store
    data = [{"id": video_id, "conversations": [{"from": "human", "value": "<video> what happens"},
                                               {"from": "gpt", "value": f"From 0 to 1, event {video_id}."}]}
            for video_id in ("a", "b", "c")]
    (tmp_path / "train.json").write_text(json.dumps(data))
    settings = TrainSettings(epochs=2, lr=5e-2, batch_size=2, grad_accum=1, workers=0, gradient_checkpointing=False,
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    summary = train(cache.store.root, tmp_path / "train.json", model_dir, tmp_path / "run", settings,
                    progress=False, echo=lambda _: None)
    assert summary.steps == 4  # per epoch: a and b in one batch, c (no audio) in its own
    adapter = tmp_path / "run" / "adapter"
    checkpoint = open_checkpoint(model_dir)
    ours = Generator(checkpoint, checkpoint.tokenizer(), cache, adapter=adapter)
    base = Generator(checkpoint, checkpoint.tokenizer(), cache)
    thinker = PeftModel.from_pretrained(full_model(model_dir), str(adapter)).eval()
    adapted = {name.split(".lora_")[0] for name, _ in thinker.named_parameters() if ".lora_" in name}
    assert adapted and all(".language_model.layers." in name for name in adapted), "LoRA in the language model only"
    assert [bool(cache.row(i).audio_length) for i in ("a", "b", "c")] == [True, True, False]
    assert_answers_equal_generate(ours, base, thinker, cache, model_dir, ["a", "b", "c"],
                                  omni=lambda row: bool(row.audio_length), whole_prompt_head=True)
