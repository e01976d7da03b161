"""T5 text encoder: prompts -> packed per-token features, as the official encode_prompt builds them.

Official recipe (tools/run_infinity.py): flan-t5-xl tokenizer (legacy=True, 512 tokens), T5EncoderModel
last_hidden_state in float32, each prompt's valid tokens (</s> included) concatenated, with lengths and
cu_seqlens. One difference: a prompt longer than the limit is rejected instead of silently truncated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import huggingface_hub
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, T5Config, T5EncoderModel
from transformers.modeling_outputs import BaseModelOutput

from varserve.attention import upload
from varserve.models.checkpoint import (
    HF_T5_PATTERNS,
    LOCAL_FOLDER,
    hf_t5_download_command,
    hub_call,
    local_path_hint,
)


@dataclass(frozen=True)
class TextEncoderConfig:
    name: str
    d_model: int
    max_length: int  # tokens per prompt, </s> included
    hf_repo: str | None = None  # Hub repo of a T5 checkpoint; None: a random encoder from the fields below
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 128
    seed: int = 0
    architecture: str = "t5"  # "t5": transformers' T5EncoderModel; "small": SmallTextEncoder (models trained here)

    def __post_init__(self) -> None:
        if self.architecture not in ("t5", "small"):
            raise ValueError(f"text encoder {self.name!r}: architecture must be 't5' or 'small', "
                             f"not {self.architecture!r}")


TEXT_ENCODER_PRESETS: dict[str, TextEncoderConfig] = {
    "flan-t5-xl": TextEncoderConfig(name="flan-t5-xl", d_model=2048, max_length=512, hf_repo="google/flan-t5-xl"),
    "tiny": TextEncoderConfig(name="tiny", d_model=64, max_length=128),
    "shapes": TextEncoderConfig(name="shapes", d_model=64, max_length=40, num_layers=4,
                                num_heads=4, d_ff=256, architecture="small"),
}


@dataclass
class TextBatch:
    features: torch.Tensor  # [sum(lengths), d_model] float32, the prompts' tokens back to back
    lengths: list[int]  # tokens per prompt, </s> included
    cu_seqlens: torch.Tensor  # [len(lengths) + 1] int32: prompt i owns features[cu_seqlens[i]:cu_seqlens[i + 1]]


class Tokenizer(Protocol):
    pad_id: int

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]: ...

    def save_pretrained(self, folder: str | Path) -> None: ...


class ByteTokenizer:
    """Offline tokenizer for small configs: UTF-8 bytes, T5's special ids (<pad> 0, </s> 1, <unk> 2).

    Saved as `byte_tokenizer.json` next to the model's config.json; a folder holding that file loads with
    this tokenizer instead of a Hugging Face one.
    """

    FILE = "byte_tokenizer.json"
    pad_id, eos_id, unk_id = 0, 1, 2
    offset = 3  # byte b has id b + offset
    vocab_size = offset + 256
    _SPEC = {"type": "varserve-byte", "pad_id": 0, "eos_id": 1, "unk_id": 2, "offset": 3}

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [[b + self.offset for b in text.encode("utf-8")] + [self.eos_id] for text in texts]

    def save_pretrained(self, folder: str | Path) -> None:
        (Path(folder) / self.FILE).write_text(json.dumps(self._SPEC))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ByteTokenizer:
        spec = json.loads((Path(folder) / cls.FILE).read_text())
        if spec != cls._SPEC:
            raise ValueError(f"{Path(folder) / cls.FILE} describes another tokenizer: {spec}, expected {cls._SPEC}")
        return cls()


class WordTokenizer:
    """Offline tokenizer over a closed vocabulary (the prompts a model was trained on): lower-cased words and
    punctuation marks, ids after T5's specials (<pad> 0, </s> 1, <unk> 2). A prompt with a word outside the
    vocabulary is refused with the words it does not know: the model could not draw it.

    Saved as `word_tokenizer.json` (the word list) next to the encoder's files.
    """

    FILE = "word_tokenizer.json"
    pad_id, eos_id, unk_id = 0, 1, 2
    offset = 3  # word i has id i + offset
    _SPLIT = re.compile(r"\w+|[^\w\s]")

    def __init__(self, words: Sequence[str]) -> None:
        self.words = tuple(words)
        self._ids = {w: i + self.offset for i, w in enumerate(self.words)}
        if len(self._ids) != len(self.words):
            raise ValueError("a word tokenizer's vocabulary lists a word twice")

    @property
    def vocab_size(self) -> int:
        return self.offset + len(self.words)

    def split(self, text: str) -> list[str]:
        return self._SPLIT.findall(text.lower())

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        out = []
        for index, text in enumerate(texts):
            words = self.split(text)
            unknown = sorted({w for w in words if w not in self._ids})
            if unknown:
                raise ValueError(f"prompt {index} has words this model was not trained on: {', '.join(unknown)}; "
                                 f"it knows: {' '.join(self.words)}")
            out.append([self._ids[w] for w in words] + [self.eos_id])
        return out

    def save_pretrained(self, folder: str | Path) -> None:
        (Path(folder) / self.FILE).write_text(json.dumps({"type": "varserve-words", "words": list(self.words)}))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> WordTokenizer:
        spec = json.loads((Path(folder) / cls.FILE).read_text())
        if spec.get("type") != "varserve-words":
            raise ValueError(f"{Path(folder) / cls.FILE} is not a varserve word tokenizer: type {spec.get('type')!r}")
        return cls(spec["words"])


class HFTokenizer:
    """A transformers tokenizer (flan-t5-xl: T5 sentencepiece unigram) seen through the Tokenizer protocol."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.pad_id: int = tokenizer.pad_token_id

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tokenizer(list(texts))["input_ids"] if texts else []

    def save_pretrained(self, folder: str | Path) -> None:
        self._tokenizer.save_pretrained(folder)


