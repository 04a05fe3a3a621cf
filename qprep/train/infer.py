"""`qprep infer`: answers from the cache with the base language model and, optionally, a LoRA adapter.

No tower is loaded and no video decoded. Each prompt is rendered by the tokenizer's chat template
(a user turn: the video, then the question; then the assistant's turn opened), its video block is
laid out exactly as in training (the family's `video_block`), the cached tokens are
scattered into the placeholders and the prompt's positions come from the model's own
`get_rope_index` (`qprep.train.model.LanguageModel`). Decoding is greedy with a KV cache, one video
at a time, and stops at the checkpoint's end-of-sequence tokens; its loop (`decode`) is also what GRPO
samples its completions with (`qprep.train.rollout`).

Positions of generated tokens follow transformers' `generate` (5.23), which passes explicit
`[text; temporal; height; width]` positions and advances them as `last + 1` on every row
(`GenerationMixin._update_model_kwargs_for_generation`). That is not the model's own `rope_deltas`
rule (largest prompt position + 1, used by a plain forward with a cache and no positions): for
Qwen2.5-VL, whose `get_rope_index` starts text after a video at start + max(h, w)/2, the last
prompt position can sit below the video's largest temporal position, and the two rules then give
different positions to every generated token. Omni places text after the largest position, and the
two agree.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qprep.datasets.grounding import CAPTIONS_PROMPT as DENSE_CAPTION_PROMPT  # the seed recipe's (LongVALE)
from qprep.errors import SettingsError
from qprep.schemas.dtypes import compute_dtype

# A grounding question per true sentence (LongVALE's, `longvalellm/eval/eval.py`, asking for seconds).
GROUNDING_PROMPT = ("At which time interval can we find {sentence} taking place in the video? "
                    "Give the timestamps in seconds, in the format: From xx to xx.")
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class InferSummary:
    answers: int
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason → ids
    new_tokens: int = 0
    seconds: float = 0.0


@dataclass
class Request:
    id: str
    conversation: list[dict]  # chat-template messages up to the answer to generate
    media: tuple[str, ...] | None = None  # cached entries in placeholder order; None: the one video `id`

    def __post_init__(self):
        if self.media is None:
            self.media = (self.id,)


def infer(cache_path: str | Path, model: str | None, out: str | Path, *, adapter: str | Path | None = None,
          ids: list[str] | None = None, data: str | Path | None = None, prompt: str | None = None,
          max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, device: str | None = None, dtype: str | None = None,
          grounding: bool = False, progress: bool = True, echo=print) -> InferSummary:
    """Write one JSON line `{"id", "answer"}` per chosen video to `out`.

    `model` None means the one the cache was extracted with. Videos: `ids`, or the records of `data`
    (a LongVALE-style file: each record's turns before its first answer are the prompt), or every
    video extracted ok. `prompt` replaces the question. `grounding`: one question per true sentence
    of `data` (any file `qprep eval` reads), answered as `{video_id}#{i}`; see `grounding_requests`.
    """
    from tqdm.auto import tqdm

    from qprep.models.checkpoint import open_checkpoint
    from qprep.store.reader import open_cache
    from qprep.train.data import left_out_lines
    from qprep.train.loop import check_cache_fits

    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or compute_dtype(device)
    cache = open_cache(cache_path)
    checkpoint = open_checkpoint(model or cache.model)
    checkpoint.require_tokenizer()
    check_cache_fits(cache, checkpoint)
    tokenizer = checkpoint.tokenizer()
    layout = checkpoint.family.prompt_layout(checkpoint, tokenizer)
    if grounding:
        if ids:
            raise SettingsError("--grounding asks about every sentence of --data; it takes no --ids")
        requests, skipped = grounding_requests(cache, data, prompt=prompt, layout=layout)
    else:
        requests, skipped = choose_requests(cache, ids=ids, data=data, prompt=prompt, layout=layout)
    for line in left_out_lines(skipped):
        echo(line)
    if not requests:
        raise SettingsError(f"no video to answer for in {cache.store.location} (the reasons are listed above); "
                            f"pass --ids or --data naming videos extracted ok (`qprep status` lists them)")
    generator = Generator(checkpoint, tokenizer, cache, adapter=adapter, dtype=dtype, device=device)
    summary = InferSummary(answers=0, skipped=skipped)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as handle:
        for request in tqdm(requests, desc="infer", unit="video", disable=not progress):
            tokens = generator.generate(request, max_new_tokens)
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            handle.write(json.dumps({"id": request.id, "answer": answer}, ensure_ascii=False) + "\n")
            handle.flush()  # answers written so far survive an interrupted run
            summary.answers += 1
            summary.new_tokens += len(tokens)
    summary.seconds = time.perf_counter() - started
    return summary


def choose_requests(cache, *, ids: list[str] | None = None, data: str | Path | None = None,
                    prompt: str | None = None, layout=None) -> tuple[list[Request], dict[str, list[str]]]:
    """The prompts to answer and, for a data file, the records left out (reason → ids). `layout`
    (the checkpoint's `PromptLayout`) decides which media a record may mix."""
    from qprep.train.data import VIDEO_MARK, load_records, messages, record_id, record_media, unusable_media

    question = [{"from": "human", "value": VIDEO_MARK + (prompt or DENSE_CAPTION_PROMPT)}]
    ok = set(cache.ids())
    if ids:
        unusable = [i for i in ids if i not in ok]
        if unusable:
            raise SettingsError(f"--ids: {', '.join(unusable)} not extracted ok in {cache.store.root} "
                                f"(`qprep status {cache.store.root}` lists what it holds)")
        return [Request(i, messages(question, [cache.row(i).kind])) for i in dict.fromkeys(ids)], {}
    if data is None:
        return [Request(i, messages(question, [cache.row(i).kind])) for i in cache.ids()], {}
    records = load_records(data)  # a path, or a `qprep.datasets.DataFile` naming its format and media
    requests, skipped = [], {reason: list(names) for reason, names in getattr(records, "skipped", {}).items()}
    for index, record in enumerate(records):
        name, media = record_id(record, index), record_media(record)
        reason = unusable_media(media, cache, ok, None if layout is None else layout.audio)
        if reason:
            skipped.setdefault(reason, []).append(name)
            continue
        try:
            conversation = messages(question if prompt else record["conversations"],
                                    [cache.row(medium).kind for medium in media])
        except SettingsError as exc:
            skipped.setdefault(f"bad conversation: {exc}", []).append(name)
            continue
        answers = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
        requests.append(Request(name, conversation[: answers[0]] if answers else conversation, media))
    return requests, skipped


def grounding_requests(cache, data: str | Path | None, *, prompt: str | None = None,
                       layout=None) -> tuple[list[Request], dict[str, list[str]]]:
    """A grounding question for each true sentence of `data` (an annotation dict as Charades-STA,
    ActivityNet or LongVALE publish it, or any data file `qprep eval` reads), id `{video_id}#{i}` as
    `qprep eval` reads it. `prompt` is the question's template, `{sentence}` standing for the sentence;
    the sentence is put as LongVALE's evaluator puts it (stripped, lower case, without its final
    period). A record that is a grounding sample already carries its question: `--data` alone asks it."""
    from qprep.eval.grounding import query_id
    from qprep.eval.truth import load_truth
    from qprep.train.data import VIDEO_MARK, messages, unusable_media

    if data is None:
        raise SettingsError("--grounding asks about the sentences of --data; pass --data")
    template = prompt or GROUNDING_PROMPT
    if "{sentence}" not in template:
        raise SettingsError(f"--prompt {template!r}: a grounding question needs {{sentence}} where the sentence goes")
    problems: list[str] = []
    truth = load_truth(data, problems)
    skipped: dict[str, list[str]] = {"records without true segments": problems} if problems else {}
    ok, requests = set(cache.ids()), []
    for video_id, item in truth.items():
        if item.query or len(item.media) != 1:
            reason = ("grounding samples already (answer their own questions: --data without --grounding)"
                      if item.query else "not one video to ask about")
            skipped.setdefault(reason, []).append(video_id)
            continue
        reason = unusable_media(item.media, cache, ok, None if layout is None else layout.audio)
        for index, segment in enumerate(item.segments):
            name = query_id(video_id, index)
            if reason:
                skipped.setdefault(reason, []).append(name)
                continue
            sentence = segment.text.strip().lower().removesuffix(".")
            question = template.replace("{sentence}", sentence)
            requests.append(Request(name, messages([{"from": "human", "value": VIDEO_MARK + question}]),
                                    media=item.media))
    return requests, skipped


class Generator:
    """The language model (with the adapter, if any) answering from cached tokens."""

    def __init__(self, checkpoint, tokenizer, cache, *, adapter=None, dtype: str = "float32", device: str = "cpu"):
        from qprep.schemas.towers import MERGER_INPUT
        from qprep.train.merger import MERGER_FILE
        from qprep.train.model import LanguageModel

        self.tokenizer, self.cache, self.device = tokenizer, cache, device
        self.layout = checkpoint.family.prompt_layout(checkpoint, tokenizer)
        self.stop = stop_ids(checkpoint, tokenizer)
        self.model = LanguageModel(checkpoint, dtype=dtype, device=device,
                                   merger=cache.level == MERGER_INPUT).eval()
        if adapter is not None and (Path(adapter) / MERGER_FILE).is_file():  # trained beside the adapter
            if self.model.mergers is None:
                raise SettingsError(f"--adapter {adapter} holds a trained merger; {cache.store.location} holds "
                                    f"merged tokens, made by the checkpoint's own merger. Answer from a store "
                                    f"extracted with --level merger-input")
            self.model.mergers.load(adapter)
        self.adapter = load_adapter(self.model, adapter) if adapter is not None else None  # LoRA layers go in place

    def prompt_ids(self, request: Request) -> list[int]:
        """The rendered prompt with its media's blocks in place (as training lays them out)."""
        from qprep.train.data import prompt_ids

        return prompt_ids(request.conversation, [self.cache.row(medium) for medium in request.media], self.tokenizer,
                          self.layout)

    def batch(self, request: Request):
        from qprep.train.data import IGNORE, Sample, collate, videos_heard

        input_ids = self.prompt_ids(request)
        audio = videos_heard([self.cache.row(medium) for medium in request.media], self.layout)
        sample = Sample(id=request.id, input_ids=input_ids, labels=[IGNORE] * len(input_ids), media=request.media,
                        has_audio=audio)
        return collate([sample], self.cache, self.layout).to(self.device)

    @torch.inference_mode()
    def generate(self, request: Request, max_new_tokens: int, scores: list | None = None) -> list[int]:
        """Greedy new token ids (the end-of-sequence token included when reached); see `greedy`."""
        return greedy(self.model, self.batch(request), max_new_tokens, self.stop, scores)


def greedy(model, batch, max_new_tokens: int, stop: set[int], scores: list | None = None,
           all_done=None) -> list[int]:
    """Greedy decoding with a KV cache from a `Batch` of one prompt, as `generate(do_sample=False)`.
    With `scores`, each step's logits [1, vocab] are appended to it (`all_done`: see `decode`)."""
    return decode(model, batch, max_new_tokens, stop, lambda logits: logits.argmax(-1), scores=scores,
                  all_done=all_done)[0]


def decode(model, batch, max_new_tokens: int, stop: set[int], choose, *, copies: int = 1,
           scores: list | None = None, all_done=None) -> list[list[int]]:
    """Decoding with a KV cache from a `Batch` of one unpadded prompt: `copies` continuations side by
    side, each to its first end-of-sequence token (included) or `max_new_tokens`. The prompt runs
    once; its cache is then copied for each continuation. `choose(logits [copies, vocab])` picks each
    step's next tokens [copies] (greedy: the argmax; `qprep.train.rollout`: a seeded draw). With
    `scores`, each step's logits are appended to it. `all_done(done)`, for processes that decode in
    step (a sharded model, each of whose forwards is a collective): whether every process's
    continuations are done, given this one's; each decodes until all are (tokens past a
    continuation's end are dropped, and its draws came after every kept one)."""
    from transformers import DynamicCache

    if batch.input_ids.shape[0] != 1 or not bool(batch.attention_mask.all()):
        raise ValueError("decode takes one unpadded prompt at a time")
    text_model = model.language_model
    cache = DynamicCache(config=model.config.get_text_config())
    batch = model.merged(batch)  # from the merger's input: the mergers run once, for the prompt
    positions = prompt_positions(model, batch)
    embeds = model.embed(batch)
    extra = model.text_inputs(batch)  # the prompt step only: later steps hold no visual position
    # transformers renamed the text models' `past_key_values` to `cache` (the old name warns, then goes)
    cache_kwarg = "cache" if "cache" in inspect.signature(text_model.forward).parameters else "past_key_values"
    tokens: list[torch.Tensor] = []
    finished = torch.zeros(copies, dtype=torch.bool, device=positions.device)
    stops = torch.tensor(sorted(stop), device=positions.device)
    for step in range(max_new_tokens):
        # one unpadded prompt: no attention mask, as generate drops an all-ones one
        hidden = text_model(inputs_embeds=embeds, position_ids=positions, use_cache=True,
                            **{cache_kwarg: cache}, **extra).last_hidden_state
        extra = {}
        # The last position only (VL's generate does the same; the Omni thinker multiplies the whole
        # prompt, gigabytes of logits for a long video, and keeps the last row: another matmul shape).
        logits = model.lm_head(hidden[:, -1:])[:, -1]
        if step == 0 and copies > 1:  # the prompt's cache (attention keys and linear-attention states) per copy
            cache.reorder_cache(torch.zeros(copies, dtype=torch.long, device=positions.device))
            logits, positions = logits.expand(copies, -1), positions.expand(-1, copies, -1)
        if scores is not None:
            scores.append(logits)
        chosen = choose(logits)
        tokens.append(chosen)
        finished |= torch.isin(chosen, stops)
        done = bool(finished.all())
        if all_done(done) if all_done is not None else done:
            break
        embeds = text_model.get_input_embeddings()(chosen[:, None])
        positions = positions[..., -1:] + 1  # generate's rule: the last position + 1, on every row
    return [_until_stop(row, stop) for row in torch.stack(tokens, dim=1).tolist()] if tokens else [[]] * copies


def _until_stop(tokens: list[int], stop: set[int]) -> list[int]:
    """A continuation up to its first end-of-sequence token, included (a finished row's later tokens
    are the side-by-side decoding's, not its own)."""
    end = next((i for i, token in enumerate(tokens) if token in stop), None)
    return tokens if end is None else tokens[: end + 1]


def prompt_positions(model, batch) -> torch.Tensor:
    """[text; temporal; height; width] positions of the prompt, as `generate` builds them: the 1-D text
    positions (for the attention mask) on top of the model's own 3-D ones."""
    text = (batch.attention_mask.long().cumsum(-1) - 1).masked_fill(batch.attention_mask == 0, 0)
    return torch.cat([text[None], model.position_ids(batch)], dim=0)


def stop_ids(checkpoint, tokenizer) -> set[int]:
    """The checkpoint's end-of-sequence ids (its generation config), else the tokenizer's."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(checkpoint.source, revision=checkpoint.revision).eos_token_id
    except OSError:
        eos = None
    eos = tokenizer.eos_token_id if eos is None else eos
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def load_adapter(model, adapter: str | Path):
    """Put a LoRA adapter saved by `qprep train` (peft's format) into the language model, in place."""
    from peft import PeftModel

    adapter = check_adapter_folder(adapter)
    from qprep.train.lora import no_tower_warning

    try:
        with no_tower_warning():
            return PeftModel.from_pretrained(model, str(adapter)).eval()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise SettingsError(f"--adapter {adapter} does not fit the model: {str(exc).splitlines()[0]}") from exc


def check_adapter_folder(adapter: str | Path) -> Path:
    """`adapter` as a path, refused unless it holds an adapter as `qprep train` writes it (peft's
    config and safetensors weights)."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise SettingsError(f"--adapter {adapter}: no adapter_config.json there (expected a folder written by "
                            f"`qprep train`, e.g. run/adapter or run/checkpoint-*)")
    if not (adapter / "adapter_model.safetensors").is_file():  # peft would fall back to unpickling a .bin
        raise SettingsError(f"--adapter {adapter}: no adapter_model.safetensors there; qprep loads weights "
                            f"from safetensors only")
    return adapter
