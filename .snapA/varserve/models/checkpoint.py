"""Finding weights (local folder, Hugging Face Hub, or the package's own folder) and loading them strictly.

Official layouts (FoundationVision/Infinity on the Hub):
- infinity_2b_reg.pth: a plain state dict (full training checkpoints nest it under ['trainer']['gpt_fsdp']).
- infinity_8b_weights/: model-0000{1..4}-of-00004.safetensors + model.safetensors.index.json, the layout
  transformers' load_sharded_checkpoint reads. Shard folders of .pth/.bin files with an index are read too.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import huggingface_hub
import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from varserve.models.config import ModelConfig, WeightFiles

# Buffers the official model recomputes at construction; files may or may not carry them.
INFINITY_IGNORED = (
    r"(^|\.)zero_k_bias$",
    r"(^|\.)lvl_1L$",
    r"(^|\.)attn_bias_for_masking$",
    r"(^|\.)Infinity_visible_kvlen$",
    r"(^|\.)Infinity_invisible_qlen$",
)
# Tensors whose first dimension may differ from the model's: the official loader cuts them to the
# model's length or pads them with the model's own rows (cfg_uncond is [text_maxlen, text_dim]).
INFINITY_RESIZABLE = ("cfg_uncond",)
# What state dicts nest under, in the order the official code looks (trainer -> gpt_fsdp).
_NESTING_KEYS = ("trainer", "gpt_fsdp", "model", "state_dict", "module")
# What a T5 encoder needs from an HF repo: configs, safetensors weights (the decoder's are skipped), tokenizer.
HF_T5_PATTERNS = (
    "config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
)
_LIST_LIMIT = 20
LOCAL_FOLDER = "/path/to/weights"
# Weights shipped inside the installed package (presets with WeightFiles(in_package=True)), one folder per preset.
PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


class WeightsUnavailableError(RuntimeError):
    """Weights could not be found locally nor downloaded from the Hugging Face Hub (nor, for a preset that ships
    them, found in the package)."""


@dataclass(frozen=True)
class ResolvedWeights:
    transformer: Path  # a .pth/.safetensors file, or a shard folder with an *.index.json
    vae: Path
    text_encoder: Path | str  # a local HF-format folder, or the Hub repo id to download


def local_path_hint(model: str) -> str:
    return (
        f"Engine(model={model!r}, weights={LOCAL_FOLDER!r}) or "
        f"`varserve generate --model {model} --weights {LOCAL_FOLDER}`"
    )


def download_commands(config: ModelConfig, folder: str = LOCAL_FOLDER) -> list[str]:
    """Shell commands that lay out `folder` the way resolve_weights(config, folder) expects."""
    files = _official_files(config)
    transformer = files.transformer if _is_file_name(files.transformer) else f"--include '{files.transformer}/*'"
    encoder_dir = files.text_encoder_repo.rsplit("/", 1)[-1]
    return [
        f"hf download {files.repo_id} {transformer} --local-dir {folder}",
        f"hf download {files.repo_id} {files.vae} --local-dir {folder}",
        hf_t5_download_command(files.text_encoder_repo, f"{folder}/{encoder_dir}"),
    ]


def hf_t5_download_command(repo_id: str, folder: str) -> str:
    includes = " ".join(f"--include '{p}'" for p in HF_T5_PATTERNS)
    return f"hf download {repo_id} {includes} --local-dir {folder}"


def resolve_weights(config: ModelConfig, path: str | Path | None = None) -> ResolvedWeights:
    """Locate the transformer, VAE and text encoder weights of an official model.

    `path` is a local folder holding the files named in `config.weights` (the transformer file or shard
    folder, the VAE file, optionally a `flan-t5-xl` subfolder), the shard folder itself, or a single
    transformer file. What it lacks besides the transformer (VAE, text encoder) comes from the Hub cache.
    Without `path`, everything is downloaded into the standard Hugging Face cache.
    A preset whose weights ship in the package reads them from there (or from `path`), never downloading.
    """
    files = _official_files(config)
    if files.in_package:
        return _packaged(config, path)
    if path is None:
        return ResolvedWeights(_download_transformer(config), _download_vae(config), files.text_encoder_repo)
    transformer, base = _local_transformer(config, Path(path).expanduser())
    vae = base / files.vae
    encoder = base / files.text_encoder_repo.rsplit("/", 1)[-1]
    return ResolvedWeights(
        transformer=transformer,
        vae=vae if vae.is_file() else _download_vae(config),
        text_encoder=encoder if encoder.is_dir() else files.text_encoder_repo,
    )


def _packaged(config: ModelConfig, path: str | Path | None) -> ResolvedWeights:
    """The files of a preset that ships its weights: in the package folder, or in `path` laid out the same way."""
    files = _official_files(config)
    folder = PACKAGE_WEIGHTS / files.repo_id if path is None else Path(path).expanduser()
    absent = [name for name in (files.transformer, files.vae) if not (folder / name).is_file()]
    if not (folder / files.text_encoder_repo).is_dir():
        absent.append(f"{files.text_encoder_repo}/")
    if not absent:
        return ResolvedWeights(folder / files.transformer, folder / files.vae, folder / files.text_encoder_repo)
    lacks = f"{folder} lacks {', '.join(absent)}"
    if path is None:
        raise WeightsUnavailableError(
            f"the varserve package is incomplete: the {config.name} model's weights ship inside it, but {lacks}. "
            f"Reinstall varserve from a copy that has varserve/weights/{files.repo_id}/."
        )
    raise FileNotFoundError(f"{lacks}: a {config.name} weights folder holds {files.transformer}, {files.vae} and "
                            f"{files.text_encoder_repo}/ (the layout of {PACKAGE_WEIGHTS / files.repo_id})")


def hub_call(fetch: Callable[[], str], repo_id: str, files: Iterable[str], advice: str) -> Path:
    """Run one huggingface_hub download; any failure becomes a WeightsUnavailableError saying what to do."""
    try:
        return Path(fetch())
    except Exception as err:  # network, auth, offline mode, missing file: the fix is the same
        raise WeightsUnavailableError(
            f"Could not download {', '.join(files)} from the Hugging Face Hub repo {repo_id} "
            f"({type(err).__name__}: {err}).\n{advice}"
        ) from err


def _official_files(config: ModelConfig) -> WeightFiles:
    if config.weights is None:
        raise ValueError(f"model {config.name!r} has no published weights (its config has weights=None)")
    return config.weights


def _is_file_name(name: str) -> bool:
    return Path(name).suffix != ""


def _download_advice(config: ModelConfig) -> str:
    commands = "\n".join(f"  {c}" for c in download_commands(config))
    return (
        f"Without network access, download the weights elsewhere:\n{commands}\n"
        f"then pass that folder: {local_path_hint(config.name)}."
    )


def _download_transformer(config: ModelConfig) -> Path:
    files = _official_files(config)
    advice = _download_advice(config)
    if _is_file_name(files.transformer):
        fetch = partial(huggingface_hub.hf_hub_download, files.repo_id, files.transformer)
        return hub_call(fetch, files.repo_id, [files.transformer], advice)
    pattern = f"{files.transformer}/*"
    fetch = partial(huggingface_hub.snapshot_download, files.repo_id, allow_patterns=[pattern])
    return hub_call(fetch, files.repo_id, [pattern], advice) / files.transformer


def _download_vae(config: ModelConfig) -> Path:
    files = _official_files(config)
    fetch = partial(huggingface_hub.hf_hub_download, files.repo_id, files.vae)
    return hub_call(fetch, files.repo_id, [files.vae], _download_advice(config))


def _local_transformer(config: ModelConfig, path: Path) -> tuple[Path, Path]:
    """(transformer path, folder to look for the VAE and text encoder in)."""
    name = _official_files(config).transformer
    if path.is_file():
        return path, path.parent
    if (path / name).exists():
        return path / name, path
    if path.is_dir() and not _is_file_name(name) and _index_files(path):
        return path, path.parent
    if path.is_dir():
        found = f"the folder has: {_some(sorted(p.name for p in path.iterdir())) or 'nothing'}"
    else:
        found = "no such file or folder"
    commands = "\n".join(f"  {c}" for c in download_commands(config, str(path)))
    raise FileNotFoundError(
        f"{path} does not hold the {config.name} transformer weights: expected {path / name} ({found}). "
        f"These commands fill it as expected:\n{commands}"
    )


def load_transformer_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint into CPU tensors: a .pth/.bin/.safetensors file or a shard folder with an index."""
    path = Path(path)
    if path.is_dir():
        return _load_sharded(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return _load_file(path)


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds more than tensors (torch.load with weights_only=True refused it: {err}). "
            "Save just the model's state dict (for an official training checkpoint: ckpt['trainer']['gpt_fsdp'], "
            "as the official save_slim_model does) and load that."
        ) from err
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _NESTING_KEYS if k in obj), None)
        if key is None:
            others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            raise ValueError(f"{path} is not a state dict: entries that are not tensors: {_some(others)}")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _index_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.index.json"))