@dataclass(frozen=True)
class SmallEncoderShape:
    vocab_size: int
    d_model: int
    max_length: int
    num_layers: int
    num_heads: int
    d_ff: int


class SmallTextEncoder(nn.Module):
    """A pre-norm Transformer encoder with learned absolute positions, for models trained here.

    Why not a small T5: trained from scratch to parse our prompts (which colour is at which region), a 4-layer
    T5 of width 64 was still at 11% whole-prompt accuracy after 1500 steps (it sees word order only through
    relative-position biases), where this encoder reached 99% in 1000 steps. Called like T5EncoderModel:
    `(input_ids, attention_mask) -> .last_hidden_state`.
    """

    CONFIG_FILE = "small_encoder.json"
    WEIGHTS_FILE = "small_encoder.safetensors"

    def __init__(self, shape: SmallEncoderShape) -> None:
        super().__init__()
        self.config = shape
        self.embed = nn.Embedding(shape.vocab_size, shape.d_model)
        self.positions = nn.Parameter(torch.randn(shape.max_length, shape.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(shape.d_model, shape.num_heads, shape.d_ff, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, shape.num_layers, norm=nn.LayerNorm(shape.d_model),
                                            enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseModelOutput:
        x = self.embed(input_ids) + self.positions[: input_ids.shape[1]]
        hidden = self.layers(x, src_key_padding_mask=None if attention_mask is None else attention_mask == 0)
        return BaseModelOutput(last_hidden_state=hidden)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.CONFIG_FILE).write_text(json.dumps(asdict(self.config)))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / self.WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> SmallTextEncoder:
        folder = Path(folder)
        encoder = cls(SmallEncoderShape(**json.loads((folder / cls.CONFIG_FILE).read_text())))
        encoder.load_state_dict(load_file(str(folder / cls.WEIGHTS_FILE)), strict=True)
        return encoder.to(dtype)


class TextEncoder:
    def __init__(self, config: TextEncoderConfig, model: T5EncoderModel | SmallTextEncoder, tokenizer: Tokenizer,
                 batch_size: int = 32) -> None:
        if model.config.d_model != config.d_model:
            raise ValueError(
                f"text encoder {config.name!r} expects d_model {config.d_model}, "
                f"but the loaded T5 encoder has d_model {model.config.d_model}"
            )
        self.config = config
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def load(cls, config: TextEncoderConfig, path: str | Path | None = None, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, batch_size: int = 32,
             tokenizer: Tokenizer | None = None) -> TextEncoder:
        """Load from a local folder (Hugging Face T5, or SmallTextEncoder's files), else download
        `config.hf_repo` (or get `path == hf_repo`), else (no repo) build the random encoder of `config.seed`
        for `tokenizer` (default: bytes). The official code runs flan-t5-xl in fp16."""
        folder = _source_folder(config, path)
        if folder is None:
            tokenizer = tokenizer or ByteTokenizer()
            model = _random_encoder(config, tokenizer.vocab_size)
        else:
            model, tokenizer = _from_folder(config, folder, dtype)
        return cls(config, model.to(device=device, dtype=dtype), tokenizer, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a folder that `TextEncoder.load(config, folder)` reads back."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> TextBatch:
        ids = self.tokenizer.token_ids(prompts)
        self.check_lengths(ids)
        features = self._features(ids)
        lengths = [len(seq) for seq in ids]
        counts = upload(torch.tensor(lengths, dtype=torch.int32), self.device)  # pinned: the host does not wait
        cu_seqlens = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
        return TextBatch(features=features, lengths=lengths, cu_seqlens=cu_seqlens)

    def check_lengths(self, ids: list[list[int]]) -> None:
        """ValueError naming the first prompt over the token limit (prompts are never truncated)."""
        limit = self.config.max_length
        for index, seq in enumerate(ids):
            if len(seq) > limit:
                raise ValueError(
                    f"prompt {index} is {len(seq)} tokens long (</s> included), over the {limit}-token limit "
                    f"of the {self.config.name} text encoder; shorten it (prompts are not truncated)"
                )

    def _features(self, ids: list[list[int]]) -> torch.Tensor:
        """fp32 features [sum(lengths), d_model] of every prompt's tokens, prompts in order. Prompts of one token
        count run together without padding: a padding mask makes the HF encoder ask the device whether anything is
        masked, a host wait that left the device idle while the host then planned the step."""
        by_length: dict[int, list[int]] = {}
        for index, seq in enumerate(ids):
            by_length.setdefault(len(seq), []).append(index)
        per_prompt: list[torch.Tensor] = [torch.empty(0)] * len(ids)
        for indices in by_length.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                input_ids = upload(torch.tensor([ids[i] for i in chunk], dtype=torch.long), self.device)
                hidden = self.model(input_ids=input_ids).last_hidden_state
                for row, index in enumerate(chunk):
                    per_prompt[index] = hidden[row]
        if not per_prompt:
            return torch.empty(0, self.config.d_model, device=self.device)
        return torch.cat(per_prompt).float()


def _source_folder(config: TextEncoderConfig, path: str | Path | None) -> Path | None:
    """The local folder to load (downloaded if needed), or None for a random encoder."""
    if path is not None and Path(path).expanduser().is_dir():
        return Path(path).expanduser()
    if path is not None and str(path) != config.hf_repo:
        raise FileNotFoundError(f"text encoder folder {path} does not exist")
    return None if config.hf_repo is None else _download(config.hf_repo)


def _download(repo_id: str) -> Path:
    folder = f"{LOCAL_FOLDER}/{repo_id.rsplit('/', 1)[-1]}"
    advice = (
        f"Without network access, download it elsewhere:\n  {hf_t5_download_command(repo_id, folder)}\n"
        f"then put that folder inside the weights folder you pass to the engine, e.g. "
        f"{local_path_hint('infinity-2b')}, or load it with TextEncoder.load(config, path={folder!r})."
    )
    fetch = partial(huggingface_hub.snapshot_download, repo_id, allow_patterns=list(HF_T5_PATTERNS))
    return hub_call(fetch, repo_id, HF_T5_PATTERNS, advice)


def _from_folder(config: TextEncoderConfig, folder: Path,
                 dtype: torch.dtype) -> tuple[T5EncoderModel | SmallTextEncoder, Tokenizer]:
    small = (folder / SmallTextEncoder.CONFIG_FILE).is_file()
    if not small and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is neither a Hugging Face T5 folder (config.json) nor a small "
                                f"encoder's ({SmallTextEncoder.CONFIG_FILE})")
    if (folder / ByteTokenizer.FILE).is_file():
        tokenizer: Tokenizer = ByteTokenizer.from_pretrained(folder)
    elif (folder / WordTokenizer.FILE).is_file():
        tokenizer = WordTokenizer.from_pretrained(folder)
    else:
        hf = AutoTokenizer.from_pretrained(folder, legacy=True)
        hf.model_max_length = config.max_length
        tokenizer = HFTokenizer(hf)
    if small:
        return SmallTextEncoder.from_pretrained(folder, dtype), tokenizer
    return T5EncoderModel.from_pretrained(folder, dtype=dtype), tokenizer


def _random_encoder(config: TextEncoderConfig, vocab_size: int) -> T5EncoderModel | SmallTextEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.architecture == "small":
            return SmallTextEncoder(SmallEncoderShape(vocab_size, config.d_model, config.max_length,
                                                      config.num_layers, config.num_heads, config.d_ff))
        return T5EncoderModel(_t5_config(config, vocab_size))


def _t5_config(config: TextEncoderConfig, vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=vocab_size,
        d_model=config.d_model,
        d_kv=config.d_model // config.num_heads,
        d_ff=config.d_ff,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        feed_forward_proj="gated-gelu",  # as flan-t5
        dropout_rate=0.0,
        pad_token_id=ByteTokenizer.pad_id,
        eos_token_id=ByteTokenizer.eos_id,
    )
