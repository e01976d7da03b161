"""The device side of the KV policies on CUDA: ScaleKV's selection in bf16 gives the CPU path's result exactly,
without a host sync, and compressed engines run and keep to their plans (the cuts' token moves:
test_compaction.py)."""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from varserve import Engine, SamplingParams
from varserve.cache.attention_stats import calibrate
from varserve.cache.plan import ScoredCut
from varserve.cache.policy import FullPolicy
from varserve.cache.scalekv import select_kept, window_indices
from scalekv_fixtures import cut_rows, select_for_cut

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@contextmanager
def no_host_sync():
    """Any device-to-host synchronisation inside raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _small_ints(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16 tensors of small integers: fp32 scores of them are exact on any device, so the devices must pick
    the same tokens, ties (frequent here) included."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=generator).to(torch.bfloat16)


@pytest.mark.parametrize("hw, history, capacity", [((32, 32), 1497, 600), ((22, 11), 81, 120), ((2, 2), 1, 5)])
def test_scalekv_selection_on_cuda_equals_cpu(hw: tuple[int, int], history: int, capacity: int) -> None:
    window = window_indices(*hw)
    cut = ScoredCut(history, history + hw[0] * hw[1], capacity, window)
    keys = _small_ints((3, 4, cut.attend_len, 64), 0)
    window_q = _small_ints((3, len(window), 4, 64), 1)
    expected = select_for_cut(keys, window_q, cut)
    keys, window_q, rows = keys.to(CUDA), window_q.to(CUDA), cut_rows(cut, 3, CUDA)  # uploads: before the check
    with no_host_sync():
        got = select_kept(keys, window_q, *rows, cut.capacity)
    assert torch.equal(got.cpu(), expected)
    assert (got.diff(dim=-1) > 0).all() and got.shape == (3, 4, capacity)


@pytest.mark.parametrize("name", ["scalekv", "window", "streaming", "heatkv"])
def test_compressed_engines_run_in_bf16_and_keep_to_their_plans(name: str, tmp_path) -> None:
    path = None
    if name == "heatkv":
        path = tmp_path / "heat.json"
        path.write_text(json.dumps(calibrate("heatkv", "test-small", ["a red fox", "a green field"], "512x512", 0)))
    engine = Engine("test-small", kv_policy=name, kv_budget=0.1, page_size=16, num_pages=20000,
                    kv_calibration=str(path) if path else None)
    params = [SamplingParams(size=size, seed=i) for i, size in enumerate(["512x512", "1:2@512", "512x512"])]
    outs = engine.generate(["a red fox", "a tall tower", "a blue lake"], params, use_tqdm=False)
    for out, p in zip(outs, params):
        plan = engine.policy.plan(engine.model_config, p.schedule)
        full = FullPolicy().plan(engine.model_config, p.schedule)
        assert out.metrics.peak_kv_pages == plan.held_pages(16, 2).max() < full.held_pages(16, 2).max()
        assert np.asarray(out.image).std() > 0
    assert engine.cache_stats()["used_pages"] == 0
