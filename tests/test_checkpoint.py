import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from varserve import Engine, SamplingParams
from varserve.cli import main
from varserve.models import checkpoint
from varserve.models.checkpoint import (
    ResolvedWeights,
    WeightsUnavailableError,
    load_into,
    load_transformer_state_dict,
    resolve_weights,
)
from varserve.models.config import get_config
from varserve.models.infinity import Infinity
from varserve.models.text_encoder import TextEncoder, WordTokenizer
from varserve.models.vae import BSQVAE
from varserve.training import presets
from varserve.training.data import VOCABULARY
from varserve.training.train import export

REPO_ROOT = Path(__file__).resolve().parents[1]


class Attn(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.sa = Attn(c)
        self.ffn = nn.Linear(c, 2 * c)


class Chunk(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.module = nn.ModuleList([Block(c), Block(c)])


class Net(nn.Module):
    """Key names like the official checkpoint: block_chunks.0.module.1.sa.mat_qkv.weight."""

    def __init__(self, seed: int, c: int = 8, text_len: int = 6) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.block_chunks = nn.ModuleList([Chunk(c), Chunk(c)])
        self.cfg_uncond = nn.Parameter(torch.randn(text_len, 4))
        self.head = nn.Linear(c, 4)
        self.register_buffer("lvl_1L", torch.zeros(1, 5))
        for p in self.parameters():
            nn.init.normal_(p)


def assert_same(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in module.state_dict().items():
        if key in state:
            assert torch.equal(value, state[key].to(value.dtype)), key


def write_shards(state: dict[str, torch.Tensor], folder: Path, fmt: str) -> None:
    folder.mkdir()
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        name = f"model-0000{i}-of-00002.{ext}"
        tensors = {k: state[k].contiguous() for k in part}
        if fmt == "safetensors":
            save_file(tensors, folder / name)
        else:
            torch.save(tensors, folder / name)
        weight_map |= {k: name for k in part}
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


@pytest.fixture
def saved() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in Net(seed=1).state_dict().items()}


def test_pth_round_trip(tmp_path, saved):
    torch.save(saved, tmp_path / "model.pth")
    net = Net(seed=2)
    load_into(net, load_transformer_state_dict(tmp_path / "model.pth"))
    assert_same(net, saved)


def test_nested_training_checkpoint(tmp_path, saved):
    torch.save({"trainer": {"gpt_fsdp": saved, "epoch": 3}, "args": {"lr": 1e-4}}, tmp_path / "ar-ckpt.pth")
    state = load_transformer_state_dict(tmp_path / "ar-ckpt.pth")
    assert state.keys() == saved.keys()


def test_pickled_objects_are_refused(tmp_path, saved):
    torch.save({"args": Namespace(lr=1.0), "model": saved}, tmp_path / "full.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_transformer_state_dict(tmp_path / "full.pth")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_shard_folder_round_trip(tmp_path, saved, fmt):
    write_shards(saved, tmp_path / "shards", fmt)
    state = load_transformer_state_dict(tmp_path / "shards")
    assert state.keys() == saved.keys()
    net = Net(seed=2)
    load_into(net, state)
    assert_same(net, saved)


def test_shard_folder_missing_shard(tmp_path, saved):
    write_shards(saved, tmp_path / "shards", "safetensors")
    (tmp_path / "shards" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_transformer_state_dict(tmp_path / "shards")


def test_load_casts_to_module_dtype(saved):
    net = Net(seed=2).to(torch.bfloat16)
    load_into(net, saved)
    assert net.head.weight.dtype == torch.bfloat16
    assert torch.equal(net.head.weight, saved["head.weight"].to(torch.bfloat16))


def test_all_mismatches_in_one_error_and_nothing_loaded(saved):
    state = dict(saved)
    del state["block_chunks.1.module.0.sa.mat_qkv.weight"]
    del state["head.bias"]
    state["block_chunks.0.module.1.extra.weight"] = torch.zeros(2)
    state["block_chunks.0.module.1.ffn.weight"] = torch.zeros(3, 3)
    net = Net(seed=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_into(net, state)
    message = str(err.value)
    assert "2 missing, 1 unexpected, 1 mis-shaped" in message
    for key in ["block_chunks.1.module.0.sa.mat_qkv.weight", "head.bias", "block_chunks.0.module.1.extra.weight",
                "block_chunks.0.module.1.ffn.weight: checkpoint [3, 3] vs model [16, 8]"]:
        assert key in message
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed load"


def test_long_key_lists_are_cut(saved):
    state = dict(saved) | {f"junk.{i}": torch.zeros(1) for i in range(25)}
    with pytest.raises(ValueError, match=r"unexpected \(in the checkpoint, not in the model\) \[25\]") as err:
        load_into(Net(seed=2), state)
    assert "... and 5 more" in str(err.value)


def test_ignored_buffers(saved):
    state = {k: v for k, v in saved.items() if not k.endswith("zero_k_bias")}
    state["lvl_1L"] = torch.ones(1, 99)  # another shape, still ignored
    state["attn_bias_for_masking"] = torch.zeros(1, 1, 3, 3)
    net = Net(seed=2)
    load_into(net, state)
    assert_same(net, {k: v for k, v in saved.items() if k != "lvl_1L"})
    with pytest.raises(ValueError, match="zero_k_bias"):
        load_into(Net(seed=2), state, ignore=())


def test_cfg_uncond_cut_or_padded(saved):
    longer = dict(saved, cfg_uncond=torch.randn(9, 4))
    net = Net(seed=2)
    load_into(net, longer)
    assert torch.equal(net.cfg_uncond, longer["cfg_uncond"][:6])

    shorter = dict(saved, cfg_uncond=torch.randn(4, 4))
    net = Net(seed=2)
    own_tail = net.cfg_uncond.detach()[4:].clone()
    load_into(net, shorter)
    assert torch.equal(net.cfg_uncond[:4], shorter["cfg_uncond"])
    assert torch.equal(net.cfg_uncond[4:], own_tail)

    with pytest.raises(ValueError, match="cfg_uncond: checkpoint"):
        load_into(Net(seed=2), dict(saved, cfg_uncond=torch.randn(6, 5)))


# ---- resolve_weights ----

def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture
def no_hub(monkeypatch):
    def fail(*args, **kwargs):
        raise ConnectionError("network is unreachable")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)


def test_local_folder_2b(tmp_path, no_hub):
    model = touch(tmp_path / "infinity_2b_reg.pth")
    vae = touch(tmp_path / "infinity_vae_d32reg.pth")
    (tmp_path / "flan-t5-xl").mkdir()
    assert resolve_weights(get_config("infinity-2b"), str(tmp_path)) == ResolvedWeights(
        model, vae, tmp_path / "flan-t5-xl")


def test_local_folder_8b_shards(tmp_path, no_hub):
    shards = tmp_path / "infinity_8b_weights"
    touch(shards / "model.safetensors.index.json")
    vae = touch(tmp_path / "infinity_vae_d56_f8_14_patchify.pth")
    config = get_config("infinity-8b")
    expected = ResolvedWeights(shards, vae, "google/flan-t5-xl")
    assert resolve_weights(config, tmp_path) == expected
    assert resolve_weights(config, shards) == expected  # the shard folder itself


def test_single_transformer_file(tmp_path, no_hub):
    model = touch(tmp_path / "my-finetune.pth")
    vae = touch(tmp_path / "infinity_vae_d32reg.pth")
    assert resolve_weights(get_config("infinity-2b"), model).transformer == model
    assert resolve_weights(get_config("infinity-2b"), model).vae == vae


def test_local_folder_without_transformer(tmp_path, no_hub):
    touch(tmp_path / "infinity_vae_d32reg.pth")
    with pytest.raises(FileNotFoundError, match="infinity_2b_reg.pth") as err:
        resolve_weights(get_config("infinity-2b"), tmp_path)
    assert "infinity_vae_d32reg.pth" in str(err.value)  # lists what the folder has


def test_local_folder_without_vae_tries_the_hub(tmp_path, no_hub):
    touch(tmp_path / "infinity_2b_reg.pth")
    with pytest.raises(WeightsUnavailableError, match="infinity_vae_d32reg.pth"):
        resolve_weights(get_config("infinity-2b"), tmp_path)


def test_hub_download(tmp_path, monkeypatch):
    calls = []

    def file(repo_id, filename):
        calls.append((repo_id, filename))
        return str(touch(tmp_path / "cache" / filename))

    def snapshot(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    weights = resolve_weights(get_config("infinity-8b"))
    assert weights == ResolvedWeights(
        tmp_path / "cache" / "infinity_8b_weights", tmp_path / "cache" / "infinity_vae_d56_f8_14_patchify.pth",
        "google/flan-t5-xl")
    assert calls == [
        ("FoundationVision/Infinity", ["infinity_8b_weights/*"]),
        ("FoundationVision/Infinity", "infinity_vae_d56_f8_14_patchify.pth"),
    ]


@pytest.mark.parametrize("name, needed", [
    ("infinity-2b", "infinity_2b_reg.pth"),
    ("infinity-8b", "infinity_8b_weights/*"),
])
def test_hub_failure_says_how_to_pass_a_local_path(no_hub, name, needed):
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_weights(get_config(name))
    message = str(err.value)
    assert "FoundationVision/Infinity" in message and needed in message
    assert "network is unreachable" in message
    assert f"Engine(model='{name}', weights=" in message and f"--model {name} --weights" in message
    assert "hf download google/flan-t5-xl" in message
    assert isinstance(err.value.__cause__, ConnectionError)


def test_offline_mode_without_cache(tmp_path):
    script = (
        "from varserve.models.checkpoint import resolve_weights, WeightsUnavailableError\n"
        "from varserve.models.config import get_config\n"
        "try:\n"
        "    resolve_weights(get_config('infinity-2b'))\n"
        "except WeightsUnavailableError as err:\n"
        "    print('UNAVAILABLE', err)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), PYTHONPATH=str(REPO_ROOT))
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("UNAVAILABLE"), out.stderr
    assert "infinity_2b_reg.pth" in out.stdout and "weights=" in out.stdout


def test_presets_without_weights():
    with pytest.raises(ValueError, match="no published weights"):
        resolve_weights(get_config("test-small"))


# ---- weights shipped inside the package (the tiny preset) ----

PROMPT = "a red circle at the top left on a white background"


@pytest.fixture(scope="module")
def shipped_folder(tmp_path_factory) -> Path:
    """A folder laid out as varserve/weights/tiny/ (what train.export writes), with random weights."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("package_weights") / "tiny"
    text = TextEncoder.load(presets.TEXT_ENCODER, tokenizer=WordTokenizer(VOCABULARY))
    export(folder, Infinity(presets.MODEL), BSQVAE(presets.VAE), text, {})
    return folder


def test_package_weights_resolve_without_the_hub(shipped_folder, monkeypatch, no_hub):
    monkeypatch.setattr(checkpoint, "PACKAGE_WEIGHTS", shipped_folder.parent)
    assert resolve_weights(get_config("tiny")) == ResolvedWeights(
        shipped_folder / "transformer.safetensors", shipped_folder / "vae.safetensors", shipped_folder / "text_encoder")


def test_engine_generates_with_the_package_weights(shipped_folder, monkeypatch, no_hub):
    monkeypatch.setattr(checkpoint, "PACKAGE_WEIGHTS", shipped_folder.parent)
    engine = Engine("tiny", num_pages=4096)
    transformer = load_file(shipped_folder / "transformer.safetensors")
    for name, value in engine.runner.model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, transformer[name].float()), name
    vae = load_file(shipped_folder / "vae.safetensors")
    assert all(torch.equal(v, vae[k].float()) for k, v in engine.runner.vae.state_dict().items())
    assert isinstance(engine.runner.text_encoder.tokenizer, WordTokenizer)
    params = SamplingParams(size="256x256", seed=0)
    image = engine.generate([PROMPT], params)[0].image
    assert image.size == (256, 256)
    # a copy of the folder given as the model path loads the same way
    again = Engine(str(shipped_folder), num_pages=4096).generate([PROMPT], params)[0].image
    assert np.array_equal(np.asarray(image), np.asarray(again))
    with pytest.raises(ValueError, match="words this model was not trained on: fox"):
        engine.generate(["a red fox"], params)


def test_missing_package_weights_say_the_package_is_incomplete(tmp_path, monkeypatch, no_hub, capsys):
    monkeypatch.setattr(checkpoint, "PACKAGE_WEIGHTS", tmp_path)
    with pytest.raises(WeightsUnavailableError, match="the varserve package is incomplete") as err:
        resolve_weights(get_config("tiny"))
    assert f"{tmp_path / 'tiny'} lacks transformer.safetensors, vae.safetensors, text_encoder/" in str(err.value)
    # the README's command (the default model is tiny): one line, no traceback
    assert main(["generate", PROMPT, "--out", str(tmp_path / "out"), "--log-level", "WARNING"]) == 1
    stderr = capsys.readouterr().err
    assert "the varserve package is incomplete" in stderr and "Traceback" not in stderr


def test_a_folder_in_the_package_layout_must_be_complete(shipped_folder, tmp_path, no_hub):
    copy = shutil.copytree(shipped_folder, tmp_path / "copy")
    (copy / "vae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"copy lacks vae.safetensors: a tiny weights folder holds"):
        resolve_weights(get_config("tiny"), copy)
