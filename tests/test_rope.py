"""2D RoPE of Infinity (rope2d_normalized_by_hw=2): every scale placed on the 1M list's last grid, adjacent
(even, odd) pairs rotated, the first head_dim/4 pairs by the row position and the next head_dim/4 by the column."""

from fractions import Fraction

import pytest
import torch

from varserve.models.fused import apply_rope
from varserve.models.infinity import rope_angles, rope_positions
from varserve.models.schedule import RATIOS, parse_size


def _exact_round(i: int, big: int, small: int) -> int:
    """round(i * big / small) on exact rationals, halves to even (what torch.round does)."""
    return round(Fraction(i * big, small))


@pytest.mark.parametrize("size", ["1024x1024", "1:2@1024", "2:1@512", "3:1@1024", "4:5@256"])
def test_positions_land_on_the_last_grid(size: str) -> None:
    schedule = parse_size(size)
    gh, gw = schedule.rope_grid
    for h, w in schedule.scales:
        pos = rope_positions((h, w), (gh, gw))
        assert pos.shape == (h * w, 2) and pos.dtype == torch.int64
        assert pos[0].tolist() == [0, 0]
        assert 0 <= pos[:, 0].min() and pos[:, 0].max() < gh
        assert 0 <= pos[:, 1].min() and pos[:, 1].max() < gw
        grid = pos.view(h, w, 2)
        # token (i, j) -> (round(i * H / h), round(j * W / w)), row-major token order
        assert grid[:, 0, 0].tolist() == [_exact_round(i, gh, h) for i in range(h)]
        assert grid[0, :, 1].tolist() == [_exact_round(j, gw, w) for j in range(w)]
        assert (grid[:, :, 0] == grid[:, :1, 0]).all() and (grid[:, :, 1] == grid[:1, :, 1]).all()


def test_last_scale_of_the_full_list_is_the_identity_grid() -> None:
    for full in RATIOS.values():
        gh, gw = full[-1]
        pos = rope_positions((gh, gw), (gh, gw))
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        assert torch.equal(pos, torch.stack([rows, cols], -1).reshape(-1, 2))


def test_every_table_scale_rounds_like_exact_rationals() -> None:
    """Including the many exact halves (e.g. 45/2 = 22.5 -> 22): float32 products round like exact ones."""
    for full in RATIOS.values():
        gh, gw = full[-1]
        for h, w in full:
            grid = rope_positions((h, w), (gh, gw)).view(h, w, 2)
            assert grid[:, 0, 0].tolist() == [_exact_round(i, gh, h) for i in range(h)]
            assert grid[0, :, 1].tolist() == [_exact_round(j, gw, w) for j in range(w)]


def _complex_rope(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Independent RoPE: pairs (x[2m], x[2m+1]) as complex numbers times exp(i * theta[m])."""
    z = torch.complex(x[..., 0::2], x[..., 1::2])
    rotated = z * torch.polar(torch.ones_like(theta), theta)[:, None, :]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = rotated.real, rotated.imag
    return out


def test_apply_rope_is_a_rotation_and_matches_complex_numbers() -> None:
    g = torch.Generator().manual_seed(0)
    T, H, d = 37, 3, 16
    x = torch.randn(T, H, d, generator=g, dtype=torch.float64)
    theta = torch.rand(T, d // 2, generator=g, dtype=torch.float64) * 200 - 100
    y = apply_rope(x, theta.cos(), theta.sin())
    assert y.shape == x.shape
    torch.testing.assert_close(y, _complex_rope(x, theta), rtol=0, atol=1e-12)
    pair_norm = lambda t: t[..., 0::2] ** 2 + t[..., 1::2] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(apply_rope(y, theta.cos(), -theta.sin()), x, rtol=0, atol=1e-12)
    assert not torch.allclose(y, x)


def test_angles_layout_rows_then_columns() -> None:
    head_dim, base = 16, 10000.0
    quarter = head_dim // 4
    hw, grid = (6, 3), (90, 45)
    angles = rope_angles(hw, grid, head_dim, base)
    assert angles.shape == (18, head_dim // 2)
    pos = rope_positions(hw, grid).double()
    inv_freq = torch.tensor([base ** (-2 * k / (head_dim // 2)) for k in range(quarter)], dtype=torch.float64)
    torch.testing.assert_close(angles[:, :quarter], pos[:, :1] * inv_freq, rtol=1e-14, atol=0)
    torch.testing.assert_close(angles[:, quarter:], pos[:, 1:] * inv_freq, rtol=1e-14, atol=0)


def test_full_size_inv_freq() -> None:
    """head_dim 128: 32 row pairs and 32 column pairs, inv_freq = 1 / 10000^(arange(0, 64, 2) / 64)."""
    angles = rope_angles((64, 64), (64, 64), 128, 10000.0)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    token = 5 * 64 + 7  # row 5, column 7
    torch.testing.assert_close(angles[token, :32], 5 * inv_freq, rtol=1e-14, atol=0)
    torch.testing.assert_close(angles[token, 32:], 7 * inv_freq, rtol=1e-14, atol=0)


def test_row_moves_only_the_first_half_of_the_pairs() -> None:
    head_dim = 16
    angles = rope_angles((4, 4), (64, 64), head_dim, 10000.0)  # positions 0, 16, 32, 48 on each axis
    x = torch.randn(1, 2, head_dim, dtype=torch.float64).expand(16, 2, head_dim)
    y = apply_rope(x, angles.cos(), angles.sin())
    pairs = head_dim // 2
    # same column, different rows: pairs >= head_dim/4 (columns) equal, pairs < head_dim/4 differ
    same_col = y.view(4, 4, 2, pairs, 2)[:, 2]
    assert torch.equal(same_col[0, :, pairs // 2 :], same_col[3, :, pairs // 2 :])
    assert not torch.allclose(same_col[0, :, : pairs // 2], same_col[3, :, : pairs // 2])
    same_row = y.view(4, 4, 2, pairs, 2)[1]
    assert torch.equal(same_row[0, :, : pairs // 2], same_row[3, :, : pairs // 2])
    assert not torch.allclose(same_row[0, :, pairs // 2 :], same_row[3, :, pairs // 2 :])
    # token (0, 0) is not rotated at all
    torch.testing.assert_close(y[0], x[0], rtol=0, atol=0)
