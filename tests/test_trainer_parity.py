"""`qprep train` from the cache, step for step against transformers' `Trainer` on the raw videos.

The reference is the seed's training path: the full model (the Omni thinker, Qwen2.5-VL, Qwen2-VL) under peft,
fed by its processor on plainly decoded frames (and the whole sound track), `Trainer` with
`TrainingArguments` left at their defaults but for the recipe's batch size, accumulation and
learning rate. Both start from the same adapter (LoRA dropout 0) and see the same samples in the
same order (qprep's planned order, which the Trainer gets through a sequential sampler over one
pass of both epochs: the same optimizer steps, since no step spans qprep's epoch end). Samples have
unequal numbers of label tokens, so token-weighted and batch-weighted accumulation differ.

Every micro-batch's loss, every step's learning rate and gradient norm, and the final adapter are
compared bit for bit: the forward and the LoRA gradients are bitwise the full model's
(tests/test_train_parity.py), and clipping, AdamW and the schedule are the same library calls on the
same values, in the same parameter order.
"""

from __future__ import annotations

import json

import pytest
import torch

from qprep.models.checkpoint import open_checkpoint
from qprep.schemas.training import LoraSettings, TrainSettings
from qprep.train.loop import train
from reference import full_model
from test_train_parity import answer_labels, processor_inputs

ANSWERS = {"a": ["A bar moves.", "Something happens in the video at the start, then it ends."],
           "b": ["Two.", "The bar goes across the frame once and then the video is quiet for a while."]}


def write_records(path) -> str:
    records = [{"id": video_id, "conversations": [{"from": "human", "value": "<video> what happens"},
                                                  {"from": "gpt", "value": answer}]}
               for video_id, answers in ANSWERS.items() for answer in answers]
    path.write_text(json.dumps(records))
    return str(path)


def planned_samples(cache, data, model_dir, settings):
    """qprep's samples in the order its planner visits them over the whole run."""
    from qprep.train.data import build_dataset, load_records
    from qprep.train.loader import plan

    checkpoint = open_checkpoint(model_dir)
    tokenizer = checkpoint.tokenizer()  # as `qprep train` reads it: a release's template may sit beside it
    dataset = build_dataset(load_records(data), cache, tokenizer, checkpoint.family.prompt_layout(checkpoint, tokenizer))
    batches = plan(dataset.samples, seed=settings.seed, batch_size=1, epochs=settings.epochs)
    return [dataset.samples[batch.samples[0]] for batch in batches]


def initial_adapter(model_dir, settings):
    """The adapter `qprep train` starts from (seeded as it seeds it)."""
    from peft import get_peft_model_state_dict

    from qprep.train.lora import apply_lora
    from qprep.train.model import LanguageModel

    torch.manual_seed(settings.seed)
    model = apply_lora(LanguageModel(open_checkpoint(model_dir), dtype="float32"), settings.lora)
    return {name: value.clone() for name, value in get_peft_model_state_dict(model).items()}


