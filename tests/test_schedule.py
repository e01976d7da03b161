"""Scale schedules: Infinity's dynamic-resolution table, pixel-budget prefixes, size parsing, the RoPE grid."""

import pytest

from varserve.models.schedule import (
    PIXEL_BUDGETS,
    RATIOS,
    VAE_STRIDE,
    get_schedule,
    parse_size,
    supported_sizes,
)

SQUARE = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
          (48, 48), (64, 64)]
# h/w = 2 (a 1:2 width:height image), from the official table: ends at 90 x 45 tokens.
TALL_2 = [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
          (74, 37), (90, 45)]


def test_1024_square_has_13_scales_and_10521_tokens() -> None:
    s = parse_size("1024x1024")
    assert s is get_schedule(1.0, 1024)
    assert list(s.scales) == SQUARE
    assert s.num_scales == 13
    assert s.tokens == (1, 4, 16, 36, 64, 144, 256, 400, 576, 1024, 1600, 2304, 4096)
    assert s.total_tokens == 10521
    assert s.history_tokens == 6425
    assert s.offset(0) == 0 and s.offset(12) == 6425 and s.offset(1) == 1
    assert s.image_size == (1024, 1024)
    assert s.rope_grid == (64, 64)


@pytest.mark.parametrize("budget, n, side", [(256, 7, 16), (512, 10, 32), (768, 12, 48)])
def test_smaller_budgets_are_prefixes(budget: int, n: int, side: int) -> None:
    s = get_schedule(1.0, budget)
    assert list(s.scales) == SQUARE[:n]
    assert s.num_scales == n
    assert s.image_size == (side * VAE_STRIDE, side * VAE_STRIDE) == (budget, budget)
    assert s.rope_grid == (64, 64)  # the 1M list's last grid, not the budget's
    assert s.total_tokens == sum(h * w for h, w in SQUARE[:n])
    assert parse_size(f"{budget}x{budget}") is s
    assert parse_size(f"1:1@{budget}") is s


def test_non_square_and_its_transpose() -> None:
    tall = parse_size("1:2@1024")  # width:height = 1:2, h/w = 2
    assert list(tall.scales) == TALL_2
    assert tall.scales[-1] == (90, 45)
    assert tall.image_size == (45 * 16, 90 * 16) == (720, 1440)
    assert tall.rope_grid == (90, 45)
    assert tall.total_tokens == sum(h * w for h, w in TALL_2)
    assert parse_size("720x1440") is tall

    wide = parse_size("2:1@1024")  # h/w = 0.5: the transposed table
    assert list(wide.scales) == [(w, h) for h, w in TALL_2]
    assert wide.scales[-1] == (45, 90)
    assert wide.image_size == (1440, 720)
    assert wide.rope_grid == (45, 90)
    assert parse_size("1440x720") is wide

    small = parse_size("1:2@512")
    assert list(small.scales) == TALL_2[:10]
    assert small.rope_grid == (90, 45)
    assert small.image_size == (23 * 16, 46 * 16)


def test_rope_grid_is_the_1m_last_grid_for_every_ratio_and_budget() -> None:
    assert len(RATIOS) == 15
    for ratio, full in RATIOS.items():
        assert len(full) == 13
        for budget, n in PIXEL_BUDGETS.items():
            s = get_schedule(ratio, budget)
            assert s.rope_grid == full[-1]
            assert list(s.scales) == full[:n]
            h, w = s.scales[-1]
            assert abs(h / w - ratio) < 0.01  # the official table asserts the same for every prefix end
            assert all(a <= b for a, b in zip(s.scales[-1], s.rope_grid))


def test_transposed_ratios() -> None:
    for ratio, full in RATIOS.items():
        if ratio > 1:
            inverse = int(1 / ratio * 1000) / 1000
            assert RATIOS[inverse] == [(w, h) for h, w in full]


def test_every_supported_size_parses_back() -> None:
    sizes = supported_sizes()
    assert "1024x1024" in sizes and "256x256" in sizes
    for name in sizes:
        assert parse_size(name).name == name


@pytest.mark.parametrize("size", ["1000x1000", "1024", "big", "1024x1024x3", ""])
def test_unknown_sizes_list_the_supported_ones(size: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_size(size)
    assert "1024x1024" in str(err.value) and "720x1440" in str(err.value)
    assert "[256, 512, 768, 1024]" in str(err.value)


@pytest.mark.parametrize("size", ["1:1@300", "1:1@2048", "1:2@0"])
def test_unknown_budgets_list_the_supported_ones(size: str) -> None:
    with pytest.raises(ValueError, match=r"supported: \[256, 512, 768, 1024\]"):
        parse_size(size)


@pytest.mark.parametrize("size", ["1:5@1024", "5:1@512", "1:1.1@1024"])
def test_unknown_ratios_list_the_supported_ones(size: str) -> None:
    with pytest.raises(ValueError, match="unsupported aspect ratio") as err:
        parse_size(size)
    assert "0.333" in str(err.value) and "3" in str(err.value)


def test_non_positive_sides() -> None:
    with pytest.raises(ValueError, match="positive"):
        parse_size("0:1@1024")
