"""A checkpoint on disk or on the hub, and how to read only the parts qprep needs from it.

A checkpoint is a local HF-format directory or a hub id. Its `config.json` names the family
(`qprep.models.families`), which fixes where each part lives in the weight files and which
transformers classes build it. Only the safetensors files that hold the wanted weights are opened:
extracting never reads the language model or a talker, training never reads a tower.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qprep.errors import SettingsError
from qprep.models.families import FAMILIES, Family

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
# The files transformers reads a Qwen tokenizer from (every release ships all four): its settings (the
# special tokens, the media tokens' names the processors read), and its vocabulary in either form.
TOKENIZER_CONFIG = "tokenizer_config.json"
VOCABULARIES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: its family, configs and the files that hold each tower's weights."""

    source: str  # what the user passed (directory or hub id)
    family: Family
    config: dict  # config.json as written
    revision: str | None

    @property
    def tower_config(self) -> dict:
        return self.config[self.family.thinker_key] if self.family.thinker_key else self.config

    @property
    def has_audio(self) -> bool:
        return self.family.has_audio

    @property
    def merge_size(self) -> int:
        """Patches merged per side into one visual token."""
        return int(self.tower_config["vision_config"].get("spatial_merge_size", 2))

    @property
    def merger_input_shape(self) -> tuple[int, int]:
        """(merge², vision width): the merger's input rows for one merged token."""
        return self.family.merger_input_shape(self.tower_config["vision_config"])

    def require_tokenizer(self) -> None:
        """Refuse a checkpoint whose tokenizer files are missing, naming them.

        qprep writes every prompt as the tokenizer's ids, finds the media placeholders (image, video,
        audio tokens) by it, and builds the processor around it. transformers does not refuse: without
        the files it makes a tokenizer of one token, and what fails later says nothing of the files
        (the Omni processors: "Qwen2Tokenizer has no attribute image_token"; training: a placeholder
        id not in the prompt). Checked first by every command that reads the checkpoint.
        """
        missing = [] if self._has(TOKENIZER_CONFIG) else [TOKENIZER_CONFIG]
        if not any(all(self._has(name) for name in names) for names in VOCABULARIES):
            missing.append(" (or ".join(" and ".join(names) for names in VOCABULARIES) + ")")
        if missing:
            where = "the directory" if Path(self.source).is_dir() else "the hub repository"
            raise SettingsError(
                f"model {self.source}: tokenizer files missing from {where} {self.source}: {'; '.join(missing)}. "
                f"qprep needs the checkpoint's tokenizer to write prompts as token ids and to find the image, video "
                f"and audio placeholder tokens its processor inserts; copy the files from the released model")

    def _has(self, name: str) -> bool:
        try:
            self.file(name)
        except FileNotFoundError:
            return False
        return True

    def tokenizer(self):
        """The checkpoint's tokenizer, with the chat template its processor renders prompts with:
        some releases (Qwen3-Omni's) keep that template beside the processor (`chat_template.json`)
        rather than in `tokenizer_config.json`."""
        from transformers import AutoProcessor, AutoTokenizer

        self.require_tokenizer()
        tokenizer = AutoTokenizer.from_pretrained(self.source, revision=self.revision)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = getattr(AutoProcessor.from_pretrained(self.source, revision=self.revision),
                                              "chat_template", None)
        if tokenizer.chat_template is None:
            raise SettingsError(f"model {self.source}: no chat template (neither its tokenizer nor its processor has one)")
        return tokenizer

    def model_config(self):
        """The transformers config of the part holding the towers and the language model (the
        thinker's, for a full Omni checkpoint): what `get_rope_index` and the layout read."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.source, revision=self.revision)
        return getattr(config, self.family.thinker_key) if self.family.thinker_key else config

    @property
    def deepstack_levels(self) -> int:
        """Deepstack feature levels the vision tower returns beside its merged tokens (0: none)."""
        return self.family.deepstack_levels(self.model_config())

    @property
    def hidden_size(self) -> int:
        """Width of the merged visual tokens (= the language model's hidden size)."""
        return int(self.tower_config["vision_config"][self.family.merged_width_key])

    @property
    def dtype(self) -> str:
        """The dtype the checkpoint was saved in (what `--dtype auto` means)."""
        return str(self.config.get("dtype") or self.config.get("torch_dtype") or "float32")

    def file(self, name: str) -> Path:
        return fetch(self.source, name, self.revision)

    def weight_files(self, prefixes: tuple[str, ...]) -> dict[Path, list[str]]:
        """The safetensors files holding keys under the first prefix present, with those keys.
        Tower keys never count for another prefix (VL's `model.` must not take `model.visual.`)."""
        weight_map = self._weight_map()
        towers = self.family.vision_prefixes + self.family.audio_prefixes
        for prefix in prefixes:
            keys = sorted(key for key in weight_map if key.startswith(prefix)
                          and (prefix.startswith(towers) or not key.startswith(towers)))
            if keys:
                files: dict[Path, list[str]] = {}
                for key in keys:
                    files.setdefault(weight_map[key], []).append(key)
                return {self.file(name): names for name, names in sorted(files.items())}
        raise SettingsError(f"model {self.source}: no weights under {' or '.join(prefixes)} in its checkpoint; "
                            f"pass a checkpoint of a supported family as released (config.json + *.safetensors)")

    def identity(self, digests: dict[str, str] | None = None) -> dict[str, Any]:
        """What identifies the towers' output: the family, the tower configs and the tower weights.

        The weights are identified by a hash of the tower tensors' bytes (names, dtypes, shapes and
        data), so a copied or moved model keeps its identity and a retrained tower gets a new one.
        `digests` caches those hashes by (file, size, mtime) across runs; it is updated in place.
        """
        tower = self.tower_config
        configs = {key: tower.get(key) for key in ("vision_config", "audio_config") if key in tower}
        digest = hashlib.sha256()
        for prefixes in (self.family.vision_prefixes, self.family.audio_prefixes):
            if not prefixes:
                continue
            for path, keys in self.weight_files(prefixes).items():
                stat = path.stat()
                memo = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{keys[0]}|{len(keys)}"
                if digests is None or memo not in digests:
                    value = _tensor_digest(path, keys)
                    if digests is None:
                        digest.update(value.encode())
                        continue
                    digests[memo] = value
                digest.update(digests[memo].encode())
        return {"family": self.family.name, "towers": configs, "weights": digest.hexdigest()}

    def _weight_map(self) -> dict[str, str]:
        try:
            index = json.loads(self.file(WEIGHTS_INDEX).read_text())
            return dict(index["weight_map"])
        except FileNotFoundError:
            pass
        header = _safetensors_header(self.file(SINGLE_WEIGHTS))
        return {key: SINGLE_WEIGHTS for key in header if key != "__metadata__"}

    def config_files_key(self) -> list | None:
        """(name, size, mtime) of the local preprocessor config files: what a cached ModelSpec is
        valid for. None for a hub id (the hub decides what is current)."""
        directory = Path(self.source)
        if not directory.is_dir():
            return None
        names = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")
        return [[name, (stat := (directory / name).stat()).st_size, stat.st_mtime_ns]
                for name in names if (directory / name).is_file()]


def open_checkpoint(model: str | Path, revision: str | None = None) -> Checkpoint:
    """Resolve a local directory or hub id and recognise its family from `config.json`."""
    source = str(model)
    try:
        config = json.loads(fetch(source, "config.json", revision).read_text())
    except FileNotFoundError as exc:
        raise SettingsError(f"model {source}: no config.json ({exc}); pass the folder that holds config.json and "
                            f"the *.safetensors files") from exc
    except json.JSONDecodeError as exc:
        raise SettingsError(f"model {source}: config.json is not valid JSON ({exc})") from exc
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise SettingsError(f"model {source}: model_type {model_type!r} is not supported (qprep knows {known})")
    return Checkpoint(source=source, family=family, config=config, revision=revision)


def fetch(source: str, name: str, revision: str | None = None) -> Path:
    """A file of a checkpoint: from the directory, or downloaded (and cached) from the hub.

    Raises FileNotFoundError when the checkpoint has no such file.
    """
    directory = Path(source)
    if directory.is_dir():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(str(path))
        return path
    if directory.exists() or source.startswith((".", "/")) or source.count("/") != 1:
        raise SettingsError(f"model {source}: not a model directory, and not a hub id of the form owner/name")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(source, name, revision=revision))
    except LocalEntryNotFoundError as exc:  # offline, and not in the local hub cache
        raise SettingsError(f"model {source}: {name} is not in the local hub cache and the hub cannot be "
                            f"reached; download the model first or pass a local directory") from exc
    except EntryNotFoundError as exc:
        raise FileNotFoundError(f"{source}/{name}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SettingsError(f"model {source}: cannot fetch {name} from the hub ({exc})") from exc


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: every tensor's dtype, shape and byte range."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length))


def _tensor_digest(path: Path, keys: list[str]) -> str:
    """sha256 over the named tensors of a safetensors file (name, dtype, shape, bytes), reading
    only their byte ranges."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        base = 8 + length
        for key in keys:
            entry = header[key]
            digest.update(f"{key}|{entry['dtype']}|{entry['shape']}|".encode())
            start, end = entry["data_offsets"]
            handle.seek(base + start)
            remaining = end - start
            while remaining:
                block = handle.read(min(remaining, 1 << 24))
                if not block:
                    raise SettingsError(f"{path}: tensor {key} is cut short (the file is truncated); download it again")
                digest.update(block)
                remaining -= len(block)
    return digest.hexdigest()


def load_weights(module, checkpoint: Checkpoint, prefixes: tuple[str, ...]) -> None:
    """Load a module's tensors, and only those, from the files that hold them (strictly: every
    parameter and persistent buffer must be there)."""
    from safetensors import safe_open

    state: dict = {}  # name → tensor
    prefix = None
    for path, keys in checkpoint.weight_files(prefixes).items():
        prefix = prefix or next(p for p in prefixes if keys[0].startswith(p))
        with safe_open(str(path), "pt") as handle:
            for key in keys:
                state[key[len(prefix):]] = handle.get_tensor(key)
    for conversion in checkpoint.family.weight_conversions:
        state = conversion(state, module)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SettingsError(f"model {checkpoint.source}: weights under {prefix} do not fit "
                            f"{type(module).__name__} (missing {missing[:3]}, unexpected {unexpected[:3]})")


def in_own_memory(module):
    """`module` with every CPU tensor that sits off a 64-byte boundary copied into torch's own memory.

    transformers' `from_pretrained` leaves weights mapped from the safetensors file, at whatever address
    their offset in the file gives; `load_weights` copies into memory torch allocates (64-byte aligned).
    Some BLAS kernels (MKL's AVX2 ones) round differently by an operand's alignment, so a model loaded
    each way gives results an ulp apart on those machines. Values are unchanged; tied weights stay tied.
    """
    import itertools

    import torch

    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()
    return module