def trainer_run(model_dir, cache, samples, settings, omni: bool, tmp_path):
    """transformers' Trainer on the raw videos: (micro-batch losses, per-step lr used, grad norms, adapter)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    videos = cache.store.root.parent / "videos"
    items = []
    for sample in samples:
        row = cache.row(sample.id)
        said = _decoded(model_dir, sample.labels)
        answer = next(answer for answer in ANSWERS[sample.id] if answer in said)
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        processor, inputs = processor_inputs(model_dir, videos / row.path, conversation, row.frame_indices,
                                             row.sample_fps, omni=omni)
        assert inputs["input_ids"][0].tolist() == sample.input_ids
        # a release keeps its template beside the processor (chat_template.json), not in the tokenizer
        processor.tokenizer.chat_template = processor.tokenizer.chat_template or processor.chat_template
        labels = answer_labels(inputs["input_ids"], processor.tokenizer)
        assert labels[0].tolist() == sample.labels
        items.append({**inputs, "labels": labels, **({"use_audio_in_video": True} if omni else {})})

    model = get_peft_model(full_model(model_dir), LoraConfig(
        r=settings.lora.r, lora_alpha=settings.lora.alpha, lora_dropout=0.0,
        target_modules=settings.lora.target_regex(open_checkpoint(model_dir).family.lora_targets)))
    set_peft_model_state_dict(model, initial_adapter(model_dir, settings))

    record = {"parts": [], "lr": [], "grad_norm": []}

    class Seen(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            record["lr"].append(optimizer.param_groups[0]["lr"])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "grad_norm" in logs:
                record["grad_norm"].append(logs["grad_norm"])

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            record["parts"].append(float(loss))
            return loss

    arguments = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=1,
        gradient_accumulation_steps=settings.grad_accum, num_train_epochs=1, learning_rate=settings.lr,
        lr_scheduler_type=settings.lr_scheduler, warmup_steps=settings.warmup_steps, weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = InOrder(model=model, args=arguments, train_dataset=items, data_collator=lambda batch: batch[0],
                      callbacks=[Seen()])
    trainer.train()
    return record, get_peft_model_state_dict(model)


def _decoded(model_dir, labels: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).decode([label for label in labels if label >= 0])


CASES = {
    # the seed's Trainer: everything at its defaults (linear decay, no decay, clip at 1.0)
    "trainer defaults": dict(),
    # cosine with warmup, weight decay, and clipping low enough to fire
    "cosine, warmup, decay, clipping": dict(lr_scheduler="cosine", warmup_steps=2, weight_decay=0.1,
                                             max_grad_norm=0.5),
}


# kind -> the store fixture, and how the Trainer weighs the batches of a step: it token-weights only
# for model classes that take loss kwargs (the Omni thinker; Qwen2-VL's, whose forward takes **kwargs
# and which does not say otherwise); Qwen2.5-VL's sets accepts_loss_kwargs = False, so it weighs
# every batch the same.
STORES = {"qwen2_5_omni": ("omni_store", "tokens"), "qwen2_5_vl": ("vl_train_store", "batches"),
          "qwen2_vl": ("qwen2_vl_store", "tokens")}


@pytest.mark.parametrize(("kind", "case"), [(kind, case) for kind in ("qwen2_5_omni", "qwen2_5_vl") for case in CASES]
                         + [("qwen2_vl", "trainer defaults")])
def test_qprep_train_steps_as_the_trainer_on_the_raw_videos(request, kind, case, tmp_path):
    omni = kind == "qwen2_5_omni"
    store, weighting = STORES[kind]
    model_dir, cache = request.getfixturevalue(store)
    settings = TrainSettings(epochs=2, lr=5e-2, batch_size=1, grad_accum=2, seed=1, workers=0,
                             gradient_checkpointing=False, loss_weighting=weighting,
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0), **CASES[case])
    data = write_records(tmp_path / "train.json")
    samples = planned_samples(cache, data, model_dir, settings)
    assert len({len([x for x in s.labels if x >= 0]) for s in samples}) > 1  # unequal answers

    train(cache.store.root, data, model_dir, tmp_path / "run", settings, progress=False, echo=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    theirs, adapter = trainer_run(model_dir, cache, samples, settings, omni, tmp_path)

    steps = [row for row in rows if "step_loss" in row]
    assert len(steps) == len(theirs["lr"]) == 4
    parts = theirs["parts"]
    assert [row["step_loss"] for row in steps] == [parts[2 * i] + parts[2 * i + 1] for i in range(4)]
    assert [row["lr"] for row in steps] == theirs["lr"]
    assert [row["grad_norm"] for row in steps] == theirs["grad_norm"]
    if "max_grad_norm" in CASES[case]:
        assert max(theirs["grad_norm"]) > settings.max_grad_norm  # clipping fired
    from safetensors.torch import load_file

    ours = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == adapter.keys()
    for name in ours:
        assert torch.equal(ours[name], adapter[name]), name


def test_token_weighted_accumulation_gives_the_gradient_of_one_batch_holding_both(omni_store):
    """Micro-batches of 10 and 100 label tokens, each's summed loss over the step's 110 tokens, give the
    gradient of the two samples in one padded batch (its mean over the same 110 tokens). The padded
    batch sums in other shapes, so the two agree to rounding: within 1e-5 of the largest gradient
    entry (measured: about 1e-7)."""
    from transformers import AutoTokenizer

    from qprep.train.data import Sample, collate
    from qprep.train.lora import apply_lora
    from qprep.train.model import LanguageModel
    from qprep.train.optim import label_tokens

    model_dir, cache = omni_store
    checkpoint = open_checkpoint(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    layout = checkpoint.family.prompt_layout(checkpoint, tokenizer)
    torch.manual_seed(0)
    model = apply_lora(LanguageModel(checkpoint, dtype="float32"), LoraSettings(r=4, alpha=8, dropout=0.0))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.02)

    def sample(video_id: str, answer_tokens: int) -> Sample:
        from qprep.train.data import messages, tokenize, with_media_blocks

        conversation = messages([{"from": "human", "value": "<video> hi"}, {"from": "gpt", "value": "x"}])
        text, labels = tokenize(conversation, tokenizer, layout.turn_end_id)
        ids, labels, _ = with_media_blocks(text, labels, [cache.row(video_id)], layout)
        # the template ends "x" <|im_end|> "\n": repeat the "x" to make the answer (and <|im_end|>) that long
        x = ids[-3]
        body = ids[:-3] + [x] * (answer_tokens - 1) + ids[-2:]
        body_labels = labels[:-3] + [x] * (answer_tokens - 1) + labels[-2:]
        return Sample(video_id, body, body_labels, has_audio=True)

    short, long = sample("a", 10), sample("b", 100)
    assert (label_tokens(short.labels), label_tokens(long.labels)) == (10, 100)

    def gradients(batches, items):
        model.zero_grad()
        for batch in batches:
            model(collate(batch, cache, layout), num_items_in_batch=items)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    apart = gradients([[short], [long]], 110)
    together = gradients([[short, long]], None)
    scale = max(float(g.abs().max()) for g in together.values())
    gap = max(float((apart[n] - together[n]).abs().max()) for n in apart) / scale
    print(f"micro-batches against one batch: largest gradient gap {gap:.2g} of the largest entry")
    assert gap <= 1e-5
    # weighing the batches alike instead is another gradient, by far
    model.zero_grad()
    for batch in ([short], [long]):
        (model(collate(batch, cache, layout))[0] / 2).backward()
    alike = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert max(float((alike[n] - together[n]).abs().max()) for n in alike) > 1e-2 * scale


def test_biases_and_norms_get_no_weight_decay_as_in_the_trainer(tiny_model, tmp_path):
    """The optimizer's groups against a real Trainer's `get_decay_parameter_names`, on a language model
    whose every parameter trains (norms and biases among them)."""
    from transformers import Trainer, TrainingArguments

    from qprep.train.model import LanguageModel
    from qprep.train.optim import build_optimizer

    model = LanguageModel(open_checkpoint(tiny_model("qwen2_5_vl")), dtype="float32")
    settings = TrainSettings(weight_decay=0.1)
    optimizer = build_optimizer(model, settings)
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    expected = set(trainer.get_decay_parameter_names(model))
    assert {names[id(p)] for p in decayed["params"]} == expected and decayed["weight_decay"] == 0.1
    assert {names[id(p)] for p in plain["params"]} == set(names.values()) - expected and plain["weight_decay"] == 0
    assert any("norm" in names[id(p)] for p in plain["params"]) and any("bias" in names[id(p)] for p in plain["params"])
    assert type(optimizer) is type(trainer.create_optimizer())