def _load_sharded(folder: Path) -> dict[str, torch.Tensor]:
    indexes = _index_files(folder)
    if len(indexes) != 1:
        raise ValueError(
            f"{folder} should hold exactly one shard index (*.index.json, e.g. model.safetensors.index.json), "
            f"found {len(indexes)}: {_some(p.name for p in indexes)}"
        )
    index = indexes[0]
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not (folder / s).is_file()]
    if absent:
        raise FileNotFoundError(f"{folder}: shards listed in {index.name} are missing: {_some(absent)}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = _load_file(folder / shard)
        repeated = state.keys() & part.keys()
        if repeated:
            raise ValueError(f"{folder / shard} repeats keys of earlier shards: {_some(sorted(repeated))}")
        state.update(part)
    unlisted = [k for k in weight_map if k not in state]
    if unlisted:
        raise ValueError(f"{index.name} lists {len(unlisted)} keys that no shard holds: {_some(unlisted)}")
    return state


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    ignore: Iterable[str] = INFINITY_IGNORED,
    resizable: Iterable[str] = INFINITY_RESIZABLE,
    what: str = "transformer",
) -> None:
    """Copy `state_dict` into `module` (cast to each tensor's dtype and device), all or nothing.

    Keys matching an `ignore` regex are skipped on both sides. Every missing, unexpected and mis-shaped key
    is collected and reported in one ValueError before anything is copied.
    """
    patterns = [re.compile(p) for p in ignore]
    target = _without(module.state_dict(keep_vars=True), patterns)
    source = _without(state_dict, patterns)
    resizable = set(resizable)

    fitted: dict[str, torch.Tensor] = {}
    misshaped: list[str] = []
    for key in sorted(target.keys() & source.keys()):
        value = _fit(source[key], target[key], key in resizable)
        if value is None:
            misshaped.append(f"{key}: checkpoint {list(source[key].shape)} vs model {list(target[key].shape)}")
        else:
            fitted[key] = value
    missing = sorted(target.keys() - source.keys())
    unexpected = sorted(source.keys() - target.keys())
    if missing or unexpected or misshaped:
        raise ValueError(_mismatch_report(what, missing, unexpected, misshaped))
    with torch.no_grad():
        for key, value in fitted.items():
            target[key].copy_(value)


