"""The fused block pieces: on CUDA the Triton/compiled versions against the eager math (bf16 tolerance)."""

from __future__ import annotations

import math

import pytest
import torch

from varserve.models import fused
from varserve.models.infinity import rope_angles


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv_inputs(tokens: int, heads: int, dim: int, device: str) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(tokens, 3, heads, dim, generator=g).to(device, torch.bfloat16)
    q_bias, v_bias = (torch.randn(heads, dim, generator=g).to(device, torch.bfloat16) for _ in range(2))
    q_scale = torch.rand(heads, 1, generator=g).mul(math.log(100)).exp().to(device)
    angles = torch.cat([rope_angles((h, h), (32, 32), dim, 10000.0) for h in (1, 2, 4, 8, 16, 32)])[:tokens]
    return qkv, q_bias, v_bias, q_scale, angles.cos().float().to(device), angles.sin().float().to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("heads, dim", [(16, 128), (4, 32), (28, 128)])
def test_triton_cosine_qkv_matches_eager(heads: int, dim: int) -> None:
    args = qkv_inputs(1365, heads, dim, "cuda")
    fast = fused.cosine_qkv(*args, torch.bfloat16)
    slow = fused.cosine_qkv_eager(*args, torch.bfloat16)
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_error(a, b) < 1e-2


@pytest.mark.gpu
def test_compiled_elementwise_match_eager() -> None:
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(777, 256, generator=g).cuda()
    scale, shift, gamma = (torch.randn(5, 256, generator=g).cuda() for _ in range(3))
    rows = torch.randint(0, 5, (777,), generator=g).cuda()
    y = torch.randn(777, 256, generator=g).cuda().bfloat16()
    pairs = [
        (fused.ln_modulate(x, scale, shift, rows, 1e-6, torch.bfloat16),
         fused.ln_modulate.__wrapped__(x, scale, shift, rows, 1e-6, torch.bfloat16)),
        (fused.gated_add(x, y, gamma, rows), fused.gated_add.__wrapped__(x, y, gamma, rows)),
        (fused.residual_add(x, y), fused.residual_add.__wrapped__(x, y)),
    ]
    for fast, slow in pairs:
        assert rel_error(fast, slow) < 1e-2
