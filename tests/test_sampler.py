"""Bitwise sampling: CFG on logits with temperature, top_p as the reference's 2-way top-p, per-request seeds."""

import math

import pytest
import torch

from varserve.models.generation import ScaleSampling, sample_scale
from varserve.models.sampler import bit_probs, make_generator, sample_bits


def _logits_for(p1: torch.Tensor) -> torch.Tensor:
    """Pair logits (bit 0, bit 1) whose softmax gives P(bit 1) = p1; [n, d] -> [n, 2d]."""
    return torch.stack([torch.log1p(-p1), torch.log(p1)], dim=-1).flatten(-2)


def _random_logits(seed: int, n: int = 64, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2 * d, generator=g) * 2


def test_bit_probs_of_known_probabilities() -> None:
    p1 = torch.tensor([[0.3, 0.02, 0.5, 0.999]], dtype=torch.float64)
    torch.testing.assert_close(bit_probs(_logits_for(p1), None, 1.0, 1.0), p1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg, tau", [(3.0, 1.0), (4.0, 0.5), (1.5, 0.7), (0.0, 2.0)])
def test_bit_probs_is_the_cfg_formula_in_float64(cfg: float, tau: float) -> None:
    cond, uncond = _random_logits(1).double(), _random_logits(2).double()
    got = bit_probs(cond, uncond, cfg, tau)
    n, d = cond.shape[0], cond.shape[1] // 2
    want = torch.empty(n, d, dtype=torch.float64)
    for i in range(n):
        for j in range(d):
            l0 = cfg * cond[i, 2 * j].item() / tau + (1 - cfg) * uncond[i, 2 * j].item() / tau
            l1 = cfg * cond[i, 2 * j + 1].item() / tau + (1 - cfg) * uncond[i, 2 * j + 1].item() / tau
            want[i, j] = 1 / (1 + math.exp(l0 - l1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_cfg_1_is_plain_sampling_from_cond() -> None:
    cond, uncond = _random_logits(3), _random_logits(4)
    plain = bit_probs(cond, None, 1.0, 0.8)
    assert torch.equal(bit_probs(cond, uncond, 1.0, 0.8), plain)  # uncond is ignored
    a = sample_bits(plain, 0.97, make_generator(7, "cpu"))
    b = sample_bits(bit_probs(cond, uncond, 1.0, 0.8), 0.97, make_generator(7, "cpu"))
    assert torch.equal(a, b)
    # through the per-request step: 2 rows at cfg 1 give the bits of the cond row alone
    params = ScaleSampling(cfg=1.0, tau=0.8, top_p=0.97)
    two_rows = sample_scale(torch.cat([cond, uncond]), 2, params, [make_generator(7, "cpu")])
    one_row = sample_scale(cond, 1, params, [make_generator(7, "cpu")])
    assert torch.equal(two_rows, one_row) and torch.equal(one_row[0], a)


def test_sample_scale_applies_cfg_to_the_two_rows() -> None:
    cond, uncond = _random_logits(5), _random_logits(6)
    params = ScaleSampling(cfg=3.0, tau=0.5, top_p=0.0)
    got = sample_scale(torch.cat([cond, uncond]), 2, params, [make_generator(9, "cpu")])
    want = sample_bits(bit_probs(cond, uncond, 3.0, 0.5), 0.0, make_generator(9, "cpu"))
    assert torch.equal(got[0], want)
    assert got.shape == (1, 64, 16) and got.dtype == torch.uint8


def test_requests_sampled_together_draw_what_each_draws_alone() -> None:
    """The engine samples a run of requests at one scale in one call: request i's bits come from its rows and
    its own generator only."""
    params = ScaleSampling(cfg=3.0, tau=0.9, top_p=0.97)
    rows = [torch.cat([_random_logits(10 + i), _random_logits(20 + i)]) for i in range(3)]
    together = sample_scale(torch.cat(rows), 2, params, [make_generator(30 + i, "cpu") for i in range(3)])
    for i, logits in enumerate(rows):
        assert torch.equal(together[i], sample_scale(logits, 2, params, [make_generator(30 + i, "cpu")])[0])
    assert not torch.equal(together[0], together[1])


def test_top_p_forces_the_majority_bit() -> None:
    # minority probability <= 1 - top_p (0.03 for top_p 0.97): the majority bit, whatever the draw
    p1 = torch.tensor([0.02, 0.98, 0.0299, 0.9701, 0.2, 0.8] * 5000, dtype=torch.float64).view(-1, 6)
    bits = sample_bits(bit_probs(_logits_for(p1), None, 1.0, 1.0), 0.97, make_generator(0, "cpu"))
    assert (bits[:, 0] == 0).all() and (bits[:, 2] == 0).all()
    assert (bits[:, 1] == 1).all() and (bits[:, 3] == 1).all()
    # above the threshold both values still occur
    assert 0 < bits[:, 4].sum() < len(bits) and 0 < bits[:, 5].sum() < len(bits)


def test_top_p_boundary_is_inclusive() -> None:
    p1 = torch.tensor([[0.25, 0.75, 0.2500001]], dtype=torch.float64).expand(4000, 3)
    bits = sample_bits(p1, 0.75, make_generator(1, "cpu"))
    assert (bits[:, 0] == 0).all() and (bits[:, 1] == 1).all()
    assert 0 < bits[:, 2].sum() < 4000


def test_top_p_0_disables() -> None:
    p1 = torch.full((100_000, 1), 0.02, dtype=torch.float64)
    bits = sample_bits(p1, 0.0, make_generator(2, "cpu"))
    assert abs(bits.double().mean().item() - 0.02) < 0.003


def test_fixed_seed_same_bits_other_seed_other_bits() -> None:
    p1 = bit_probs(_random_logits(8, n=256), None, 1.0, 1.0)
    a = sample_bits(p1, 0.97, make_generator(123, "cpu"))
    b = sample_bits(p1, 0.97, make_generator(123, "cpu"))
    c = sample_bits(p1, 0.97, make_generator(124, "cpu"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_draws_do_not_depend_on_the_probabilities() -> None:
    """One uniform per bit whatever the values: the same generator state after any probabilities."""
    g1, g2 = make_generator(5, "cpu"), make_generator(5, "cpu")
    sample_bits(torch.full((10, 4), 0.001), 0.97, g1)
    sample_bits(torch.rand(10, 4), 0.0, g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampling_statistics(dtype: torch.dtype) -> None:
    n = 200_000
    p1 = bit_probs(_logits_for(torch.full((n, 1), 0.3, dtype=torch.float64)).to(dtype), None, 1.0, 1.0)
    bits = sample_bits(p1, 0.97, make_generator(11, "cpu"))
    # std of the mean: sqrt(0.21 / n) ~ 0.001
    assert abs(bits.double().mean().item() - 0.3) < 0.005


def test_requests_sampled_together_need_a_generator_each() -> None:
    with pytest.raises(ValueError, match="2 generators for 3 requests"):
        sample_bits(torch.rand(3, 4, 2), 0.0, [make_generator(1, "cpu"), make_generator(2, "cpu")])