def _without(tensors: Mapping[str, torch.Tensor], patterns: list[re.Pattern[str]]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not any(p.search(k) for p in patterns)}


def _fit(value: torch.Tensor, target: torch.Tensor, resizable: bool) -> torch.Tensor | None:
    """`value` shaped like `target`, or None when it cannot be."""
    if value.shape == target.shape:
        return value
    if not resizable or value.dim() == 0 or value.shape[1:] != target.shape[1:]:
        return None
    rows = target.shape[0]
    if value.shape[0] > rows:
        return value[:rows]
    return torch.cat((value.to(device=target.device, dtype=target.dtype), target.detach()[value.shape[0]:]))


def _mismatch_report(what: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    lines = [
        f"{what} checkpoint does not match the model ({len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(misshaped)} mis-shaped keys); nothing was loaded."
    ]
    for label, keys in (
        ("missing (in the model, not in the checkpoint)", missing),
        ("unexpected (in the checkpoint, not in the model)", unexpected),
        ("mis-shaped", misshaped),
    ):
        if keys:
            lines.append(f"{label} [{len(keys)}]:\n  " + "\n  ".join(keys[:_LIST_LIMIT]))
            if len(keys) > _LIST_LIMIT:
                lines.append(f"  ... and {len(keys) - _LIST_LIMIT} more")
    return "\n".join(lines)


def _some(items: Iterable[object]) -> str:
    items = [str(i) for i in items]
    head = ", ".join(items[:_LIST_LIMIT])
    return head + (f", ... ({len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")
